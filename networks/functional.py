"""The quantizer layers' formulas (docs/model.md §3, docs/vqvae.md). Latents are channel-first
(B x D x *spatial); "rows" are one D-vector per position. The modes (``train``: the Gumbel-softmax
relaxation, ``deterministic``: the argmax, ``stochastic``: a sample): docs/model.md §3.3.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

MODES = ("train", "deterministic", "stochastic")


def negated_gumbel(like):
    """Minus Gumbel(0, 1) noise as the release draws it, log(-log(U + 1e-10) + 1e-10), in place on
    one uniform draw (the sign flip is exact: -(a - e) rounds as -a + e)."""
    return torch.rand_like(like).add_(1e-10).log_().sub_(1e-10).neg_().log_()


def perplexity(avg_probs):
    """exp(entropy) of the code usage averaged over the batch's positions: the release's per-batch
    figure (soft assignments, on the device), not util.codes' split-level one."""
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


# The relaxation's least temperature (0 gives NaN): at 1e-20 the softmax is already its limit,
# the one-hot argmax of the perturbed logits (closer than 1e-18: equal in float32).
HARD_BELOW = 1e-20


def mean_rows(t):
    """t.mean(0), and zeros (not NaN) for no rows: a batch of 0 positions."""
    return t.mean(0) if t.shape[0] else t.sum(0)


def mean_all(t):
    """t.mean(), and 0 (not NaN) for an empty tensor."""
    return t.mean() if t.numel() else t.sum()


def relaxed_weights(logits, temperature):
    """softmax((logits + Gumbel noise) / temperature), the temperature clamped at HARD_BELOW."""
    if not torch.is_tensor(temperature):
        temperature = torch.tensor(float(temperature), device=logits.device)
    # logits - (-g) rounds as logits + g; one N x K temporary besides the draw.
    perturbed = (logits - negated_gumbel(logits)).div_(temperature.clamp(min=HARD_BELOW))
    return F.softmax(perturbed, dim=-1)


class _NegEntropy(torch.autograd.Function):
    """sum_i sum_k p_ik log p_ik of p_i = softmax(l_i), and p (no gradient), from one
    log-softmax; the gradient p_ik (log p_ik - sum_k p_ik log p_ik) in two passes over N x K,
    where autograd through softmax, log-softmax and their product takes about nine."""

    @staticmethod
    def forward(ctx, logits):
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        p_log_p = log_probs.mul_(probs)
        per_row = p_log_p.sum(-1, keepdim=True)
        ctx.save_for_backward(probs, p_log_p, per_row)
        ctx.mark_non_differentiable(probs)
        ctx.set_materialize_grads(False)  # no N x K zeros for probs' gradient, never read
        return per_row.sum(), probs

    @staticmethod
    def backward(ctx, grad, _):
        if grad is None:  # only probs was used
            return None
        probs, p_log_p, per_row = ctx.saved_tensors
        return torch.addcmul(p_log_p, probs, per_row, value=-1).mul_(grad)


# (sum over rows of sum_k p log p, p) of p = softmax(logits) row by row; p has no gradient.
neg_entropy_and_probs = _NegEntropy.apply


def select_codes(logits, probs, mode, temperature):
    """Code weights (N x K) in `mode`, the averaged assignment for perplexity, the chosen code per
    position (the argmax in training, where the choice is soft)."""
    if mode == "train":
        weights = relaxed_weights(logits, temperature)
        return weights, mean_rows(probs.detach()), logits.detach().argmax(-1)
    index = torch.multinomial(probs, 1).squeeze(-1) if mode == "stochastic" else logits.argmax(-1)
    weights = one_hot(index, logits.shape[-1], logits.dtype)
    return weights, mean_rows(weights if mode == "deterministic" else probs), index


