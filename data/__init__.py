"""Datasets and batch loaders (``build_loader``): one module per dataset under ``data/sources/``,
its files under ``cfg.path_dataset`` (docs/usage.md; a new dataset: docs/code-map.md)."""
import importlib

from .errors import DatasetError
from .sources import SPLITS, split_sizes

# Loaded on first use: `python -m data.prepare_celebamask_hq --help` answers before torch.
_LOADER_NAMES = ("FileLoader", "InMemoryLoader", "Loader", "build_loader", "build_loaders",
                 "build_picture_loader", "per_rank_batch", "recorded_files")


def __getattr__(name):
    if name in _LOADER_NAMES:
        return getattr(importlib.import_module(".loader", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetError", "SPLITS", "split_sizes", *_LOADER_NAMES]
