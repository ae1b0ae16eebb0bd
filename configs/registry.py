"""The one table of names (datasets, models, quantizer variants) and what config validation
derives from them; everything else a name implies lives with its implementation (its module
under data/sources/, networks.quantizers.GAUSSIAN_VARIANCES). Plain data, importing nothing."""
from typing import NamedTuple


class Dataset(NamedTuple):
    """What a dataset's name implies."""

    shape: tuple   # (C, H, W) of one item: dataset.shape, and dim_x = C * H * W
    network: str   # the network.name whose encoder/decoder read it
    items: str     # "images" (values in [0, 1]) or "labels" (one class index per pixel)
    # Pictures the config sizes: the dataset.image_size and .channels it takes (first: default).
    sizes: tuple = ()
    channels: tuple = ()


DATASETS = {  # dataset.name -> its Dataset; the first is the default.
    "MNIST": Dataset((1, 28, 28), "resnet", "images"),
    "FashionMNIST": Dataset((1, 28, 28), "resnet", "images"),
    "CIFAR10": Dataset((3, 32, 32), "resnet", "images"),
    "CelebA": Dataset((3, 64, 64), "resnet", "images"),
    "CelebAMask_HQ": Dataset((1, 64, 64), "resnet_label", "labels"),
    "ImageFolder": Dataset((3, 64, 64), "resnet", "images", (64, 32, 28), (3, 1)),
}

# model.param_var_q: Gaussian I-IV (networks/quantizers.py GAUSSIAN_VARIANCES), vMF; first: default.
VARIANTS = ("gaussian_1", "gaussian_2", "gaussian_3", "gaussian_4", "vmf")


class Model(NamedTuple):
    """What a model accepts."""

    items: str              # what it reconstructs: the datasets whose items are these
    variants: tuple         # the model.param_var_q values it takes; () every one
    codebook_inits: tuple   # the quantization.init values it takes
    ema: bool               # whether it takes quantization.ema True
    extra_code_dim: int     # quantization.dim_code = quantization.dim_dict + this


MODELS = {  # The release's N(0, 1) codebooks; VQ-VAE as Gaussian I; vMF codes one wider.
    "GaussianSQVAE": Model("images", (), ("normal",), False, 0),
    "VmfSQVAE": Model("labels", ("vmf",), ("normal",), False, 1),
    "VQVAE": Model("images", ("gaussian_1",), ("normal", "uniform"), True, 0),
}

# network.name: the encoder/decoder families the datasets above name.
NETWORKS = tuple(dict.fromkeys(spec.network for spec in DATASETS.values()))
# quantization.init: N(0, 1) rows (the SQ-VAE release's) or uniform(-1/K, 1/K) (VQ-VAE).
CODEBOOK_INITS = ("normal", "uniform")
ACTIVATIONS = ("exp", "sigmoid", "tanh", "none")  # network.act_decoder (the label decoder's output)
