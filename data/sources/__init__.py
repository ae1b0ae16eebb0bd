"""The datasets: one module per dataset in this package, each declaring ``SOURCE`` (a
``spec.Source``: its name, items, shape and reader), plus the modules they share:

* ``spec``: what a module declares, and the three forms a reader returns a split in;
* ``layouts``: this project's folder layout and the authors' (sony/sqvae), downloads into
  ours, the validation split carved off an official training split, the array cache.

Nothing registers itself on import: ``discover()`` imports every module of this package
and collects the ``SOURCE`` each declares, once, when a dataset is first asked for. The
recipe for a new dataset is in docs/code-map.md.
"""
import importlib
import pkgutil

from .layouts import DOWNLOAD_TIMEOUT_S, NO_DOWNLOAD_ENV, SPLITS, download_disabled
from .spec import Arrays, Decoded, Files, Source

__all__ = ["Arrays", "DOWNLOAD_TIMEOUT_S", "Decoded", "Files", "NO_DOWNLOAD_ENV", "SPLITS",
           "Source", "discover", "download_disabled", "source", "split_sizes"]

_FOUND = None


def discover():
    """{dataset.name: Source} of every module in this package that declares a SOURCE."""
    global _FOUND
    if _FOUND is None:
        found = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            declared = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SOURCE",
                               None)
            if declared is None:
                continue
            if not isinstance(declared, Source):
                raise TypeError(f"{__name__}.{info.name}.SOURCE is not a spec.Source")
            if declared.name in found:
                raise ValueError(f"dataset {declared.name} is declared twice (in "
                                 f"{found[declared.name][1]} and {info.name})")
            found[declared.name] = (declared, info.name)
        _FOUND = {name: declared for name, (declared, _) in found.items()}
    return _FOUND


def source(name):
    """The Source of the dataset `name`."""
    sources = discover()
    if name not in sources:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(sources))}")
    return sources[name]


def split_sizes(dataset_name, n_official_train):
    """(n_train, n_val) that `dataset_name` carves from an official training split of
    `n_official_train` images."""
    declared = source(dataset_name)
    if declared.split_sizes is None:
        carving = sorted(n for n, s in discover().items() if s.split_sizes is not None)
        raise ValueError(f"split_sizes is for {', '.join(carving)}, not {dataset_name!r} "
                         "(its splits come from its own files)")
    return declared.split_sizes(n_official_train)
