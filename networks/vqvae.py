"""VQ-VAE baseline (van den Oord et al., 2017) on the same networks as the SQ-VAE experiments.

Quantization is the `VectorQuantizer` layer: each latent position z_i (a D-vector of the
encoder output B x D x H x W) is replaced by its nearest codebook row e_k, and the decoder's
gradient reaches the encoder by the straight-through estimator z_q = z + sg(e - z). There is
no stochastic quantization, so the modes "train", "deterministic" and "stochastic" all pick
the nearest code; they are accepted so that the trainer and evaluation code drive both model
families the same way.

Loss, every term a mean over its elements (N = B * H * W latent positions):

    loss_rec      = mse / dim_x = sum_{b, pixels} (x_hat - x)^2 / (B * dim_x)
    loss_codebook = sum_{positions, d} (sg(z) - e)^2 / (N * D)   (0 with the EMA codebook)
    loss_commit   = beta * sum_{positions, d} (z - sg(e))^2 / (N * D)
    loss          = loss_rec + loss_codebook + loss_commit

`mse` is reported exactly as for the SQ-VAE (squared error summed per image, mean over
images). See the VQVAE class docstring for why these reductions, and for the EMA codebook.
"""
from .base import CodebookAutoencoder
from .losses import squared_error
from .quantizers import VectorQuantizer


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
    (see `networks.functional.ema_update`); the codebook loss is dropped and its term
    reported as 0. The update happens in training forward passes only (`model.training` and
    mode "train"), after the batch has been quantized with the codebook as it was. The
    statistics are buffers, so they are checkpointed. They start as Sonnet's
    `VectorQuantizerEMA` and VQ-VAE-2 (Razavi et al., 2019) start them: counts at zero, sums
    at the initial codebook.

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

    TERMS = ("loss", "loss_rec", "loss_codebook", "loss_commit", "perplexity", "mse")

    def build_quantizer(self, cfg):
        q = cfg.quantization
        return VectorQuantizer(q.dim_code, q.size_dict, beta=cfg.model.beta, ema=q.ema,
                               decay=q.ema_decay, init=q.init, eps=float(q.ema_eps))

    def loss_terms(self, x_hat, x, aux):
        mse = squared_error(x_hat, x)
        loss_rec = mse / self.dim_x
        return {
            "loss": loss_rec + aux["loss_codebook"] + aux["loss_commit"],
            "loss_rec": loss_rec,
            "loss_codebook": aux["loss_codebook"],
            "loss_commit": aux["loss_commit"],
            "perplexity": aux["perplexity"],
            "mse": mse.detach(),
        }
