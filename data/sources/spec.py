"""What a dataset module declares, and what its reader hands the loaders.

Each dataset is one module of this package with a module-level ``SOURCE``, a ``Source``:
its name (the ``dataset.name`` that configs/registry.py lists), what its items are, their
shape, and ``read(cfg, split, recorded)``, which returns one split in one of three forms:

* ``Arrays``: the whole split in memory (parsed files: idx files, pickled batches);
* ``Files``: one file per item, decoded by ``decode`` in the loader's workers or once into the
  decoded cache (``data.cache``) under ``<path_dataset>/cache/<cache>.npy``;
* ``Decoded``: rows of an array the reader has decoded already (a folder of pictures, decoded
  by ``data.pictures``), with the file name of each row and what a run folder records of them.

``recorded`` is None, or what a run folder recorded of the files each split used (a
``Decoded`` split's ``record``, by split), so that a run evaluated or resumed later reads the
same files; readers of fixed file sets ignore it.
"""
from typing import Callable, NamedTuple, Optional


class Arrays(NamedTuple):
    """A split in memory: uint8 N x C x H x W items and int64 N labels."""

    images: object
    labels: object


class Files(NamedTuple):
    """A split read one file per item: the paths in the split's order, ``decode(path)`` ->
    uint8 C x H x W, and the stem of the split's decoded cache under <path_dataset>/cache/."""

    paths: list
    decode: Callable
    cache: str


class Decoded(NamedTuple):
    """A split already decoded: the rows ``rows`` of the uint8 N x C x H x W ``array`` (a
    memory map or in memory), ``names`` (the file of each row, relative to the folder read),
    and ``record``, what a run folder keeps of the split (plain JSON data)."""

    array: object
    rows: object
    names: list
    record: dict


class Source(NamedTuple):
    """What a dataset's name implies in data/: everything about it is in its own module."""

    name: str                 # dataset.name, as configs/registry.py lists it
    items: str                # "images" (values 0..255, given to the model in [0, 1]) or "labels"
    shape: Optional[tuple]    # (C, H, W) of every item; None: the config chooses it
    read: Callable            # read(cfg, split, recorded) -> Arrays | Files | Decoded
    # n_official_train -> (n_train, n_val), for a dataset whose validation split is carved
    # off an official training split; None where the splits come from the files themselves.
    split_sizes: Optional[Callable] = None
