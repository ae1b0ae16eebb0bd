"""Quantizer layers for any model: SQ-VAE's Gaussian and vMF stochastic quantizers, VQ-VAE's
nearest-code one. With functional.py and reconstruction.py (torch their only import) they are
``pip install .``'s ``sqvae_layers``; docs/layers.md: the modes, ``anneal``, ``arelbo``.
"""
import contextlib
import math
import numbers
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (MODES, ema_update, flatten_positions, gaussian_quantize, mean_rows,
                         nearest_codes, one_hot, perplexity, straight_through,
                         summed_over_processes, unflatten_positions, vmf_quantize, vq_losses)
from .reconstruction import arelbo_loss, squared_error


def arelbo(x_hat, x):
    """The ARELBO reconstruction term, dim_x / 2 * log(sum (x_hat - x)^2 / B), dim_x being the
    number of values of one example; add the layer's ``aux["loss"]`` to it."""
    return arelbo_loss(squared_error(x_hat, x), x[0].numel())


# N(0, 1) rows, the SQ-VAE release's (and Sonnet's VectorQuantizerEMA); or uniform(-1/K, 1/K),
# near the origin, as the PyTorch port of Sonnet's VQ-VAE (zalandoresearch/pytorch-vq-vae).
CODEBOOK_INITS = {
    "normal": lambda size, dim: torch.randn(size, dim),
    "uniform": lambda size, dim: torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size),
}


# The means over channels reduce the positions-major view (the same values), so that their
# gradient has log_var's layout in a channels-last model, as a channel-first mean's has not.
def _variance_gaussian_1(log_var, s):
    return 1.0 + torch.exp(s)  # no variance head: v = 0


def _variance_gaussian_2(log_var, s):  # one value per example, whatever the latent grid
    per_example = log_var.movedim(1, -1).flatten(1).mean(1)
    return torch.exp(per_example).reshape(len(log_var), *[1] * (log_var.dim() - 1)) + torch.exp(s)


def _variance_gaussian_3(log_var, s):
    return torch.exp(log_var.movedim(1, -1).mean(-1).unsqueeze(1)) + torch.exp(s)


def _variance_gaussian_4(log_var, s):
    return torch.exp(log_var) + torch.exp(s)


class Variance(NamedTuple):
    """A Gaussian variant: all the code knows of it (configs/registry.py lists its name)."""

    of: Callable         # sigma_q^2 from (channel-first log-variance or None, s)
    reads_log_var: bool  # whether the encoder has a log-variance head (None is passed if not)
    label: str           # its name in docs/model.md §3.1 and the report's figures


# model.param_var_q -> its Variance; a new variant: a function, its entry, its name in VARIANTS.
GAUSSIAN_VARIANCES = {
    "gaussian_1": Variance(_variance_gaussian_1, False, "I"),
    "gaussian_2": Variance(_variance_gaussian_2, True, "II"),
    "gaussian_3": Variance(_variance_gaussian_3, True, "III"),
    "gaussian_4": Variance(_variance_gaussian_4, True, "IV"),
}


def _shown(value):
    text = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what} {_shown(value)}; use one of {', '.join(choices)}")


def _check_number(name, value, low=None, whole=False):
    """A finite real number (a whole one with `whole`), not a bool, at least `low` if given."""
    kind = numbers.Integral if whole else numbers.Real
    if (isinstance(value, bool) or not isinstance(value, kind)
            or not (whole or math.isfinite(value)) or (low is not None and value < low)):
        need = ("a whole number" if whole else "a finite number") \
            + (f" of at least {low:g}" if low is not None else "")
        raise ValueError(f"{name} must be {need}, got {_shown(value)}")