def _stochastic_outputs(z, logits, codebook, mode, temperature):
    """z_q and the terms both stochastic quantizers share, from their logits (N x K)."""
    neg_entropy, probs = neg_entropy_and_probs(logits)  # summed over positions and codes
    weights, avg_probs, index = select_codes(logits, probs, mode, temperature)
    batch = z.shape[0]
    return dict(z_q=unflatten_positions(weights @ codebook, z),
                kld_discrete=neg_entropy / max(batch, 1),  # a batch of 0 sums to 0, not 0 / 0
                perplexity=perplexity(avg_probs),
                entropy=-neg_entropy.detach() / max(probs.shape[0], 1),  # mean per position
                codes=index.reshape(batch, *z.shape[2:]))


def gaussian_logits(z_rows, codebook, precision_rows):
    """l_ik = -1/2 sum_d w_id (z_id - b_kd)^2, w one value per row (N x 1) or per row and
    dimension (N x D), expanded into one matrix product (no N x D x K tensor, and no N x K pass
    besides the product's): [w z, -w/2, -(w z . z)/2] @ [B^T; (B^2)^T; 1], w z . z summing over d,
    and B^2 summed over d too when w is one value per row."""
    wz = precision_rows * z_rows
    squares = codebook ** 2
    if precision_rows.shape[-1] == 1:
        squares = squares.sum(-1, keepdim=True)
    rows = torch.cat([wz, -0.5 * precision_rows, -0.5 * (wz * z_rows).sum(-1, keepdim=True)], 1)
    ones = codebook.new_ones(codebook.shape[0], 1)
    return rows @ torch.cat([codebook, squares, ones], 1).t()


def gaussian_quantize(z, var_q, codebook, mode, temperature):
    """Gaussian stochastic quantization of the encoder mean z (B x D x *spatial); var_q is
    sigma_q^2 broadcastable to z (a scalar, B x 1 x 1 ..., B x 1 x *spatial or z's shape)."""
    precision = 1.0 / var_q.clamp(min=1e-10)
    per_dimension = precision.dim() and precision.shape[1] != 1
    precision_rows = precision.expand(z.shape[0], z.shape[1] if per_dimension else 1, *z.shape[2:])
    logits = gaussian_logits(flatten_positions(z), codebook, flatten_positions(precision_rows))
    out = _stochastic_outputs(z, logits, codebook, mode, temperature)
    diff = z - out["z_q"]  # multiplied last: its gradient then has z's layout (docs/speed.md)
    out["kld_continuous"] = (0.5 * precision * diff * diff).sum() / max(z.shape[0], 1)
    return out


def vmf_quantize(z, kappa_q, codebook, mode, temperature):
    """vMF stochastic quantization on the unit sphere, l_ik = kappa_q <z_i/|z_i|, b_k/|b_k|>."""
    z = F.normalize(z, dim=1)
    codebook = F.normalize(codebook, dim=1)
    logits = (kappa_q * flatten_positions(z)) @ codebook.t()  # kappa on N x D, not N x K
    out = _stochastic_outputs(z, logits, codebook, mode, temperature)
    out["kld_continuous"] = (kappa_q * z * (z - out["z_q"])).sum() / max(z.shape[0], 1)
    return out


def nearest_codes(z_rows, codebook):
    """Each row of z's nearest codebook row by squared distance (||z||^2 left out: no matter)."""
    with torch.no_grad():
        score = (codebook ** 2).sum(1) - 2 * z_rows @ codebook.t()
        return score.argmin(1)


def vq_losses(z, e, beta):
    """(codebook loss, commitment loss) of outputs z and their codes e: mean squared differences."""
    return mean_all((z.detach() - e) ** 2), beta * mean_all((z - e.detach()) ** 2)


def straight_through(z, e):
    """e in the forward pass, the identity towards z in the backward pass."""
    return z + (e - z).detach()


def ema_update(count, total, codebook, batch_count, batch_sum, decay, eps):
    """One EMA step, in place, of count and total (the number, K, and sum, K x D, of the outputs
    assigned to each code); codebook = total / ((n_k + eps) / (n + K eps) * n), n = sum_k n_k:
    only that division is smoothed, so the smoothing does not compound from step to step."""
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
