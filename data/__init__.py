"""Datasets and batch loaders: one module per dataset under ``data/sources/`` (the recipe for
a new one is in docs/code-map.md).

``build_loader(cfg, split, batch_size=..., shuffle=...)`` is the entry point; files live
under ``cfg.path_dataset`` (default ``./datasets``) as each dataset's module says.
``build_picture_loader(cfg, folder, ...)`` reads every picture under any folder at a
config's shape. Set ``SQVAE_NO_DOWNLOAD=1`` to never try downloading missing datasets.
Datasets read from image files are decoded once into a cache (``data.cache``) unless
``cache_decoded`` is False.
"""
import importlib

from .errors import DatasetError
from .sources import SPLITS, split_sizes

# The loaders import torch: loaded on first use, so that `python -m data.prepare_celebamask_hq
# --help` (which imports this package first) answers before torch is imported.
_LOADER_NAMES = ("CachedLoader", "DecodedLoader", "FileLoader", "InMemoryLoader", "Loader",
                 "build_loader", "build_loaders", "build_picture_loader", "per_rank_batch",
                 "recorded_files")


def __getattr__(name):
    if name in _LOADER_NAMES:
        return getattr(importlib.import_module(".loader", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CachedLoader", "DatasetError", "DecodedLoader", "FileLoader", "InMemoryLoader", "Loader",
    "SPLITS", "build_loader", "build_loaders", "build_picture_loader", "per_rank_batch",
    "recorded_files", "split_sizes",
]
