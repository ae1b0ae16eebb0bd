"""The encoder/decoder pairs of docs/model.md §2, by (network.name, input height and width). An
encoder returns ``(mean, log_var)``, log_var None without a variance head; D is the code
dimension, D/2 the hidden width.
"""
import math

from torch import nn

from .blocks import ResBlock, batch_norm, res_stack
from .functional import one_hot


class Encoder(nn.Module):
    """A downsampling stem, ResBlocks, a mean head and an optional variance head."""

    def __init__(self, stem, res, head_mean, head_log_var=None):
        super().__init__()
        self.stem, self.res, self.head_mean, self.head_log_var = stem, res, head_mean, head_log_var

    def prepare(self, x):
        return x

    def grid(self, height, width):
        """The latent grid (H, W) the stem's convs leave of a height x width input."""
        for layer in self.stem.modules():
            if isinstance(layer, nn.Conv2d):
                (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
                height, width = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        return height, width

    def forward(self, x):
        h = self.res(self.stem(self.prepare(x)))
        log_var = self.head_log_var(h) if self.head_log_var is not None else None
        return self.head_mean(h), log_var


class LabelEncoder(Encoder):
    """Encoder for integer label maps: one-hot to `num_channels` planes first."""

    def __init__(self, num_channels, *parts):
        super().__init__(*parts)
        self.num_channels = num_channels

    def prepare(self, x):
        # In the model's float type (float64 in tests) and channels-last; labels are checked
        # when a dataset is decoded: scatter refuses one out of range on the CPU.
        dtype = self.stem[0].weight.dtype
        return one_hot(x.long().squeeze(1), self.num_channels, dtype).permute(0, 3, 1, 2)


class Decoder(nn.Module):
    """ResBlocks, then an upsampling head that ends in the output activation."""

    def __init__(self, res, head):
        super().__init__()
        self.res, self.head = res, head

    def forward(self, z):
        return self.head(self.res(z))


# A conv draws its default bias from the global generator when created, so every builder makes
# the layers in the release's order (arguments are evaluated left to right): one seed gives the
# release's initial weights bit for bit (tests/test_release.py).

def encoder_blocks(cfg, d, log_var_head):
    """After the stem: `num_rb - 1` ResBlocks, the mean head and maybe the log-variance head."""
    return (res_stack(d, cfg.network.num_rb - 1), ResBlock(d),
            ResBlock(d) if log_var_head else None)


def down(cin, cout, kernel, stride, bn):
    """Conv (padding keeps a stride-1 size, halves a stride-2 one), BatchNorm, ReLU."""
    return nn.Conv2d(cin, cout, kernel, stride, 1), batch_norm(cout, bn), nn.ReLU(inplace=True)


def up(cin, cout, kernel, stride, bn):
    return (nn.ConvTranspose2d(cin, cout, kernel, stride, 1), batch_norm(cout, bn),
            nn.ReLU(inplace=True))


def _net28(cfg, d, h, log_var_head):
    bn, c = cfg.flags.bn, cfg.dataset.shape[0]
    encoder = Encoder(nn.Sequential(*down(c, h, 4, 2, bn), nn.Conv2d(h, d, 4, 2, 1)),
                      *encoder_blocks(cfg, d, log_var_head))
    decoder = Decoder(res_stack(d, cfg.network.num_rb),
                      nn.Sequential(*up(d, h, 4, 2, bn), nn.ConvTranspose2d(h, c, 4, 2, 1),
                                    nn.Sigmoid()))
    return encoder, decoder


def _net32_or_64(cfg, d, h, log_var_head):
    """32 x 32 (the stem's last conv with BatchNorm and ReLU, num_rb decoder ResBlocks) or
    64 x 64 (a bare last conv, num_rb - 1 decoder ResBlocks)."""
    bn, (c, side, _) = cfg.flags.bn, cfg.dataset.shape
    stem = [*down(c, h, 4, 2, bn), *down(h, d, 4, 2, bn)]  # created in order (see above)
    stem += down(d, d, 3, 1, bn) if side == 32 else [nn.Conv2d(d, d, 3, 1, 1)]
    encoder = Encoder(nn.Sequential(*stem), *encoder_blocks(cfg, d, log_var_head))
    decoder = Decoder(res_stack(d, cfg.network.num_rb - (side == 64)),
                      nn.Sequential(*up(d, d, 3, 1, bn), *up(d, h, 4, 2, bn),
                                    nn.ConvTranspose2d(h, c, 4, 2, 1), nn.Sigmoid()))
    return encoder, decoder


OUTPUT_ACTIVATIONS = {"exp": nn.Softplus, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                      "none": nn.Identity}


def label_channels(num_class):
    """Width of the one-hot input and the decoder output: 2 * ceil(classes / 2)."""
    return 2 * math.ceil(num_class / 2)


def _net64_label(cfg, d, h, log_var_head):
    bn, n = cfg.flags.bn, label_channels(cfg.network.num_class)
    encoder = LabelEncoder(
        n, nn.Sequential(*down(n, h, 4, 2, bn), *down(h, d, 4, 2, bn), nn.Conv2d(d, d, 4, 2, 1)),
        *encoder_blocks(cfg, d, log_var_head))
    decoder = Decoder(res_stack(d, cfg.network.num_rb - 1),
                      nn.Sequential(*up(d, d, 4, 2, bn), *up(d, h, 4, 2, bn),
                                    nn.ConvTranspose2d(h, n, 4, 2, 1),
                                    OUTPUT_ACTIVATIONS[cfg.network.act_decoder]()))
    return encoder, decoder


# (network.name, (H, W) its stem takes) -> builder(cfg, D, D // 2, log-variance head) ->
# (encoder, decoder); which dataset has which shape is configs/registry.py's.
NETWORK_REGISTRY = {
    ("resnet", (28, 28)): _net28,
    ("resnet", (32, 32)): _net32_or_64,
    ("resnet", (64, 64)): _net32_or_64,
    ("resnet_label", (64, 64)): _net64_label,
}
# The channels each network family reads.
NETWORK_CHANNELS = {"resnet": (1, 3), "resnet_label": (1,)}


def build_networks(cfg, log_var_head=False):
    name, shape = cfg.network.name, tuple(cfg.dataset.shape)
    key = (name, shape[1:])
    if key not in NETWORK_REGISTRY or shape[0] not in NETWORK_CHANNELS.get(name, ()):
        raise ValueError(f"no network '{name}' for inputs of shape {shape} "
                         f"(dataset {cfg.dataset.name}); available: "
                         + ", ".join(f"{n} {NETWORK_CHANNELS[n]} x {size}"
                                     for n, size in NETWORK_REGISTRY))
    d = cfg.quantization.dim_code
    return NETWORK_REGISTRY[key](cfg, d, d // 2, log_var_head)
