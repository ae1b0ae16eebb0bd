"""CIFAR10: the five training batches and the test batch of ``cifar-10-batches-py``, pickles
read by a restricted unpickler. The last 10,000 of the 50,000 training images validate."""
import codecs
import functools
import os
import pickle

import numpy as np
import torchvision.datasets as tvd

from util.text import one_line

from ..errors import DatasetError
from .layouts import carve_val, carved_split_sizes, find_folder
from .spec import Arrays, Reads, Source

NAME, SHAPE, CIFAR10_DIR = "CIFAR10", (3, 32, 32), "cifar-10-batches-py"
TINY_VAL_DIVISOR = 5  # the validation share of a set smaller than the real one: 10,000 of 50,000
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")  # train, then test

# Not torchvision's reader: its plain pickle.load would run whatever a tampered batch names
# (os.system included). The official batches name only these globals; their dicts, lists,
# strings and ints are built by opcodes that need no lookup.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]  # protocol 5's: an array from its raw buffer
_CIFAR_GLOBALS = {
    # The official files were written by numpy 1.x; numpy 2 moved the module to _core.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # Python 3's bytes at protocol 2 (a re-saved copy)
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A global the official batches never name; the message is its qualified name."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:  # protocol 2 names Python 2's builtins module
            raise _RefusedGlobal(f"{'builtins' if module == '__builtin__' else module}.{name}")
        return _CIFAR_GLOBALS[(module, name)]


def _read_cifar_batch(path):
    def bad(problem):
        return DatasetError(f"CIFAR10 batch {path} {problem}")

    try:
        with open(path, "rb") as f:
            # latin1: what the official Python 2 pickles need to restore their arrays.
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise bad(f"holds a pickled {e}, which is refused: only numpy arrays, lists, bytes, str "
                  "and int are allowed; download the official files again") from None
    except Exception as e:  # a damaged pickle can raise almost any exception type
        raise DatasetError(f"cannot read CIFAR10 batch {path}: {type(e).__name__}: {one_line(e)} "
                           "(truncated or corrupt; extract cifar-10-python.tar.gz again)") from None
    if not isinstance(batch, dict):
        raise bad(f"holds a {type(batch).__name__}, expected a dict with 'data' and 'labels'")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise bad(f"lacks 'data' or 'labels' (keys: {', '.join(map(str, batch))})")
    data = np.asarray(batch["data"])
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise bad(f"has labels that are not integers ({one_line(e)})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(SHAPE):
        raise bad(f"has data of shape {data.shape} and dtype {data.dtype}; expected uint8 N x 3072")
    if labels.shape != (len(data),):
        raise bad(f"has {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise bad("holds labels outside 0..9")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major.
    return data.reshape(-1, *SHAPE), labels


split_sizes = functools.partial(carved_split_sizes, NAME, tiny_val_divisor=TINY_VAL_DIVISOR)


def read(cfg, split, recorded=None):
    """One split as (uint8 N x 3 x 32 x 32, int64 N), the files read once per command."""
    root, reads = os.path.abspath(cfg.path_dataset), Reads.of(cfg)
    folder = find_folder(
        reads, NAME, root, (CIFAR10_DIR,), hint=" (extracted from cifar-10-python.tar.gz)",
        missing=lambda folder: [name for name in CIFAR10_FILES
                                if not os.path.isfile(os.path.join(folder, name))],
        # Download and extract only: tvd.CIFAR10 would also unpickle every batch.
        download=lambda: tvd.utils.download_and_extract_archive(
            tvd.CIFAR10.url, root, filename=tvd.CIFAR10.filename, md5=tvd.CIFAR10.tgz_md5))
    paths = [os.path.join(folder, n) for n in CIFAR10_FILES]

    def parse():
        images, labels = zip(*(_read_cifar_batch(path) for path in paths[:-1]))
        return carve_val((np.concatenate(images), np.concatenate(labels)),
                         _read_cifar_batch(paths[-1]), split_sizes)

    return Arrays(*reads.kept(NAME, paths, parse)[split])


SOURCE = Source(NAME, read, split_sizes)
