"""The four encoder/decoder pairs of SPEC 2, chosen by (dataset, network.name).

Every encoder returns ``(mean, log_var)``, where ``log_var`` is None unless the
quantizer needs a variance head (``flags.var_q``). Decoders map a quantized
latent back to data space. D is the code dimension, D/2 the hidden width.
"""
import math

import torch.nn.functional as F
from torch import nn

from .blocks import ResBlock, batch_norm, res_stack


class Encoder(nn.Module):
    """A downsampling stem, `num_rb - 1` ResBlocks, a mean head and an optional variance head."""

    def __init__(self, stem, dim, num_rb, bn, var_q):
        super().__init__()
        self.stem = stem
        self.res = res_stack(dim, num_rb - 1, bn)
        self.head_mean = ResBlock(dim, bn)
        self.head_log_var = ResBlock(dim, bn) if var_q else None

    def prepare(self, x):
        return x

    def forward(self, x):
        h = self.res(self.stem(self.prepare(x)))
        log_var = self.head_log_var(h) if self.head_log_var is not None else None
        return self.head_mean(h), log_var


class LabelEncoder(Encoder):
    """Encoder for integer label maps: one-hot to `num_channels` planes first."""

    def __init__(self, stem, dim, num_rb, bn, var_q, num_channels):
        super().__init__(stem, dim, num_rb, bn, var_q)
        self.num_channels = num_channels

    def prepare(self, x):
        labels = x.long().squeeze(1)
        weight = self.stem[0].weight  # follow the model's dtype (float32, or float64 in tests)
        return F.one_hot(labels, self.num_channels).permute(0, 3, 1, 2).to(weight.dtype)


class Decoder(nn.Module):
    """ResBlocks, then an upsampling head that ends in the output activation."""

    def __init__(self, dim, num_res, bn, head):
        super().__init__()
        self.res = res_stack(dim, num_res, bn)
        self.head = head

    def forward(self, z):
        return self.head(self.res(z))


def _net28(cfg, d, h):
    bn = cfg.flags.bn
    stem = nn.Sequential(
        nn.Conv2d(1, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.Conv2d(h, d, 4, 2, 1))
    head = nn.Sequential(
        nn.ConvTranspose2d(d, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.ConvTranspose2d(h, 1, 4, 2, 1), nn.Sigmoid())
    return Encoder(stem, d, cfg.network.num_rb, bn, cfg.flags.var_q), \
        Decoder(d, cfg.network.num_rb, bn, head)


def _net32(cfg, d, h):
    bn = cfg.flags.bn
    stem = nn.Sequential(
        nn.Conv2d(3, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.Conv2d(h, d, 4, 2, 1), batch_norm(d, bn), nn.ReLU(),
        nn.Conv2d(d, d, 3, 1, 1), batch_norm(d, bn), nn.ReLU())
    head = nn.Sequential(
        nn.ConvTranspose2d(d, d, 3, 1, 1), batch_norm(d, bn), nn.ReLU(),
        nn.ConvTranspose2d(d, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.ConvTranspose2d(h, 3, 4, 2, 1), nn.Sigmoid())
    return Encoder(stem, d, cfg.network.num_rb, bn, cfg.flags.var_q), \
        Decoder(d, cfg.network.num_rb, bn, head)


def _net64(cfg, d, h):
    bn = cfg.flags.bn
    stem = nn.Sequential(
        nn.Conv2d(3, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.Conv2d(h, d, 4, 2, 1), batch_norm(d, bn), nn.ReLU(),
        nn.Conv2d(d, d, 3, 1, 1))
    head = nn.Sequential(
        nn.ConvTranspose2d(d, d, 3, 1, 1), batch_norm(d, bn), nn.ReLU(),
        nn.ConvTranspose2d(d, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.ConvTranspose2d(h, 3, 4, 2, 1), nn.Sigmoid())
    return Encoder(stem, d, cfg.network.num_rb, bn, cfg.flags.var_q), \
        Decoder(d, cfg.network.num_rb - 1, bn, head)


OUTPUT_ACTIVATIONS = {"exp": nn.Softplus, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                      "none": nn.Identity}


def label_channels(num_class):
    """Width of the one-hot input and the decoder output: 2 * ceil(classes / 2)."""
    return 2 * math.ceil(num_class / 2)


def _net64_label(cfg, d, h):
    bn = cfg.flags.bn
    n = label_channels(cfg.network.num_class)
    stem = nn.Sequential(
        nn.Conv2d(n, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.Conv2d(h, d, 4, 2, 1), batch_norm(d, bn), nn.ReLU(),
        nn.Conv2d(d, d, 4, 2, 1))
    head = nn.Sequential(
        nn.ConvTranspose2d(d, d, 4, 2, 1), batch_norm(d, bn), nn.ReLU(),
        nn.ConvTranspose2d(d, h, 4, 2, 1), batch_norm(h, bn), nn.ReLU(),
        nn.ConvTranspose2d(h, n, 4, 2, 1), OUTPUT_ACTIVATIONS[cfg.network.act_decoder]())
    return LabelEncoder(stem, d, cfg.network.num_rb, bn, cfg.flags.var_q, n), \
        Decoder(d, cfg.network.num_rb - 1, bn, head)


# (dataset, network.name) -> builder(cfg, D, D // 2) -> (encoder, decoder)
NETWORK_REGISTRY = {
    ("MNIST", "resnet"): _net28,
    ("FashionMNIST", "resnet"): _net28,
    ("CIFAR10", "resnet"): _net32,
    ("CelebA", "resnet"): _net64,
    ("CelebAMask_HQ", "resnet_label"): _net64_label,
}


def build_networks(cfg):
    key = (cfg.dataset.name, cfg.network.name)
    if key not in NETWORK_REGISTRY:
        raise ValueError(f"no network '{cfg.network.name}' for dataset {cfg.dataset.name}; "
                         "available: " + ", ".join(f"{d}/{n}" for d, n in NETWORK_REGISTRY))
    d = cfg.quantization.dim_code
    return NETWORK_REGISTRY[key](cfg, d, d // 2)
