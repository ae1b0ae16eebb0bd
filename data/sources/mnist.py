"""MNIST, and the reader of its format, which Fashion-MNIST shares (``fashion_mnist.py``):
four idx files, parsed by torchvision.

The files sit in ``<Name>/raw`` (torchvision's folder), uncompressed or as ``.gz``. The
validation split is the last 10,000 of the 60,000 training images (1/6 of a smaller file).
"""
import functools
import gzip
import os
import zlib

import torchvision.datasets as tvd

from util.text import one_line
from util.io import atomic_write_bytes

from ..errors import DatasetError
from .layouts import cached, carve_val, carved_split_sizes, find_folder
from .spec import Arrays, Source

SHAPE = (1, 28, 28)
# Validation share of a file smaller than the real one: 10,000 of 60,000.
TINY_VAL_DIVISOR = 6
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _has_mnist_file(raw_dir, name):
    return any(os.path.isfile(os.path.join(raw_dir, name + ext)) for ext in ("", ".gz"))


def _missing_mnist_files(raw_dir):
    return [n for n in MNIST_FILES if not _has_mnist_file(raw_dir, n)]


def _extract_gz(raw_dir):
    """Decompress each idx file that is only present as .gz, beside it.

    torchvision reads only the uncompressed files (its download extracts them), while
    a user may have just the .gz files. The file is renamed into place once complete,
    so an interrupted extraction never leaves a short file that looks like data.
    """
    for name in MNIST_FILES:
        path = os.path.join(raw_dir, name)
        if os.path.isfile(path):
            continue
        gz = path + ".gz"
        try:
            with gzip.open(gz, "rb") as f:
                payload = f.read()
        except (OSError, EOFError, zlib.error) as e:
            if getattr(e, "errno", None):  # the file system refused (permissions, I/O)
                raise DatasetError(f"cannot read {gz}: {e.strerror}; make it readable "
                                   "(it is not known to be corrupt)") from None
            raise DatasetError(f"cannot decompress {gz}: {one_line(e)} "
                               "(truncated or corrupt; download it again)") from None
        try:
            atomic_write_bytes(path, payload)
        except OSError as e:
            raise DatasetError(f"cannot extract {gz} to {path}: {e.strerror}; make "
                               f"{raw_dir} writable or decompress it there yourself "
                               "(gunzip -k)") from None


def _file_in_traceback(error, paths):
    # torchvision raises bare assertion, shape and type errors from its idx reader,
    # which do not say which file they came from; the reader's frame still holds the
    # path it was given. None when that cannot be found (e.g. another torchvision).
    by_norm = {os.path.normpath(p): p for p in paths}
    found = None
    tb = error.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("path")
        if isinstance(candidate, (str, os.PathLike)):
            found = by_norm.get(os.path.normpath(candidate), found)
        tb = tb.tb_next
    return found


def _corrupt_mnist_error(error, images_path, labels_path):
    culprit = _file_in_traceback(error, (images_path, labels_path))
    named = culprit or f"{images_path} or {labels_path}"
    if isinstance(error, OSError) and error.errno:  # refused, not corrupt: say so
        return DatasetError(f"cannot read {error.filename or named}: {error.strerror}; make "
                            "it readable (it is not known to be corrupt)")
    text = one_line(error)
    reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
    reason = reason[:160] + ("..." if len(reason) > 160 else "")
    fix = "download it again"
    if culprit and os.path.isfile(culprit + ".gz"):
        fix = f"delete it to extract {os.path.basename(culprit)}.gz again, or download it again"
    return DatasetError(f"{named} is truncated or corrupt ({reason}); {fix}")


def _read_mnist_pair(dataset_name, raw_dir, prefix):
    images_path = os.path.join(raw_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = os.path.join(raw_dir, f"{prefix}-labels-idx1-ubyte")
    # torchvision appends <Name>/raw to the root it is given.
    tv_root = os.path.dirname(os.path.dirname(raw_dir))
    try:
        parsed = getattr(tvd, dataset_name)(tv_root, train=prefix == "train")
    except Exception as e:  # its reader fails on bad files with whatever type comes up
        raise _corrupt_mnist_error(e, images_path, labels_path) from None
    images, labels = parsed.data.numpy(), parsed.targets.numpy()
    if images.shape[1:] != SHAPE[1:]:
        raise DatasetError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} "
                           f"images; {dataset_name} images are {SHAPE[1]}x{SHAPE[2]}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                           f"{len(labels)} labels; the pair must match")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path} holds label {int(labels.max())}; "
                           f"{dataset_name} labels are 0..9")
    return images[:, None], labels


def load_mnist_like(dataset_name, root):
    """{'train', 'val', 'test'} -> (uint8 N x 1 x 28 x 28, int64 N) for MNIST/FashionMNIST."""
    raw_dir = find_folder(
        dataset_name, root, (dataset_name, "raw"),
        complete=lambda folder: not _missing_mnist_files(folder),
        what=lambda ours: f"{', '.join(_missing_mnist_files(ours))} (or the same names "
                          "with .gz)",
        download=lambda: getattr(tvd, dataset_name)(root, train=True, download=True))
    _extract_gz(raw_dir)
    paths = [os.path.join(raw_dir, n) for n in MNIST_FILES]

    def parse():
        train = _read_mnist_pair(dataset_name, raw_dir, "train")
        test = _read_mnist_pair(dataset_name, raw_dir, "t10k")
        return carve_val(train, test, split_sizes(dataset_name, len(train[0]))[0])

    return cached(dataset_name, paths, parse)


def split_sizes(dataset_name, n_official_train):
    return carved_split_sizes(dataset_name, n_official_train, TINY_VAL_DIVISOR)


def mnist_format(dataset_name):
    """The Source of a dataset in MNIST's format, named as torchvision names it."""
    def read(cfg, split, recorded=None):
        return Arrays(*load_mnist_like(dataset_name, os.path.abspath(cfg.path_dataset))[split])

    return Source(dataset_name, "images", SHAPE, read,
                  functools.partial(split_sizes, dataset_name))


SOURCE = mnist_format("MNIST")
