"""``ive(nu, x) = I_nu(x) * exp(-x)`` (``scipy.special.ive``) and ``log_ive``, differentiable in
x, in plain torch on x's device (no host round trips; both branches merged by ``torch.where``):
the power series below T(nu) = max(25, nu^2 / 2), Hankel's expansion above, in float64 (float32
where the device has none). Method and accuracy: docs/model.md §4.2."""
import math

import torch

__all__ = ["ive", "log_ive", "widest_float"]

# Below any concentration we expect, large enough that nu / x stays finite (nu <= 20): x is
# clamped to it, so x = 0 gives finite values and gradients instead of NaN.
_X_FLOOR = {torch.float64: 1e-300, torch.float32: 1e-35}

# Hankel's terms for x >= 25 shrink until k ~ 2x >= 50; by k = 30 they are below 1e-17 of the sum.
_HANKEL_TERMS = 30


def _series(nu: float, x: torch.Tensor, n_terms: int):
    """log Ie_nu(x) and d/dx log Ie_nu(x) from the power series (x: 1-D)."""
    k = torch.arange(n_terms, dtype=x.dtype, device=x.device)
    power = 2.0 * k + nu  # exponent of (x/2) in term k
    log_norm = torch.lgamma(k + 1.0) + torch.lgamma(k + (nu + 1.0))
    log_terms = power * torch.log(0.5 * x).unsqueeze(-1) - log_norm
    # d/dx log(term_k) = power_k / x; the sum's log-derivative is their softmax-weighted
    # average, a sum of positive numbers (no cancellation).
    dlog = (torch.softmax(log_terms, dim=-1) * power).sum(dim=-1) / x - 1.0
    return torch.logsumexp(log_terms, dim=-1) - x, dlog


def _hankel(nu: float, x: torch.Tensor, n_terms: int):
    """log Ie_nu(x) and d/dx log Ie_nu(x) from Hankel's expansion (x: 1-D)."""
    j = torch.arange(1, n_terms + 1, dtype=x.dtype, device=x.device)
    step = -(4.0 * nu * nu - (2.0 * j - 1.0) ** 2) / (8.0 * j)
    # term_k = c_k / x^k as a running product: neither c_k nor x^k (either could overflow).
    terms = torch.cumprod(step / x.unsqueeze(-1), dim=-1)
    s = 1.0 + terms.sum(dim=-1)
    ds = -(terms * j).sum(dim=-1) / x  # d/dx of sum_k term_k, with term_k ~ x^-k
    return torch.log(s) - 0.5 * torch.log((2.0 * math.pi) * x), ds / s - 0.5 / x


def _log_ive_and_dlog(nu: float, x: torch.Tensor, dtype: torch.dtype):
    """log Ie_nu(x) and its x-derivative in `dtype`, same shape as x."""
    if nu < 0:
        raise ValueError(f"nu must be >= 0, got {nu}")
    nu = float(nu)
    shape = x.shape
    xc = x.detach().to(dtype).reshape(-1).clamp_min(_X_FLOOR[dtype])
    t = max(25.0, 0.5 * nu * nu)  # the switch point T(nu)
    # The series' terms peak near k = x/2 and fall like a Gaussian of width ~sqrt(x/2); 6 widths
    # past the peak is below 1e-16 of the sum; the slack covers small x (not yet Gaussian).
    # Each branch sees only its own domain, so the one torch.where discards makes no inf/NaN.
    log_s, dlog_s = _series(nu, xc.clamp_max(t), int(math.ceil(t / 2 + 6.0 * math.sqrt(t) + 30)))
    log_h, dlog_h = _hankel(nu, xc.clamp_min(t), _HANKEL_TERMS)
    small = xc < t
    return (torch.where(small, log_s, log_h).reshape(shape),
            torch.where(small, dlog_s, dlog_h).reshape(shape))


class _Ive(torch.autograd.Function):
    """Ie_nu(x), or its log with `log`, with the derivative saved in closed form."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, nu: float, dtype: torch.dtype, log: bool):
        log_ie, dlog = _log_ive_and_dlog(nu, x, dtype)
        if log:
            ctx.save_for_backward(dlog.to(x.dtype))
            return log_ie.to(x.dtype)
        ie = torch.exp(log_ie)
        # d/dx Ie = Ie * d/dx log Ie (= Ie_{nu-1} - Ie_nu (nu + x)/x), 0 where Ie underflows.
        ctx.save_for_backward((ie * dlog).to(x.dtype))
        return ie.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (deriv,) = ctx.saved_tensors
        return grad_out * deriv, None, None, None


def widest_float(device) -> torch.dtype:
    """The most precise float dtype `device` computes in: float64, but float32 on Apple's MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _apply(nu: float, x: torch.Tensor, dtype, log: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError("x must be a torch.Tensor")
    if dtype is None:
        dtype = widest_float(x.device)
    if dtype not in _X_FLOOR:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())  # promote as torch does; an int x makes an int output
    return _Ive.apply(x, nu, dtype, log)


def ive(nu: float, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Ie_nu(x) = I_nu(x) * exp(-x) elementwise with x's shape, dtype and device; nu >= 0 (0..20
    validated), x > 0 (0 clamped to 1e-300, 1e-35 in float32); dtype of the arithmetic: float64
    or float32, None for ``widest_float(x.device)`` (relative error ~1e-13 and ~1e-5)."""
    return _apply(nu, x, dtype, log=False)


def log_ive(nu: float, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """log(Ie_nu(x)), computed in log space: finite where ``ive`` underflows (x = 1e-30 in
    float32); arguments as ``ive``'s."""
    return _apply(nu, x, dtype, log=True)
