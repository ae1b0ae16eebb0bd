"""SQ-VAE: encoder -> stochastic quantizer layer -> decoder, the loss of docs/model.md §3-4.
``model(x, mode)`` returns ``(x_hat, terms)``, the 0-dim tensors of ``TERMS`` (``param_x``: the
decoder's sigma_x^2 or kappa_d), none read back to the host.
"""
import torch
from torch import nn

from .base import CodebookAutoencoder
from .losses import arelbo_loss, learned_variance_loss, squared_error, vmf_reconstruction
from .quantizers import GAUSSIAN_VARIANCES, GaussianQuantizer, VmfQuantizer


class SQVAE(CodebookAutoencoder):
    """Shared body of both models; subclasses define the reconstruction likelihood."""

    # The scalar terms a forward pass returns, in the order metrics are logged.
    TERMS = ("loss", "loss_rec", "kld_discrete", "kld_continuous", "perplexity", "entropy",
             "param_q", "param_q_min", "param_q_max", "param_x")

    @staticmethod
    def reads_log_var(cfg):
        variance = GAUSSIAN_VARIANCES.get(cfg.model.param_var_q)
        return variance is not None and variance.reads_log_var

    def build_quantizer(self, cfg):
        # The temperature schedule of docs/model.md §3.6, or a constant `init` without it.
        t = cfg.quantization.temperature
        decay, floor = (t.decay, t.min) if cfg.flags.decay else (0.0, 0.0)
        args = dict(dim=cfg.quantization.dim_code, codebook_size=cfg.quantization.size_dict,
                    log_param_q_init=cfg.model.log_param_q_init, temperature_init=t.init,
                    temperature_decay=decay, temperature_min=floor)
        if cfg.model.param_var_q in GAUSSIAN_VARIANCES:
            return GaussianQuantizer(variance=cfg.model.param_var_q, **args)
        return VmfQuantizer(**args)  # the one other variant configs/registry.py names

    def before_train_step(self, step):
        """Anneal the Gumbel-softmax temperature (docs/model.md §3.6); it is logged."""
        return {"temperature": self.quantizer.anneal(step)}

    def loss_terms(self, x_hat, x, aux):
        terms = self.reconstruction_terms(x_hat, x)
        terms["loss"] = terms["loss_rec"] + aux["kld_discrete"] + aux["kld_continuous"]
        terms.update({key: aux[key] for key in self.TERMS if key in aux and key != "loss"})
        return terms


class GaussianSQVAE(SQVAE):
    """Images in [0, 1] with a Gaussian likelihood (ARELBO or a learned variance)."""

    TERMS = (*SQVAE.TERMS, "mse")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.arelbo = cfg.flags.arelbo
        if not self.arelbo:
            self.log_var_x = nn.Parameter(torch.tensor(float(cfg.model.log_var_x_init)))

    def reconstruction_terms(self, x_hat, x):
        """loss_rec, mse and param_x (sigma_x^2: ARELBO's mse / dim_x, or the learned one)."""
        mse = squared_error(x_hat, x)
        if self.arelbo:
            return {"loss_rec": arelbo_loss(mse, self.dim_x), "mse": mse.detach(),
                    "param_x": mse.detach() / self.dim_x}
        return {"loss_rec": learned_variance_loss(mse, self.dim_x, self.log_var_x),
                "mse": mse.detach(), "param_x": torch.exp(self.log_var_x.detach())}


class VmfSQVAE(SQVAE):
    """Label maps with a von Mises-Fisher likelihood over one-hot class vectors."""

    TERMS = (*SQVAE.TERMS, "acc")
    OUTPUTS = "labels"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.num_classes = cfg.network.num_class
        self.log_kappa_inv = nn.Parameter(torch.tensor(float(cfg.model.log_kappa_inv)))

    def reconstruction_terms(self, x_hat, x):
        """loss_rec, acc and param_x, the decoder's concentration kappa_d."""
        loss, accuracy = vmf_reconstruction(x_hat, x, self.log_kappa_inv, self.dim_x)
        return {"loss_rec": loss, "acc": accuracy.detach(),
                "param_x": 1.0 / (torch.exp(self.log_kappa_inv.detach()) + 1e-9)}
