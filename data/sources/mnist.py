"""MNIST, and its format's reader that Fashion-MNIST shares: four idx files (plain or ``.gz``) in
``<Name>/raw``, read by torchvision; the last 10,000 of the 60,000 training images validate."""
import functools
import gzip
import os
import zlib

import torchvision.datasets as tvd

from util.io import atomic_write_bytes
from util.text import one_line

from ..errors import DatasetError
from .layouts import carve_val, carved_split_sizes, find_folder
from .spec import Arrays, Reads, Source

SIDE = 28
TINY_VAL_DIVISOR = 6  # the validation share of a file smaller than the real one: 10,000 of 60,000
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _refused(path, error):
    """The error for a file the file system refuses (permissions, I/O): not known corrupt."""
    return DatasetError(f"cannot read {path}: {error.strerror}; make it readable "
                        "(it is not known to be corrupt)")


def _read_idx(path, reader):
    """`reader` (torchvision's idx reader of images or labels) on `path`, as a numpy array."""
    try:
        return reader(path).numpy()
    except Exception as e:  # the reader fails on bad files with whatever type comes up
        if isinstance(e, OSError) and e.errno:
            raise _refused(path, e) from None
        reason = f"{type(e).__name__}: {one_line(e)}" if one_line(e) else type(e).__name__
    fix = (f"delete it to extract {os.path.basename(path)}.gz again, or "
           if os.path.isfile(path + ".gz") else "") + "download it again"
    raise DatasetError(f"{path} is truncated or corrupt ({reason[:160]}"
                       f"{'...' if len(reason) > 160 else ''}); {fix}")


def _read_mnist_pair(dataset_name, images_path, labels_path):
    # Read through the module, where the tests count the reads.
    images = _read_idx(images_path, tvd.mnist.read_image_file)
    labels = _read_idx(labels_path, tvd.mnist.read_label_file)
    if images.shape[1:] != (SIDE, SIDE):
        raise DatasetError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} "
                           f"images; {dataset_name} images are {SIDE}x{SIDE}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                           f"{len(labels)} labels; the pair must match")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path} holds label {int(labels.max())}; "
                           f"{dataset_name} labels are 0..9")
    return images[:, None], labels


def load_mnist_like(dataset_name, root, reads=None):
    """{'train', 'val', 'test'} -> (uint8 N x 1 x 28 x 28, int64 N), read once per `reads`."""
    reads = reads or Reads()
    raw_dir = find_folder(
        reads, dataset_name, root, (dataset_name, "raw"), hint=" (or the same names with .gz)",
        missing=lambda folder: [name for name in MNIST_FILES if not any(
            os.path.isfile(os.path.join(folder, name + ext)) for ext in ("", ".gz"))],
        download=lambda: getattr(tvd, dataset_name)(root, download=True))
    paths = [os.path.join(raw_dir, name) for name in MNIST_FILES]
    # A file present only as .gz is decompressed (torchvision reads only the uncompressed files),
    # renamed into place once complete: never a short file that looks like data.
    for path in (path for path in paths if not os.path.isfile(path)):
        try:
            with gzip.open(path + ".gz", "rb") as f:
                payload = f.read()
        except (OSError, EOFError, zlib.error) as e:
            if getattr(e, "errno", None):
                raise _refused(path + ".gz", e) from None
            raise DatasetError(f"cannot decompress {path}.gz: {one_line(e)} "
                               "(truncated or corrupt; download it again)") from None
        try:
            atomic_write_bytes(path, payload)
        except OSError as e:
            raise DatasetError(f"cannot extract {path}.gz to {path}: {e.strerror}; make {raw_dir} "
                               "writable or decompress it there yourself (gunzip -k)") from None
    return reads.kept(dataset_name, paths, lambda: carve_val(
        _read_mnist_pair(dataset_name, *paths[:2]), _read_mnist_pair(dataset_name, *paths[2:]),
        functools.partial(split_sizes, dataset_name)))


split_sizes = functools.partial(carved_split_sizes, tiny_val_divisor=TINY_VAL_DIVISOR)


def mnist_format(dataset_name):
    """The Source of a dataset in MNIST's format, named as torchvision names it."""
    return Source(dataset_name, lambda cfg, split, recorded=None: Arrays(*load_mnist_like(
        dataset_name, os.path.abspath(cfg.path_dataset), Reads.of(cfg))[split]),
        functools.partial(split_sizes, dataset_name))


SOURCE = mnist_format("MNIST")
