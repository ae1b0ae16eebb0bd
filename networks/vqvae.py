"""VQ-VAE baseline (van den Oord et al., 2017) on the networks of the SQ-VAE experiments:
the `VectorQuantizer` layer (nearest code, straight-through gradient; every mode takes the
nearest code, so the trainer drives both model families alike). docs/vqvae.md has the
loss, the EMA codebook and why the codebook starts near the origin.
"""
from .base import CodebookAutoencoder
from .losses import squared_error
from .quantizers import VectorQuantizer


class VQVAE(CodebookAutoencoder):
    """Loss (z: encoder output B x D x H x W, e: its nearest codes, sg: stop-gradient):

        loss = sum (x_hat - x)^2 / (B * dim_x) + sum (sg(z) - e)^2 / (B * H * W * D)
               + beta * sum (z - sg(e))^2 / (B * H * W * D)

    Every term a mean over its elements, the reduction under which beta = 0.25 is the
    customary commitment weight: with Adam only the ratio of the commitment to the
    reconstruction term shapes the encoder, and summing every term per image (like the
    SQ-VAE's `mse`) would multiply it by H * W * D / dim_x (4 on MNIST). `mse` is still
    reported as the SQ-VAE defines it, so the reconstruction figures compare directly.
    With `quantization.ema` the codebook follows moving averages instead of its loss
    (reported as 0), updated in training forward passes only.
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
