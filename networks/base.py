"""What every model here shares: the encoder/decoder pair of docs/model.md §2 and a K x D
codebook, bf16 autocast around the conv stacks only, and decoding from code indices."""
import contextlib

import torch
from torch import nn

from .blocks import init_weights
from .nets import build_networks


def normal_codebook(size, dim):
    """N(0, 1) rows: the SQ-VAE release's codebook (and Sonnet's VectorQuantizerEMA)."""
    return torch.randn(size, dim)


def uniform_codebook(size, dim):
    """uniform(-1/K, 1/K) rows: the VQ-VAE codebook of the widely used PyTorch port of
    Sonnet's VQ-VAE (zalandoresearch/pytorch-vq-vae, `VectorQuantizer`), a small start
    near the origin like Sonnet's own uniform unit-scaling initialiser."""
    return torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)


CODEBOOK_INITS = {"normal": normal_codebook, "uniform": uniform_codebook}


class CodebookAutoencoder(nn.Module):
    """Builds `encoder`, `decoder` (initialised as docs/model.md §2) and `codebook`
    (`quantization.init`), in that order, so one seed gives SQ-VAE and VQ-VAE the same
    network weights.

    `OUTPUTS` says what the decoder produces: "images" (values in [0, 1], one per input value)
    or "labels" (per-pixel class scores whose argmax is the label map). `latent_shape` is the
    H x W grid of codes for one input."""

    OUTPUTS = "images"

    def __init__(self, cfg, codebook_trainable=True):
        super().__init__()
        self.dim_x = cfg.dataset.dim_x
        self.encoder, self.decoder = build_networks(cfg)
        self.latent_shape = self.encoder.grid(*cfg.dataset.shape[1:])
        init_weights(self)
        size, dim = cfg.quantization.size_dict, cfg.quantization.dim_code
        self.codebook = nn.Parameter(CODEBOOK_INITS[cfg.quantization.init](size, dim),
                                     requires_grad=codebook_trainable)
        # A buffer, so the per-step update is an in-place fill (no recompilation, no sync).
        self.register_buffer("temperature", torch.tensor(float(cfg.quantization.temperature.init)),
                             persistent=False)
        # bf16 autocast for the conv stacks only, switched on by the trainer (train.amp);
        # quantizers and losses stay in full precision.
        self.amp = False

    def set_temperature(self, value):
        self.temperature.fill_(value)

    def conv_precision(self, x):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=torch.bfloat16)

    def run_encoder(self, x):
        """(mean, log-variance or None), back in the model's precision."""
        dtype = self.codebook.dtype
        with self.conv_precision(x):
            z, log_var = self.encoder(x)
        return z.to(dtype), None if log_var is None else log_var.to(dtype)

    def run_decoder(self, z_q):
        with self.conv_precision(z_q):
            return self.decoder(z_q).to(self.codebook.dtype)

    def code_vectors(self):
        """The codebook rows as the decoder sees them."""
        return self.codebook

    @torch.no_grad()
    def decode(self, codes):
        """Decoder output for code indices B x H x W (inverse of `encode` up to the decoder)."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"codes must be N x {self.latent_shape[0]} x "
                             f"{self.latent_shape[1]} for this model, got {tuple(codes.shape)}")
        z_q = self.code_vectors()[codes.long()].permute(0, 3, 1, 2)
        return self.run_decoder(z_q)
