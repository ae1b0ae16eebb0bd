"""An unconditional gated PixelCNN over H x W grids of code indices 0..K-1 (van den Oord et al.,
"Conditional Image Generation with PixelCNN Decoders", NeurIPS 2016), to sample new grids and
decode them. Its stacks, masks and receptive field: docs/model.md §2.5.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def code_nll(logits, codes, reduction="mean"):
    """-log softmax(logits)[code], logits B x K x ..., codes B x ...: the mean or the sum. Built
    from gather: CUDA's NLL kernel has no deterministic version (gather's backward has one)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    picked = logits.log_softmax(dim=1).gather(1, codes.unsqueeze(1))
    return -(picked.mean() if reduction == "mean" else picked.sum())


def gate(x):
    """tanh(a) * sigmoid(b), a and b the two channel halves of x."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x):
    """Row i takes the values of row i - 1; row 0 gets zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x):
    """Column j takes the values of column j - 1; column 0 gets zeros."""
    return F.pad(x, (1, 0))[..., :-1]


class GatedLayer(nn.Module):
    """One layer of the vertical and the horizontal stack, both B x channels x H x W."""

    def __init__(self, channels, kernel, mask_type):
        super().__init__()
        self.half = kernel // 2
        self.sees_current = mask_type == "B"
        # With forward's padding: rows i - half .. i, columns j - half .. j + half.
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel))
        # With forward's padding: columns j - half .. j.
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)

    def forward(self, vertical_in, horizontal_in):
        half = self.half
        vertical = self.vertical(F.pad(vertical_in, (half, half, half, 0)))
        # Type A: the input at (i, j) is the code predicted; the kernel ends at j - 1.
        seen = horizontal_in if self.sees_current else shift_right(horizontal_in)
        horizontal = self.horizontal(F.pad(seen, (half, 0, 0, 0)))
        # Row i's vertical features see row i, right of j too; shifted down, only rows above.
        horizontal = horizontal + self.vertical_to_horizontal(shift_down(vertical))
        horizontal_out = self.horizontal_out(gate(horizontal))
        if self.sees_current:  # type A's residual would pass the code itself on
            horizontal_out = horizontal_out + horizontal_in
        return gate(vertical), horizontal_out


class GatedPixelCNN(nn.Module):
    """p(codes) for int64 code grids B x H x W with values in 0..num_codes-1, any H and W."""

    def __init__(self, num_codes, channels=64, layers=8, kernel=5):
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number at least 3, got {kernel}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.num_codes, self.channels, self.kernel = num_codes, channels, kernel
        self.embedding = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel, "A" if index == 0 else "B") for index in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, num_codes, 1))

    def forward(self, codes):
        """Logits B x num_codes x H x W; those at (i, j) see only the codes before (i, j)."""
        return self.forward_embedded(self.embedding(codes).permute(0, 3, 1, 2))

    def forward_embedded(self, embedded):
        """Logits from embedded codes B x channels x H x W (its gradient shows what each sees)."""
        vertical, horizontal = embedded, embedded
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal)
        return self.head(horizontal)

    def nll(self, codes):
        """Mean negative log-likelihood in nats per code position (0-dim tensor)."""
        return code_nll(self(codes), codes)

    @torch.no_grad()
    def sample(self, n, height, width, temperature=1.0, generator=None):
        """n int64 grids n x height x width drawn in raster order from softmax(logits /
        temperature), from `generator`."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        codes = torch.zeros(n, height, width, dtype=torch.long,
                            device=self.embedding.weight.device)
        for i in range(height):
            for j in range(width):
                # Codes not drawn yet are placeholders; causality keeps them out of (i, j).
                logits = self(codes)[:, :, i, j] / temperature
                drawn = torch.multinomial(logits.softmax(dim=1), 1, generator=generator)
                codes[:, i, j] = drawn.squeeze(1)
        return codes


def layers_to_see(grid, kernel):
    """The fewest layers L with which every logit of an H x W grid sees every earlier code:
    L * (kernel // 2) >= max(H, W) - 1 (docs/model.md §2.5)."""
    height, width = grid
    return max(1, math.ceil((max(height, width) - 1) / (kernel // 2)))


@torch.no_grad()
def initialise(prior, generator):
    """PyTorch's default initialisation, drawn from `generator` in creation order: conv weights
    and biases uniform(+-1 / sqrt(fan_in)) (kaiming_uniform, a = sqrt(5)), embeddings N(0, 1)."""
    for m in prior.modules():
        if isinstance(m, nn.Conv2d):
            bound = 1 / math.sqrt(m.weight[0].numel())
            m.weight.uniform_(-bound, bound, generator=generator)
            m.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(generator=generator)
    return prior


def build_prior(cfg, grid=None, generator=None):
    """The prior over `cfg`'s code grids, initialised on the CPU (from `generator` where given,
    leaving the global RNG alone); prior.layers 0 takes layers_to_see(grid, prior.kernel)."""
    layers = cfg.prior.layers
    if layers == 0:
        if grid is None:
            raise ValueError("prior.layers 0 follows the code grid: give build_prior the grid")
        layers = layers_to_see(grid, cfg.prior.kernel)
    args = (cfg.quantization.size_dict, cfg.prior.channels, layers, cfg.prior.kernel)
    if generator is None:
        return GatedPixelCNN(*args)
    with torch.device("meta"):  # shapes only: nothing drawn from the global RNG
        prior = GatedPixelCNN(*args)
    return initialise(prior.to_empty(device="cpu"), generator)
