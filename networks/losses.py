"""Reconstruction losses of docs/model.md §4 beside the layers' own (reconstruction.py): a learned
Gaussian variance and the vMF likelihood of label maps (its normaliser from third_party.bessel).
"""
import torch
import torch.nn.functional as F

from third_party.bessel import log_ive

# The quantizer layers' own terms (torch only, installed with them as sqvae_layers).
from .reconstruction import arelbo_loss, squared_error  # noqa: F401


def learned_variance_loss(mse, dim_x, log_var_x):
    return mse / (2 * torch.exp(log_var_x)) + dim_x / 2 * log_var_x


def vmf_log_normalizer(kappa_inv, m):
    """log C_m(kappa) of a vMF on the (2m - 1)-sphere, without its 2*pi constant."""
    kappa = 1.0 / kappa_inv
    # In float64 where the device has it (tests/test_bessel.py bounds what float32 loses).
    log_bessel = log_ive(m - 1, kappa)
    return -(m - 1) * torch.log(kappa_inv) - kappa - log_bessel


class _PickChannel(torch.autograd.Function):
    """x.gather(1, index) with a gradient in x's layout (gather's own is channel-first, and a
    channels-last decoder's softplus and convolutions run several times slower on it)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(x, index)
        return x.gather(1, index)

    @staticmethod
    def backward(ctx, grad):
        x, index = ctx.saved_tensors
        return torch.zeros_like(x).scatter_(1, index, grad), None


def vmf_reconstruction(x_hat, labels, log_kappa_inv, dim_x):
    """Returns (loss, accuracy) for decoder outputs B x N x H x W and int labels B x 1 x H x W."""
    n = x_hat.shape[1]
    labels = labels.long().reshape(x_hat.shape[0], 1, *x_hat.shape[2:])
    # F.normalize's division, on the label's channel only: the same values, one channel's work.
    norm = torch.linalg.vector_norm(x_hat, dim=1, keepdim=True).clamp_min(1e-12)
    cosine = _PickChannel.apply(x_hat, labels) / norm
    kappa_inv = torch.exp(log_kappa_inv) + 1e-9
    loss = -cosine.sum() / x_hat.shape[0] / kappa_inv \
        - dim_x * vmf_log_normalizer(kappa_inv, n / 2)
    accuracy = (x_hat.argmax(1, keepdim=True) == labels).float().mean()
    return loss, accuracy
