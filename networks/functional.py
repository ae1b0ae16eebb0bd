"""The functional core of the quantizer layers (docs/model.md §3 and docs/vqvae.md).

Stochastic quantization turns per-position logits l_ik over the K codes into z_q in one of
three modes: ``train``, the Gumbel-softmax relaxation y = softmax((l + g) / tau), z_q = y @ B
(soft, no straight-through); ``deterministic``, the one-hot argmax; ``stochastic``, a one-hot
sample from softmax(l). Latents are channel-first here (B x D x *spatial); "rows" are one
D-vector per position. Every tensor is created on the device and dtype of the inputs.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

MODES = ("train", "deterministic", "stochastic")


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def gumbel_noise(like):
    """Gumbel(0, 1) noise as the release draws it, -log(-log(U + 1e-10) + 1e-10), in place:
    the same values without five N x K temporaries (a third of a CIFAR10 quantizer's time)."""
    return torch.rand_like(like).add_(1e-10).log_().neg_().add_(1e-10).log_().neg_()


def perplexity(avg_probs):
    """exp of the entropy of the code usage averaged over the batch's positions: the release's
    per-batch figure, from soft assignments on the device, not util.codes' split-level one."""
    return torch.exp(-(avg_probs * torch.log(avg_probs + 1e-7)).sum())


def one_hot(index, size, dtype):
    """F.one_hot without its range check, which reads the indices back on the CPU."""
    weights = torch.zeros(*index.shape, size, dtype=dtype, device=index.device)
    return weights.scatter_(-1, index.unsqueeze(-1), 1.0)


def flatten_positions(z):
    """B x D x *spatial -> (B * prod(spatial)) x D, one row per latent position."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def unflatten_positions(rows, like):
    return rows.reshape(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)


# The relaxation's least temperature (0 would give NaN): at 1e-20 the softmax is already its
# limit, the one-hot argmax of the perturbed logits (logits closer than 1e-18 are equal in
# float32), with a zero gradient.
HARD_BELOW = 1e-20


def mean_rows(t):
    """t.mean(0), and zeros (not NaN) for no rows: a batch of 0 positions."""
    return t.mean(0) if t.shape[0] else t.sum(0)


def mean_all(t):
    """t.mean(), and 0 (not NaN) for an empty tensor."""
    return t.mean() if t.numel() else t.sum()


def relaxed_weights(logits, temperature):
    """softmax((logits + Gumbel noise) / temperature), the temperature clamped at HARD_BELOW on
    the device (never read back to the host)."""
    if not torch.is_tensor(temperature):
        temperature = torch.tensor(float(temperature), device=logits.device)
    # In place on the noise: the values of (logits + g) / tau, without two N x K temporaries.
    perturbed = gumbel_noise(logits).add_(logits).div_(temperature.clamp(min=HARD_BELOW))
    return F.softmax(perturbed, dim=-1)


def select_codes(logits, probs, mode, temperature):
    """Code weights (N x K) for a checked `mode`, the averaged assignment for perplexity, and
    the chosen code per position (the argmax in training, where the choice is soft)."""
    if mode == "train":
        weights = relaxed_weights(logits, temperature)
        return weights, mean_rows(probs.detach()), logits.detach().argmax(-1)
    if mode == "deterministic":
        index = logits.argmax(-1)
    else:
        index = torch.multinomial(probs, 1).squeeze(-1)
    weights = one_hot(index, logits.shape[-1], logits.dtype)
    return weights, mean_rows(weights if mode == "deterministic" else probs), index


def _stochastic_outputs(z, logits, codebook, mode, temperature):
    """z_q and the terms both stochastic quantizers share, from their logits (N x K)."""
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits, dim=-1)
    weights, avg_probs, index = select_codes(logits, probs, mode, temperature)
    batch = z.shape[0]
    neg_entropy = (probs * log_probs).sum()  # sum over positions and codes of p log p
    return dict(
        z_q=unflatten_positions(weights @ codebook, z),
        kld_discrete=neg_entropy / max(batch, 1),  # a batch of 0 sums to 0, not 0 / 0
        perplexity=perplexity(avg_probs),
        # Diagnostics (detached): mean entropy of p per position, and the chosen codes.
        entropy=-neg_entropy.detach() / max(probs.shape[0], 1),
        codes=index.reshape(batch, *z.shape[2:]),
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


def gaussian_quantize(z, var_q, codebook, mode, temperature):
    """Gaussian stochastic quantization of the encoder mean z (B x D x *spatial); var_q is
    sigma_q^2 broadcastable to z (a scalar, B x 1 x 1 ..., B x 1 x *spatial or z's shape)."""
    precision = 1.0 / var_q.clamp(min=1e-10)
    z_rows = flatten_positions(z)
    if precision.dim() == 0 or precision.shape[1] == 1:
        precision_rows = flatten_positions(precision.expand(z.shape[0], 1, *z.shape[2:]))
    else:
        precision_rows = flatten_positions(precision.expand_as(z))
    logits = gaussian_logits(z_rows, codebook, precision_rows)
    out = _stochastic_outputs(z, logits, codebook, mode, temperature)
    out["kld_continuous"] = (0.5 * precision * (z - out["z_q"]) ** 2).sum() / max(z.shape[0], 1)
    return out


def vmf_quantize(z, kappa_q, codebook, mode, temperature):
    """vMF stochastic quantization on the unit sphere, l_ik = kappa_q <z_i/|z_i|, b_k/|b_k|>."""
    z = F.normalize(z, dim=1)
    codebook = F.normalize(codebook, dim=1)
    logits = kappa_q * (flatten_positions(z) @ codebook.t())
    out = _stochastic_outputs(z, logits, codebook, mode, temperature)
    out["kld_continuous"] = (kappa_q * z * (z - out["z_q"])).sum() / max(z.shape[0], 1)
    return out


# ----------------------------------------------------------------------------- VQ-VAE

def nearest_codes(z_rows, codebook):
    """Index of the nearest codebook row for each row of z (N x D), by squared distance
    (||z||^2, the same for every code, left out)."""
    with torch.no_grad():
        score = (codebook ** 2).sum(1) - 2 * z_rows @ codebook.t()
        return score.argmin(1)


def vq_losses(z, e, beta):
    """(codebook loss, commitment loss) for encoder outputs z and their chosen codes e (same
    shape, any layout): means of the squared differences over all elements."""
    codebook_loss = mean_all((z.detach() - e) ** 2)
    commit_loss = beta * mean_all((z - e.detach()) ** 2)
    return codebook_loss, commit_loss


def straight_through(z, e):
    """e in the forward pass, the identity towards z in the backward pass."""
    return z + (e - z).detach()


def ema_update(count, total, codebook, batch_count, batch_sum, decay, eps):
    """One EMA step, in place: count and total are moving averages of batch_count (K) and
    batch_sum (K x D), the number and sum of the outputs assigned to each code; the codebook
    becomes total / the Laplace-smoothed count (n_k + eps) / (n + K eps) * n, n = sum_k n_k.
    Only that division is smoothed, so the smoothing does not compound from step to step."""
    count.mul_(decay).add_(batch_count, alpha=1 - decay)
    total.mul_(decay).add_(batch_sum, alpha=1 - decay)
    n = count.sum()
    smoothed = (count + eps) / (n + codebook.shape[0] * eps) * n
    codebook.copy_(total / smoothed.unsqueeze(1))


def summed_over_processes(batch_count, batch_sum):
    """Statistics summed over torchrun's processes: the codebooks stay those of one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return batch_count, batch_sum
    stats = torch.cat([batch_count.unsqueeze(1), batch_sum], dim=1)
    dist.all_reduce(stats)
    return stats[:, 0], stats[:, 1:]