class CodebookLayer(nn.Module):
    """What the three layers share: the K x dim codebook, z's layout, precision and mode."""

    def __init__(self, dim, codebook_size, *, init, trainable, channel_last):
        super().__init__()
        _check_number("dim", dim, low=1, whole=True)
        _check_number("codebook_size", codebook_size, low=1, whole=True)
        _check_choice("init", init, CODEBOOK_INITS)
        self.dim, self.codebook_size, self.channel_last = dim, codebook_size, channel_last
        self.codebook = nn.Parameter(CODEBOOK_INITS[init](codebook_size, dim),
                                     requires_grad=trainable)

    def code_vectors(self):
        """The rows z_q is made of."""
        return self.codebook

    def forward(self, z, *, mode=None):
        return self._run(z, None, mode)

    def lookup(self, codes):
        """z_q for code indices (z's shape without the dim axis), in the layer's layout; integers
        in [0, codebook_size), checked on the host (this is for decoding)."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"code indices must be integers, got {codes.dtype}")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < self.codebook_size):
            raise ValueError(f"code indices must be in [0, {self.codebook_size}), got "
                             f"{int(codes.min())} to {int(codes.max())}")
        return self._layout_out(self.code_vectors()[codes.long()].movedim(-1, 1))

    def _run(self, z, log_var, mode):
        if mode is None:
            mode = "train" if self.training else "deterministic"
        _check_choice("mode", mode, MODES)
        axis = -1 if self.channel_last else 1
        if z.is_complex() or (log_var is not None and log_var.is_complex()):
            raise ValueError("z is complex; the layers quantize real tensors (pass z.real, "
                             "or the real and imaginary parts as channels)")
        if z.dim() < 2 or z.shape[axis] != self.dim:
            raise ValueError(f"z of shape {tuple(z.shape)} does not have dim={self.dim} on "
                             f"axis {axis} (channel_last={self.channel_last})")
        z = self._channel_first(z).to(self.codebook.dtype)
        if log_var is not None:
            log_var = self._channel_first(log_var).to(self.codebook.dtype)
        # Distances and softmax in bf16 would pick other codes (autocast refuses the meta device).
        with (contextlib.nullcontext() if z.device.type == "meta"
              else torch.autocast(z.device.type, enabled=False)):
            z_q, aux = self._quantize(z, log_var, mode)
        # Channels-last and not also contiguous (as 1 x 1 is): z_q keeps that layout.
        position_major = z.dim() > 2 and z.movedim(1, -1).is_contiguous() and not z.is_contiguous()
        return self._layout_out(z_q, position_major), aux

    def _layout_out(self, z_q, position_major=False):
        # In z's own layout: a channels-last z_q in an NCHW model gives a 1-channel output layer
        # channels-last weight gradients, and DDP "Grad strides do not match bucket view strides".
        if self.channel_last:
            return z_q.movedim(1, -1)
        return z_q if position_major else z_q.contiguous()

    def _channel_first(self, t):
        # Contiguous, so that both layouts reduce in the same order and agree bit for bit.
        return t.movedim(-1, 1).contiguous() if self.channel_last else t

    def extra_repr(self):
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, "
                f"channel_last={self.channel_last}")


class _StochasticLayer(CodebookLayer):
    """The SQ layers: a learned scalar s, the temperature and its schedule, the KL terms as the
    loss; subclasses give QUANTIZE and param_q (sigma_q^2 or kappa_q)."""

    def __init__(self, dim, codebook_size, log_param_q_init, channel_last, temperature_init,
                 temperature_decay, temperature_min):
        super().__init__(dim, codebook_size, init="normal", trainable=True,
                         channel_last=channel_last)
        schedule = (temperature_init, temperature_decay, temperature_min)
        for name, value in zip(("temperature_init", "temperature_decay", "temperature_min"),
                               schedule):
            _check_number(name, value, low=0.0)
        self.schedule = tuple(map(float, schedule))
        # A buffer, so annealing is an in-place fill: no recompilation, no host sync.
        self.register_buffer("temperature", torch.tensor(float(temperature_init)), persistent=False)
        _check_number("log_param_q_init", log_param_q_init)
        self.log_param_q_scalar = nn.Parameter(torch.tensor(float(log_param_q_init)))

    def temperature_at(self, step):
        """The temperature at global step `step` (>= 0); at 0 (exp underflows after ~1e7 default
        steps) the layer takes the hard argmax of the perturbed logits."""
        _check_number("step", step, low=0.0)
        init, decay, floor = self.schedule
        return max(init * math.exp(-decay * float(step)), floor)

    def anneal(self, step):
        """Set the temperature of global training step `step`; returns it."""
        value = self.temperature_at(step)
        self.temperature.fill_(value)
        return value

    def _quantize(self, z, log_var, mode):
        param = self.param_q(log_var)
        out = self.QUANTIZE(z, param, self.codebook, mode, self.temperature)
        z_q = out.pop("z_q")
        out["loss"] = out["kld_discrete"] + out["kld_continuous"]
        param = param.detach()
        if param.numel() == 0:  # a batch of 0 has no positions to describe
            param = param.new_full((1,), float("nan"))
        out.update(param_q=param.mean(), param_q_min=param.min(), param_q_max=param.max())
        return z_q, out


class GaussianQuantizer(_StochasticLayer):
    """SQ-VAE's Gaussian stochastic quantizer (docs/model.md §3.1), variants I-IV.

    ``variance`` (a key of GAUSSIAN_VARIANCES) picks sigma_q^2 = exp(v) + exp(s), s the
    learned ``log_param_q_scalar`` (initially the release's log 10), v = 0 for "gaussian_1",
    else from the encoder's log-variance of z's shape. Temperature defaults are the release's;
    aux: loss, kld_discrete, kld_continuous, perplexity, entropy, codes and param_q (sigma_q^2)
    with its min and max over positions (docs/layers.md).
    """

    QUANTIZE = staticmethod(gaussian_quantize)

    def __init__(self, dim, codebook_size, variance="gaussian_1", *,
                 log_param_q_init=math.log(10.0), temperature_init=1.0, temperature_decay=1e-5,
                 temperature_min=0.0, channel_last=False):
        _check_choice("variance", variance, GAUSSIAN_VARIANCES)
        super().__init__(dim, codebook_size, log_param_q_init, channel_last, temperature_init,
                         temperature_decay, temperature_min)
        self.variance = variance
        _, self.needs_log_var, self.label = GAUSSIAN_VARIANCES[variance]

    def forward(self, z, log_var=None, *, mode=None):
        if (log_var is None) == self.needs_log_var:
            takes = "the encoder's log-variance" if self.needs_log_var else "no log-variance"
            raise ValueError(f"variance {self.variance} takes {takes}")
        if log_var is not None and log_var.shape != z.shape:
            raise ValueError(f"log_var has shape {tuple(log_var.shape)}, z {tuple(z.shape)}")
        return self._run(z, log_var, mode)

    def param_q(self, log_var=None):
        """sigma_q^2, broadcastable to a channel-first z."""
        return GAUSSIAN_VARIANCES[self.variance].of(log_var, self.log_param_q_scalar)


class VmfQuantizer(_StochasticLayer):
    """SQ-VAE's von Mises-Fisher stochastic quantizer (docs/model.md §3.2): z and the codebook
    rows are L2-normalised, logits are kappa_q <z_i, b_k>, kappa_q = exp(s) + 1 with s the
    learned ``log_param_q_scalar`` (initially ``log_param_q_init``, the release's log 0.05).
    ``z_q`` is on the unit sphere. Temperature defaults and aux as GaussianQuantizer's, with
    param_q the concentration kappa_q."""

    QUANTIZE = staticmethod(vmf_quantize)
    label = "vMF"

    def __init__(self, dim, codebook_size, *, log_param_q_init=math.log(0.05),
                 temperature_init=1.0, temperature_decay=1e-5, temperature_min=0.0,
                 channel_last=False):
        super().__init__(dim, codebook_size, log_param_q_init, channel_last, temperature_init,
                         temperature_decay, temperature_min)

    def param_q(self, log_var=None):
        """kappa_q."""
        return torch.exp(self.log_param_q_scalar) + 1.0

    def code_vectors(self):
        return F.normalize(self.codebook, dim=1)


class VectorQuantizer(CodebookLayer):
    """VQ-VAE's quantizer (docs/vqvae.md): every position (in every mode: no temperature)
    takes its nearest code e, and z_q = z + sg(e - z) passes the gradient straight through.
    aux: loss = loss_codebook (mean (sg(z) - e)^2, 0 with ``ema``) + loss_commit (beta *
    mean (z - sg(e))^2), perplexity of the chosen codes, codes. ``ema=True``: the codebook
    follows moving averages (``decay``, Laplace smoothing ``eps``) of the outputs assigned to
    each code, updated after quantizing in training forward passes (``layer.training`` and
    mode "train"), summed over processes under torch.distributed.
    """

    label = "VQ"

    def __init__(self, dim, codebook_size, beta=0.25, ema=False, decay=0.99, init="uniform",
                 channel_last=False, *, eps=1e-5):
        super().__init__(dim, codebook_size, init=init, trainable=not ema,
                         channel_last=channel_last)
        for name, value in (("beta", beta), ("decay", decay), ("eps", eps)):
            _check_number(name, value, low=0.0)
        if decay >= 1.0 or eps <= 0.0:
            raise ValueError(f"decay must be in [0, 1) and eps above 0, got decay={decay}, "
                             f"eps={eps}")
        self.beta, self.ema, self.decay, self.eps = float(beta), bool(ema), float(decay), eps
        if self.ema:
            self.register_buffer("ema_count", torch.zeros(codebook_size))
            self.register_buffer("ema_total", self.codebook.detach().clone())

    def _quantize(self, z, log_var, mode):
        z_rows = flatten_positions(z)
        index = nearest_codes(z_rows.detach(), self.codebook.detach())
        e_rows = self.codebook[index]
        codebook_loss, commit_loss = vq_losses(z_rows, e_rows, self.beta)
        assigned = one_hot(index, self.codebook.shape[0], z.dtype)
        if self.ema:
            codebook_loss = z.new_zeros(())
            if self.training and mode == "train":
                with torch.no_grad():
                    batch_count, batch_sum = summed_over_processes(assigned.sum(0),
                                                                   assigned.t() @ z_rows)
                    ema_update(self.ema_count, self.ema_total, self.codebook, batch_count,
                               batch_sum, self.decay, self.eps)
        z_q = unflatten_positions(straight_through(z_rows, e_rows), z)
        return z_q, {"loss": codebook_loss + commit_loss, "loss_codebook": codebook_loss,
                     "loss_commit": commit_loss, "perplexity": perplexity(mean_rows(assigned)),
                     "codes": index.reshape(z.shape[0], *z.shape[2:])}

    def extra_repr(self):
        return f"{super().extra_repr()}, beta={self.beta}, ema={self.ema}"
