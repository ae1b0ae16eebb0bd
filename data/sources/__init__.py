"""One module per dataset declaring ``SOURCE`` (spec.Source) and what they share (spec, layouts)."""
import functools
import importlib
import pkgutil

from .layouts import DOWNLOAD_TIMEOUT_S, NO_DOWNLOAD_ENV, SPLITS
from .spec import Arrays, Decoded, Files, Reads, Source

__all__ = ["Arrays", "DOWNLOAD_TIMEOUT_S", "Decoded", "Files", "NO_DOWNLOAD_ENV", "Reads",
           "SPLITS", "Source", "discover", "source", "split_sizes"]


@functools.lru_cache(maxsize=None)
def discover():
    """{dataset.name: Source} of every module in this package that declares a SOURCE."""
    found, module_of = {}, {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        declared = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SOURCE", None)
        if declared is None:
            continue
        if not isinstance(declared, Source):
            raise TypeError(f"{__name__}.{info.name}.SOURCE is not a spec.Source")
        if declared.name in found:
            raise ValueError(f"dataset {declared.name} is declared twice (in "
                             f"{module_of[declared.name]} and {info.name})")
        found[declared.name], module_of[declared.name] = declared, info.name
    return found


def source(name):
    """The Source of the dataset `name`."""
    sources = discover()
    if name not in sources:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(sources))}")
    return sources[name]


def split_sizes(dataset_name, n_official_train):
    """(n_train, n_val) that `dataset_name` carves from an official training split."""
    declared = source(dataset_name)
    if declared.split_sizes is None:
        carving = sorted(n for n, s in discover().items() if s.split_sizes is not None)
        raise ValueError(f"split_sizes is for {', '.join(carving)}, not {dataset_name!r} "
                         "(its splits come from its own files)")
    return declared.split_sizes(n_official_train)
