"""VQ-VAE baseline (van den Oord et al., 2017) on the same networks as the SQ-VAE experiments.

Quantization is deterministic: each latent position z_i (a D-vector of the encoder output
B x D x H x W) is replaced by its nearest codebook row e_k, k = argmin_k ||z_i - e_k||^2, and
the decoder's gradient reaches the encoder by the straight-through estimator
z_q = z + sg(e - z). There is no stochastic quantization, so the modes "train",
"deterministic" and "stochastic" all pick the nearest code; they are accepted so that the
trainer and evaluation code drive both model families the same way.

Loss, every term a mean over its elements (N = B * H * W latent positions):

    loss_rec      = mse / dim_x = sum_{b, pixels} (x_hat - x)^2 / (B * dim_x)
    loss_codebook = sum_{positions, d} (sg(z) - e)^2 / (N * D)   (0 with the EMA codebook)
    loss_commit   = beta * sum_{positions, d} (z - sg(e))^2 / (N * D)
    loss          = loss_rec + loss_codebook + loss_commit

`mse` is reported exactly as for the SQ-VAE (squared error summed per image, mean over
images). See the VQVAE class docstring for why these reductions, and for the EMA codebook.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .base import CodebookAutoencoder
from .losses import squared_error
from .quantizers import MODES, flatten_positions, perplexity, unflatten_positions


def nearest_codes(z_rows, codebook):
    """Index of the nearest codebook row for each row of z (N x D), by squared distance.

    ||z||^2 is the same for every code, so it is left out of the comparison; the search
    needs no gradient."""
    with torch.no_grad():
        score = (codebook ** 2).sum(1) - 2 * z_rows @ codebook.t()
        return score.argmin(1)


def vq_losses(z, e, beta):
    """(codebook loss, commitment loss) for encoder outputs z and their chosen codes e (same
    shape, any layout): means of the squared differences over all elements."""
    codebook_loss = ((z.detach() - e) ** 2).mean()
    commit_loss = beta * ((z - e.detach()) ** 2).mean()
    return codebook_loss, commit_loss


def straight_through(z, e):
    """e in the forward pass, the identity towards z in the backward pass."""
    return z + (e - z).detach()


def ema_update(count, total, codebook, batch_count, batch_sum, decay, eps):
    """One EMA step of the codebook statistics, in place.

    batch_count (K) and batch_sum (K x D) are the number and the sum of the encoder outputs
    assigned to each code in this batch; count and total are their moving averages. The
    codebook becomes total / smoothed count, with the Laplace smoothing
    n_k' = (n_k + eps) / (n + K eps) * n, n = sum_k n_k. The smoothed count is only used for
    that division, so the stored count stays a plain moving average and the smoothing does
    not compound from step to step."""
    count.mul_(decay).add_(batch_count, alpha=1 - decay)
    total.mul_(decay).add_(batch_sum, alpha=1 - decay)
    n = count.sum()
    smoothed = (count + eps) / (n + codebook.shape[0] * eps) * n
    codebook.copy_(total / smoothed.unsqueeze(1))


class VQVAE(CodebookAutoencoder):
    """Standard VQ-VAE with the encoder/decoder and codebook size of an SQ-VAE experiment.

    Loss (z: encoder output B x D x H x W, e: its nearest codebook rows, sg: stop-gradient,
    sums over the batch, all pixels, and all latent positions and dimensions):

        loss = sum (x_hat - x)^2 / (B * dim_x)
               + sum (sg(z) - e)^2 / (B * H * W * D)
               + beta * sum (z - sg(e))^2 / (B * H * W * D)

    Every term is a mean over its elements, the reduction the usual VQ-VAE recipes train with
    and under which beta = 0.25 is the customary commitment weight. With Adam only the ratio
    of the commitment to the reconstruction term shapes the encoder (the codebook loss alone
    moves the codebook, so its scale does not matter); summing every term per image instead,
    like the SQ-VAE's `mse`, would multiply that ratio by H * W * D / dim_x (4 on MNIST, 4/3
    on CIFAR10 and CelebA), a heavier commitment than beta = 0.25 usually means. The `mse`
    term is still reported as the SQ-VAE defines it (summed per image, mean over images), so
    the two models' reconstruction figures compare directly; loss_rec = mse / dim_x.

    With `quantization.ema` the codebook is not trained by the optimizer: it follows
    exponential moving averages (decay `quantization.ema_decay`) of the number and the sum of
    the encoder outputs assigned to each code, with Laplace smoothing `quantization.ema_eps`
    (see `ema_update`); the codebook loss is dropped and its term reported as 0. The update
    happens in training forward passes only (`model.training` and mode "train"), after the
    batch has been quantized with the codebook as it was. The statistics are buffers, so they
    are checkpointed. They start as Sonnet's `VectorQuantizerEMA` and VQ-VAE-2 (Razavi et
    al., 2019) start them: counts at zero, sums at the initial codebook.

    The codebook start (`quantization.init`) decides how many codes are ever used. The VQ-VAE
    experiment files take uniform(-1/K, 1/K), as the widely used PyTorch port of Sonnet's
    VQ-VAE does for the loss variant. N(0, 1) rows (the SQ-VAE release's start, also Sonnet's
    for the EMA variant) collapse on MNIST: within the first ~20 steps the encoder shrinks its
    outputs (mean norm 11 -> 5), while Adam moves a code by about lr per coordinate per step,
    so the codebook is left on a shell of norm about sqrt(D) = 8 around them. Inside that
    shell ||z - e||^2 is decided by ||e||^2, the few shortest codes win every position, and
    codes that are never chosen never move (4 in use from step 50). From a start near the
    origin every code is equally short, the choice follows z's direction, and the chosen
    codes reach the outputs within ~20 steps. Measured figures: docs/results.md.
    """

    TERMS = ("loss", "loss_rec", "loss_codebook", "loss_commit", "perplexity", "entropy", "mse")

    def __init__(self, cfg):
        if cfg.model.param_var_q != "gaussian_1" or cfg.flags.var_q:
            raise ValueError("VQVAE needs model.param_var_q gaussian_1 (no variance head)")
        # The EMA codebook is not trained by the optimizer.
        super().__init__(cfg, codebook_trainable=not cfg.quantization.ema)
        self.beta = float(cfg.model.beta)
        self.ema = bool(cfg.quantization.ema)
        size = cfg.quantization.size_dict
        if self.ema:
            self.ema_decay = float(cfg.quantization.ema_decay)
            self.ema_eps = float(cfg.quantization.ema_eps)
            self.register_buffer("ema_count", torch.zeros(size))
            self.register_buffer("ema_total", self.codebook.detach().clone())

    def quantize(self, z, mode, codes=False):
        """z_q (straight-through), the VQ loss terms and the code usage for z (B x D x H x W)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        z_rows = flatten_positions(z)
        index = nearest_codes(z_rows.detach(), self.codebook.detach())
        e_rows = self.codebook[index]
        codebook_loss, commit_loss = vq_losses(z_rows, e_rows, self.beta)
        one_hot = F.one_hot(index, self.codebook.shape[0]).to(z.dtype)
        if self.ema:
            codebook_loss = torch.zeros((), device=z.device)
            if self.training and mode == "train":
                self.update_codebook(one_hot, z_rows.detach())
        return {
            "z_q": unflatten_positions(straight_through(z_rows, e_rows), z),
            "loss_codebook": codebook_loss,
            "loss_commit": commit_loss,
            "perplexity": perplexity(one_hot.mean(0)),
            "codes": index.reshape(z.shape[0], *z.shape[2:]) if codes else None,
        }

    @torch.no_grad()
    def update_codebook(self, one_hot, z_rows):
        batch_count, batch_sum = one_hot.sum(0), one_hot.t() @ z_rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Under torchrun every process sees a shard of the batch; summing the statistics
            # keeps the codebooks identical and equal to a single-process run's.
            stats = torch.cat([batch_count.unsqueeze(1), batch_sum], dim=1)
            dist.all_reduce(stats)
            batch_count, batch_sum = stats[:, 0], stats[:, 1:]
        ema_update(self.ema_count, self.ema_total, self.codebook, batch_count, batch_sum,
                   self.ema_decay, self.ema_eps)

    def forward(self, x, mode="train", codes=False):
        z, _ = self.run_encoder(x)
        quant = self.quantize(z, mode, codes=codes)
        x_hat = self.run_decoder(quant["z_q"])
        mse = squared_error(x_hat, x)
        loss_rec = mse / self.dim_x
        terms = {
            "loss": loss_rec + quant["loss_codebook"] + quant["loss_commit"],
            "loss_rec": loss_rec,
            "loss_codebook": quant["loss_codebook"],
            "loss_commit": quant["loss_commit"],
            "perplexity": quant["perplexity"],
            # No distribution over codes: the assignment is one-hot, its entropy 0.
            "entropy": torch.zeros((), device=x.device),
            "mse": mse.detach(),
        }
        if codes:
            terms["codes"] = quant["codes"]
        return x_hat, terms

    @torch.no_grad()
    def encode(self, x):
        """Nearest-code indices, B x H x W."""
        z, _ = self.run_encoder(x)
        return nearest_codes(flatten_positions(z), self.codebook).reshape(
            z.shape[0], *z.shape[2:])
