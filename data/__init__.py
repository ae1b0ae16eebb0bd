"""Datasets and batch loaders: MNIST, FashionMNIST, CIFAR10, CelebA, CelebAMask_HQ.

``build_loader(cfg, split, batch_size=..., shuffle=...)`` is the entry point; files
live under ``cfg.path_dataset`` (default ``./datasets``) in torchvision's layout, or in
the authors' (sony/sqvae) layout, see ``data.sources``.
Set ``SQVAE_NO_DOWNLOAD=1`` to never try downloading missing datasets. CelebA and
CelebAMask-HQ are decoded once into ``<path_dataset>/cache/`` (``data.cache``) unless
``cache_decoded`` is False.
"""
from .decode import decode_celeba, decode_celebamask_label
from .errors import DatasetError
from .loader import (DATASETS, CachedLoader, FileLoader, InMemoryLoader, Loader,
                     build_loader, build_loaders, per_rank_batch)
from .sources import SPLITS, split_sizes

__all__ = [
    "DATASETS", "CachedLoader", "DatasetError", "FileLoader", "InMemoryLoader", "Loader",
    "SPLITS", "build_loader", "build_loaders", "decode_celeba", "decode_celebamask_label",
    "per_rank_batch", "split_sizes",
]
