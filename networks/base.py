"""What every model here shares: the encoder/decoder pair of SPEC 2 and a K x D codebook,
bf16 autocast around the conv stacks only, and decoding from code indices."""
import contextlib

import torch
from torch import nn

from .blocks import init_weights
from .nets import build_networks


class CodebookAutoencoder(nn.Module):
    """Builds `encoder`, `decoder` (initialised as SPEC 2) and `codebook` ~ N(0, 1), in that
    order, so one seed gives SQ-VAE and VQ-VAE the same starting weights."""

    def __init__(self, cfg, codebook_trainable=True):
        super().__init__()
        self.dim_x = cfg.dataset.dim_x
        self.encoder, self.decoder = build_networks(cfg)
        init_weights(self)
        size, dim = cfg.quantization.size_dict, cfg.quantization.dim_code
        self.codebook = nn.Parameter(torch.randn(size, dim), requires_grad=codebook_trainable)
        # A buffer, so the per-step update is an in-place fill (no recompilation, no sync).
        self.register_buffer("temperature", torch.tensor(float(cfg.quantization.temperature.init)),
                             persistent=False)
        # bf16 autocast for the conv stacks only; quantizers and losses stay in full precision.
        self.amp = cfg.train.amp

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
        z_q = self.code_vectors()[codes.long()].permute(0, 3, 1, 2)
        return self.run_decoder(z_q)
