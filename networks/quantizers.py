"""Stochastic quantizers of docs/model.md §3: Gaussian (variants I-IV) and von Mises-Fisher.

Both turn per-position logits l_ik over the K codes into a quantized latent in
one of three modes:

* ``train``: Gumbel-softmax relaxation y = softmax((l + g) / tau), z_q = y @ B
  (soft, no straight-through);
* ``deterministic``: one-hot argmax_k l_ik;
* ``stochastic``: one-hot sample from Categorical(softmax(l)).

Logits, softmax and log-softmax are computed once per call. Everything is
created on the device and dtype of the inputs.
"""
import torch
import torch.nn.functional as F

MODES = ("train", "deterministic", "stochastic")


def gumbel_noise(like):
    """Gumbel(0, 1) noise as the reference draws it: -log(-log(U + 1e-10) + 1e-10)."""
    u = torch.rand_like(like)
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)


def select_codes(logits, probs, mode, temperature):
    """Code weights (N x K) for the given mode, the averaged assignment for perplexity, and the
    chosen code per position (the argmax in training, where the choice is soft)."""
    if mode == "train":
        weights = F.softmax((logits + gumbel_noise(logits)) / temperature, dim=-1)
        return weights, probs.detach().mean(0), logits.detach().argmax(-1)
    if mode == "deterministic":
        index = logits.argmax(-1)
        weights = F.one_hot(index, logits.shape[-1]).to(logits.dtype)
        return weights, weights.mean(0), index
    if mode == "stochastic":
        index = torch.multinomial(probs, 1).squeeze(-1)
        weights = F.one_hot(index, logits.shape[-1]).to(logits.dtype)
        return weights, probs.mean(0), index
    raise ValueError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")


def perplexity(avg_probs):
    """exp of the entropy of the code usage averaged over the batch's positions."""
    return torch.exp(-(avg_probs * torch.log(avg_probs + 1e-7)).sum())


def flatten_positions(z):
    """B x D x H x W -> (B*H*W) x D, one row per latent position."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_positions(rows, like):
    b, d, h, w = like.shape
    return rows.reshape(b, h, w, d).permute(0, 3, 1, 2)


def _finish(z, z_q, index, probs, log_probs, avg_probs, kld_continuous, codes):
    batch = z.shape[0]
    neg_entropy = (probs * log_probs).sum()  # sum over positions and codes of p log p
    # z_q plus the loss terms and diagnostics of one quantization.
    return dict(
        z_q=z_q,
        kld_discrete=neg_entropy / batch,
        kld_continuous=kld_continuous,
        perplexity=perplexity(avg_probs),
        # Diagnostics (detached): mean entropy of p per position, and the chosen codes.
        entropy=-neg_entropy.detach() / probs.shape[0],
        codes=index.reshape(batch, *z.shape[2:]) if codes else None,
    )


def gaussian_logits(z_rows, codebook, precision_rows):
    """l_ik = -1/2 sum_d w_id (z_id - b_kd)^2, with w either one value per row (N x 1) or one
    per row and dimension (N x D). Expanded into matrix products so no N x D x K tensor is
    ever built: sum_d w z^2 - 2 (w z) B^T + w (B^2)^T."""
    if precision_rows.shape[-1] == 1:
        sq_dist = ((z_rows ** 2).sum(-1, keepdim=True) - 2 * z_rows @ codebook.t()
                   + (codebook ** 2).sum(-1))
        return -0.5 * precision_rows * sq_dist
    wz = precision_rows * z_rows
    weighted = (wz * z_rows).sum(-1, keepdim=True) - 2 * wz @ codebook.t() \
        + precision_rows @ (codebook ** 2).t()
    return -0.5 * weighted


def gaussian_quantize(z, var_q, codebook, mode, temperature, codes=False):
    """Gaussian stochastic quantization.

    z: B x D x H x W encoder mean. var_q: sigma_q^2 broadcastable to z (a scalar, B x 1 x 1 x 1,
    B x 1 x H x W or B x D x H x W), so any latent grid works for every variant.
    """
    precision = 1.0 / var_q.clamp(min=1e-10)
    z_rows = flatten_positions(z)
    if precision.dim() == 0 or precision.shape[1] == 1:
        precision_rows = flatten_positions(precision.expand(z.shape[0], 1, *z.shape[2:]))
    else:
        precision_rows = flatten_positions(precision.expand_as(z))
    logits = gaussian_logits(z_rows, codebook, precision_rows)
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits, dim=-1)
    weights, avg_probs, index = select_codes(logits, probs, mode, temperature)
    z_q = unflatten_positions(weights @ codebook, z)
    kld_continuous = (0.5 * precision * (z - z_q) ** 2).sum() / z.shape[0]
    return _finish(z, z_q, index, probs, log_probs, avg_probs, kld_continuous, codes)


def vmf_quantize(z, kappa_q, codebook, mode, temperature, codes=False):
    """vMF stochastic quantization on the unit sphere: l_ik = kappa_q <z_i / |z_i|, b_k / |b_k|>."""
    z = F.normalize(z, dim=1)
    codebook = F.normalize(codebook, dim=1)
    z_rows = flatten_positions(z)
    logits = kappa_q * (z_rows @ codebook.t())
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits, dim=-1)
    weights, avg_probs, index = select_codes(logits, probs, mode, temperature)
    z_q = unflatten_positions(weights @ codebook, z)
    kld_continuous = (kappa_q * z * (z - z_q)).sum() / z.shape[0]
    return _finish(z, z_q, index, probs, log_probs, avg_probs, kld_continuous, codes)
