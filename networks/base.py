"""What every model shares: docs/model.md §2's encoder/decoder around a quantizer layer, bf16
autocast around the conv stacks only, the forward pass, encoding and decoding."""
import contextlib

import torch
from torch import nn

from .blocks import init_weights
from .nets import build_networks


class CodebookAutoencoder(nn.Module):
    """`encoder`, `decoder` then `quantizer` (`build_quantizer`), so one seed gives SQ-VAE and
    VQ-VAE the same network weights. `OUTPUTS`: "images" (in [0, 1]) or "labels" (class scores);
    `latent_shape`: one input's H x W code grid; `loss_terms`: the logged terms."""

    OUTPUTS = "images"

    def __init__(self, cfg):
        super().__init__()
        self.dim_x = cfg.dataset.dim_x
        self.encoder, self.decoder = build_networks(cfg, self.reads_log_var(cfg))
        self.latent_shape = self.encoder.grid(*cfg.dataset.shape[1:])
        init_weights(self)
        self.quantizer = self.build_quantizer(cfg)
        if cfg.network.channels_last:  # oneDNN's fast path on CPUs (docs/speed.md); same values
            self.to(memory_format=torch.channels_last)
        self.amp = False  # bf16 for the conv stacks only, set by the trainer (train.amp)

    @staticmethod
    def reads_log_var(cfg):
        """Whether `cfg`'s quantizer reads a log-variance (an encoder head)."""
        return False

    @property
    def codebook(self):
        return self.quantizer.codebook

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

    def before_train_step(self, step):
        """The trainer's hook before global training step `step` (from 1): figures to log."""
        return {}

    def quantize(self, z, log_var, mode):
        """(z_q, aux) of the quantizer layer in `mode`."""
        latent = (z,) if log_var is None else (z, log_var)
        return self.quantizer(*latent, mode=mode)

    def forward(self, x, mode="train", codes=False):
        """(x_hat, terms): the 0-dim tensors of `TERMS`, and the code indices with `codes`."""
        z, log_var = self.run_encoder(x)
        z_q, aux = self.quantize(z, log_var, mode)
        x_hat = self.run_decoder(z_q)
        terms = self.loss_terms(x_hat, x, aux)
        if codes:
            terms["codes"] = aux["codes"]
        return x_hat, terms

    @torch.no_grad()
    def encode(self, x):
        """Deterministic code indices, B x H x W."""
        z, log_var = self.run_encoder(x)
        return self.quantize(z, log_var, "deterministic")[1]["codes"]

    def code_vectors(self):
        """The codebook rows as the decoder sees them."""
        return self.quantizer.code_vectors()

    @torch.no_grad()
    def decode(self, codes):
        """Decoder output for code indices B x H x W (inverse of `encode` up to the decoder)."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"codes must be N x {self.latent_shape[0]} x "
                             f"{self.latent_shape[1]} for this model, got {tuple(codes.shape)}")
        return self.run_decoder(self.quantizer.lookup(codes))
