"""Datasets and batch loaders: one module per dataset under ``data/sources/`` (the recipe for a
new one is in docs/code-map.md), files under ``cfg.path_dataset``; ``build_loader`` is the
entry point. ``SQVAE_NO_DOWNLOAD=1``: never try downloading a missing dataset."""
import importlib

from .errors import DatasetError
from .sources import SPLITS, split_sizes

# The loaders import torch: loaded on first use, so that `python -m data.prepare_celebamask_hq
# --help` (which imports this package first) answers before torch is imported.
_LOADER_NAMES = ("DecodedLoader", "FileLoader", "InMemoryLoader", "Loader", "build_loader",
                 "build_loaders", "build_picture_loader", "per_rank_batch", "recorded_files")


def __getattr__(name):
    if name in _LOADER_NAMES:
        return getattr(importlib.import_module(".loader", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetError", "SPLITS", "split_sizes", *_LOADER_NAMES]
