"""VQ-VAE baseline (van den Oord et al., 2017) on the SQ-VAE experiments' networks, with the
`VectorQuantizer` layer (every mode takes the nearest code). docs/vqvae.md: the loss, the EMA
codebook and why the codebook starts near the origin.
"""
from .base import CodebookAutoencoder
from .losses import squared_error
from .quantizers import VectorQuantizer


class VQVAE(CodebookAutoencoder):
    """loss = mse / dim_x + loss_codebook + loss_commit, every term a mean over its elements (the
    reduction under which beta = 0.25 is customary; docs/vqvae.md); `mse` as the SQ-VAE's."""

    TERMS = ("loss", "loss_rec", "loss_codebook", "loss_commit", "perplexity", "mse")

    def build_quantizer(self, cfg):
        q = cfg.quantization
        return VectorQuantizer(q.dim_code, q.size_dict, beta=cfg.model.beta, ema=q.ema,
                               decay=q.ema_decay, init=q.init, eps=float(q.ema_eps))

    def loss_terms(self, x_hat, x, aux):
        mse = squared_error(x_hat, x)
        loss_rec = mse / self.dim_x
        return {"loss": loss_rec + aux["loss_codebook"] + aux["loss_commit"], "loss_rec": loss_rec,
                "loss_codebook": aux["loss_codebook"], "loss_commit": aux["loss_commit"],
                "perplexity": aux["perplexity"], "mse": mse.detach()}
