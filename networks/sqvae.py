"""SQ-VAE: encoder -> stochastic quantizer -> decoder, with the loss of docs/model.md §3-4.

``model(x, mode)`` returns ``(x_hat, terms)``; ``terms`` holds 0-dim tensors
(``loss``, ``loss_rec``, ``kld_discrete``, ``kld_continuous``, ``perplexity``,
``mse`` or ``acc``, and the self-annealing diagnostics: ``entropy`` (mean entropy
of the code distribution per position), ``param_q`` / ``param_q_min`` /
``param_q_max`` (sigma_q^2 or kappa_q over positions) and ``param_x`` (decoder
variance sigma_x^2, or kappa_d for vMF). Nothing is read back to the host, so a
training step never synchronises.
"""
import torch
from torch import nn

from .base import CodebookAutoencoder
from .losses import arelbo_loss, learned_variance_loss, squared_error, vmf_reconstruction
from .quantizers import MODES, gaussian_quantize, vmf_quantize


def _variance_gaussian_1(log_var, s):
    return 1.0 + torch.exp(s)  # no variance head: v = 0


def _variance_gaussian_2(log_var, s):
    # One precision per image, broadcast over whatever latent grid the network has.
    return torch.exp(log_var.mean(dim=(1, 2, 3), keepdim=True)) + torch.exp(s)


def _variance_gaussian_3(log_var, s):
    return torch.exp(log_var.mean(dim=1, keepdim=True)) + torch.exp(s)


def _variance_gaussian_4(log_var, s):
    return torch.exp(log_var) + torch.exp(s)


# model.param_var_q -> sigma_q^2 from (variance head output, log_param_q_scalar)
GAUSSIAN_VARIANCES = {
    "gaussian_1": _variance_gaussian_1,
    "gaussian_2": _variance_gaussian_2,
    "gaussian_3": _variance_gaussian_3,
    "gaussian_4": _variance_gaussian_4,
}
VARIANTS = (*GAUSSIAN_VARIANCES, "vmf")


class SQVAE(CodebookAutoencoder):
    """Shared body of both models; subclasses define the reconstruction likelihood."""

    # The scalar terms a forward pass returns, in the order metrics are logged.
    TERMS = ("loss", "loss_rec", "kld_discrete", "kld_continuous", "perplexity", "entropy",
             "param_q", "param_q_min", "param_q_max", "param_x")

    def __init__(self, cfg):
        if cfg.model.param_var_q not in VARIANTS:
            raise ValueError(f"unknown model.param_var_q {cfg.model.param_var_q!r}; "
                             f"allowed: {', '.join(VARIANTS)}")
        super().__init__(cfg)
        self.variant = cfg.model.param_var_q
        self.log_param_q_scalar = nn.Parameter(torch.tensor(float(cfg.model.log_param_q_init)))

    def quantizer_param(self, log_var):
        """sigma_q^2 (Gaussian variants) or kappa_q (vMF) for this batch."""
        s = self.log_param_q_scalar
        if self.variant == "vmf":
            return torch.exp(s) + 1.0
        return GAUSSIAN_VARIANCES[self.variant](log_var, s)

    def quantize(self, z, log_var, mode, codes=False):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        param = self.quantizer_param(log_var)
        quantize = vmf_quantize if self.variant == "vmf" else gaussian_quantize
        out = quantize(z, param, self.codebook, mode, self.temperature, codes=codes)
        # Self-annealing diagnostics: sigma_q^2 (Gaussian) or kappa_q (vMF) over positions.
        param = param.detach()
        out["param_q"], out["param_q_min"], out["param_q_max"] = \
            param.mean(), param.min(), param.max()
        return out

    def forward(self, x, mode="train", codes=False):
        z, log_var = self.run_encoder(x)
        quant = self.quantize(z, log_var, mode, codes=codes)
        x_hat = self.run_decoder(quant["z_q"])
        terms = self.reconstruction_terms(x_hat, x)
        terms["kld_discrete"] = quant["kld_discrete"]
        terms["kld_continuous"] = quant["kld_continuous"]
        terms["loss"] = terms["loss_rec"] + quant["kld_discrete"] + quant["kld_continuous"]
        terms["perplexity"] = quant["perplexity"]
        terms["entropy"] = quant["entropy"]
        for key in ("param_q", "param_q_min", "param_q_max"):
            terms[key] = quant[key]
        terms["param_x"] = self.decoder_variance(terms)
        if codes:
            terms["codes"] = quant["codes"]
        return x_hat, terms

    @torch.no_grad()
    def encode(self, x):
        """Deterministic code indices, B x H x W (the argmax of the quantizer's logits)."""
        z, log_var = self.run_encoder(x)
        return self.quantize(z, log_var, "deterministic", codes=True)["codes"]

    def code_vectors(self):
        """The codebook rows as the decoder sees them (unit-normalised for vMF)."""
        if self.variant == "vmf":
            return torch.nn.functional.normalize(self.codebook, dim=1)
        return self.codebook


class GaussianSQVAE(SQVAE):
    """Images in [0, 1] with a Gaussian likelihood (ARELBO or a learned variance)."""

    TERMS = (*SQVAE.TERMS, "mse")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.arelbo = cfg.flags.arelbo
        if not self.arelbo:
            self.log_var_x = nn.Parameter(torch.tensor(float(cfg.model.log_var_x_init)))

    def reconstruction_terms(self, x_hat, x):
        mse = squared_error(x_hat, x)
        if self.arelbo:
            loss = arelbo_loss(mse, self.dim_x)
        else:
            loss = learned_variance_loss(mse, self.dim_x, self.log_var_x)
        return {"loss_rec": loss, "mse": mse.detach()}

    def decoder_variance(self, terms):
        """sigma_x^2: ARELBO's implied mse / dim_x, or the learned variance."""
        if self.arelbo:
            return terms["mse"] / self.dim_x
        return torch.exp(self.log_var_x.detach())


class VmfSQVAE(SQVAE):
    """Label maps with a von Mises-Fisher likelihood over one-hot class vectors."""

    TERMS = (*SQVAE.TERMS, "acc")
    OUTPUTS = "labels"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.num_classes = cfg.network.num_class
        self.log_kappa_inv = nn.Parameter(torch.tensor(float(cfg.model.log_kappa_inv)))

    def reconstruction_terms(self, x_hat, x):
        loss, accuracy = vmf_reconstruction(x_hat, x, self.log_kappa_inv, self.dim_x)
        return {"loss_rec": loss, "acc": accuracy.detach()}

    def decoder_variance(self, terms):
        """kappa_d, the decoder's concentration (logged as param_x)."""
        return 1.0 / (torch.exp(self.log_kappa_inv.detach()) + 1e-9)
