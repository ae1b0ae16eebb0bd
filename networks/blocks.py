"""Building blocks shared by every encoder/decoder, and the release's initialisation."""
from torch import nn


def batch_norm(dim, enabled):
    """BatchNorm2d, or nothing when `flags.bn` is off (the block keeps its shape)."""
    return nn.BatchNorm2d(dim) if enabled else nn.Identity()


class ResBlock(nn.Module):
    """x + [ReLU, Conv3x3, BN, ReLU, Conv1x1, BN](x), its BatchNorms whatever `flags.bn` says
    (the release passes the flag to the stems and heads only; docs/model.md §2). A ReLU after
    a BN or conv runs in place (their backward reads their input, not their output)."""

    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
                                   nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1),
                                   nn.BatchNorm2d(dim))

    def forward(self, x):
        return x + self.block(x)


def res_stack(dim, count):
    return nn.Sequential(*[ResBlock(dim) for _ in range(count)])


def init_weights(module):
    """Conv weights ~ N(0, 0.02), BN weight ~ N(1, 0.02) and bias 0; conv biases keep
    PyTorch's default (docs/model.md §2)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
