"""Finding, downloading and parsing each dataset's files under the dataset root.

Nothing here builds tensors or loaders; it returns numpy arrays (in-memory datasets)
or file lists (file-backed datasets) split into train/val/test.
"""
import contextlib
import gzip
import math
import os
import pickle
import re
import socket
import zlib

import numpy as np

from .errors import DatasetError, one_line

SPLITS = ("train", "val", "test")
NO_DOWNLOAD_ENV = "SQVAE_NO_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 10

# Validation size carved off the end of the official training split.
VAL_SIZE = 10_000
# Below this many training images the file is a toy (a test fixture or a subset),
# where a fixed 10,000 would leave nothing to train on.
MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL = 20_000
_TINY_VAL_DIVISOR = {"MNIST": 6, "FashionMNIST": 6, "CIFAR10": 5}

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CELEBA_DIR = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBAMASK_DIR = "CelebAMask-HQ"
_CELEBA_PARTITION_OF_SPLIT = {"train": 0, "val": 1, "test": 2}
_LABEL_NAME = re.compile(r"^(\d+)\.png$")


def split_sizes(dataset_name, n_official_train):
    """(n_train, n_val) carved from the official training split, train first.

    Real files (>= 20,000 images) keep the fixed rule: the last 10,000 validate, so
    MNIST/FashionMNIST give 50,000/10,000 and CIFAR10 40,000/10,000. Only smaller
    (tiny, fixture-sized) files get a proportional split instead: 1/6 validation for
    MNIST-like data and 1/5 for CIFAR10, the same ratios as the real sizes.
    """
    if dataset_name not in _TINY_VAL_DIVISOR:
        raise ValueError(f"split_sizes is for MNIST, FashionMNIST and CIFAR10, "
                         f"not {dataset_name!r} (its splits come from its own files)")
    n = int(n_official_train)
    if n >= MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL:
        return n - VAL_SIZE, VAL_SIZE
    if n < 2:
        raise DatasetError(f"{dataset_name} training file holds {n} image(s); "
                           "at least 2 are needed to split off a validation set")
    n_val = max(1, n // _TINY_VAL_DIVISOR[dataset_name])
    return n - n_val, n_val


# ---------------------------------------------------------------- download

def download_disabled():
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def _socket_timeout(seconds):
    # torchvision's urllib calls have no timeout of their own; without one a machine
    # with no route out can hang for minutes before reporting the dataset missing.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _short_reason(error):
    """The gist of a download failure: no network is the common case and says it all."""
    text = one_line(error)
    for marker in ("Name or service not known", "Temporary failure in name resolution",
                   "Network is unreachable", "timed out"):
        if marker in text:
            return "no network"
    return f"{type(error).__name__}: {text[:120]}" + ("..." if len(text) > 120 else "")


def try_download(dataset_name, root):
    """Ask torchvision to download a dataset; return a short note for error messages.

    Failure is expected offline and is never raised here: the caller re-checks the
    files and reports what is still missing.
    """
    if download_disabled():
        return f"download skipped: {NO_DOWNLOAD_ENV}=1"
    try:
        import torchvision.datasets as tvd
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            if dataset_name == "MNIST":
                tvd.MNIST(root, train=True, download=True)
            elif dataset_name == "FashionMNIST":
                tvd.FashionMNIST(root, train=True, download=True)
            elif dataset_name == "CIFAR10":
                tvd.CIFAR10(root, train=True, download=True)
            elif dataset_name == "CelebA":
                tvd.CelebA(root, split="all", download=True)
            else:
                return "no automatic download"
    except Exception as e:  # any failure (no network, quota, bad archive) means "not here"
        return f"download failed: {_short_reason(e)}"
    return "download attempted"


# ---------------------------------------------------------------- cache

# Parsed arrays per (dataset, files with their size and mtime): train and val loaders
# of one process share a single read, and a replaced file is read afresh.
_ARRAY_CACHE = {}


def clear_cache():
    """Forget parsed arrays (frees memory; the next loader reads the files again)."""
    _ARRAY_CACHE.clear()


def _signature(paths):
    sig = []
    for p in paths:
        st = os.stat(p)
        sig.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _cached(key_name, paths, parse):
    key = (key_name, _signature(paths))
    if key not in _ARRAY_CACHE:
        _ARRAY_CACHE[key] = parse()
    return _ARRAY_CACHE[key]


# ---------------------------------------------------------------- MNIST-like (idx files)

def _find_mnist_file(raw_dir, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(raw_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_raw_bytes(path):
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return np.frombuffer(bytearray(f.read()), dtype=np.uint8)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"cannot decompress {path}: {one_line(e)} "
                               "(truncated or corrupt; download it again)") from None
    return np.fromfile(path, dtype=np.uint8)


def read_idx(path, ndim):
    """An idx file (big-endian header, ubyte payload) as a uint8 array of its dims."""
    raw = _read_raw_bytes(path)
    expected_magic = 0x0800 + ndim
    header = 4 + 4 * ndim
    if raw.size < header:
        raise DatasetError(f"{path} is truncated: {raw.size} bytes, shorter than its "
                           f"{header}-byte idx header")
    magic = int.from_bytes(raw[:4].tobytes(), "big")
    if magic != expected_magic:
        raise DatasetError(f"{path} is not an idx{ndim}-ubyte file: magic number "
                           f"{magic:#010x}, expected {expected_magic:#010x}")
    dims = [int(d) for d in np.frombuffer(raw[4:header].tobytes(), dtype=">u4")]
    expected = header + math.prod(dims)
    if raw.size != expected:
        raise DatasetError(f"{path} is truncated or corrupt: its header (dims {dims}) "
                           f"needs {expected} bytes, the file has {raw.size}")
    return raw[header:].reshape(dims)


def _mnist_missing_error(dataset_name, root, missing, note):
    raw_dir = os.path.join(root, dataset_name, "raw")
    return DatasetError(
        f"{dataset_name} not found under {root}: put {', '.join(missing)} "
        f"(or the same names with .gz) in {raw_dir}{os.sep} ({note})")


def _parse_mnist_pair(dataset_name, images_path, labels_path):
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} "
                           f"images; {dataset_name} images are 28x28")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                           f"{len(labels)} labels; the pair must match")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path} holds label {int(labels.max())}; "
                           f"{dataset_name} labels are 0..9")
    return images[:, None], labels.astype(np.int64)


def load_mnist_like(dataset_name, root):
    """{'train', 'val', 'test'} -> (uint8 N x 1 x 28 x 28, int64 N) for MNIST/FashionMNIST."""
    raw_dir = os.path.join(root, dataset_name, "raw")
    paths = {n: _find_mnist_file(raw_dir, n) for n in MNIST_FILES}
    if any(p is None for p in paths.values()):
        note = try_download(dataset_name, root)
        paths = {n: _find_mnist_file(raw_dir, n) for n in MNIST_FILES}
        missing = [n for n, p in paths.items() if p is None]
        if missing:
            raise _mnist_missing_error(dataset_name, root, missing, note)
    ordered = [paths[n] for n in MNIST_FILES]

    def parse():
        train = _parse_mnist_pair(dataset_name, ordered[0], ordered[1])
        test = _parse_mnist_pair(dataset_name, ordered[2], ordered[3])
        return _carve_val(dataset_name, train, test)

    return _cached(dataset_name, ordered, parse)


def _carve_val(dataset_name, train, test):
    images, labels = train
    n_train, _ = split_sizes(dataset_name, len(images))
    # Slices, not copies: the three splits stay views of the arrays read from disk.
    return {"train": (images[:n_train], labels[:n_train]),
            "val": (images[n_train:], labels[n_train:]),
            "test": test}


# ---------------------------------------------------------------- CIFAR10 (pickles)

def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            # latin1 is what the Python 2 pickles of the official release need to
            # restore their numpy arrays.
            batch = pickle.load(f, encoding="latin1")
    except Exception as e:  # a damaged pickle can raise almost any exception type
        raise DatasetError(f"cannot read CIFAR10 batch {path}: {type(e).__name__}: "
                           f"{one_line(e)} (truncated or corrupt; extract "
                           "cifar-10-python.tar.gz again)") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"CIFAR10 batch {path} holds a {type(batch).__name__}, "
                           "expected a dict with 'data' and 'labels'")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"CIFAR10 batch {path} lacks 'data' or 'labels' "
                           f"(keys: {', '.join(map(str, batch))})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"CIFAR10 batch {path} has data of shape {data.shape} and "
                           f"dtype {data.dtype}; expected uint8 N x 3072")
    if labels.shape != (len(data),):
        raise DatasetError(f"CIFAR10 batch {path} has {len(data)} images but "
                           f"{labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"CIFAR10 batch {path} holds labels outside 0..9")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root):
    """{'train', 'val', 'test'} -> (uint8 N x 3 x 32 x 32, int64 N) for CIFAR10."""
    folder = os.path.join(root, CIFAR10_DIR)
    names = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)

    def missing():
        return [n for n in names if not os.path.isfile(os.path.join(folder, n))]

    if missing():
        note = try_download("CIFAR10", root)
        still = missing()
        if still:
            raise DatasetError(
                f"CIFAR10 not found under {root}: put {', '.join(still)} (extracted from "
                f"cifar-10-python.tar.gz) in {folder}{os.sep} ({note})")
    paths = [os.path.join(folder, n) for n in names]

    def parse():
        parts = [_read_cifar_batch(p) for p in paths[:-1]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return _carve_val("CIFAR10", (images, labels), _read_cifar_batch(paths[-1]))

    return _cached("CIFAR10", paths, parse)


# ---------------------------------------------------------------- CelebA (JPEG files)

def _read_celeba_partition(path):
    splits = {0: [], 1: [], 2: []}
    with open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetError(f"{path} line {lineno} reads {line.strip()!r}; "
                                   "expected '<name>.jpg <0|1|2>'")
            splits[int(fields[1])].append(fields[0])
    return splits


def celeba_files(root):
    """{'train', 'val', 'test'} -> list of JPEG paths, in list_eval_partition.txt order."""
    folder = os.path.join(root, CELEBA_DIR)
    image_dir = os.path.join(folder, CELEBA_IMAGES)
    partition = os.path.join(folder, CELEBA_PARTITION)

    def present():
        return os.path.isfile(partition) and os.path.isdir(image_dir)

    if not present():
        note = try_download("CelebA", root)
        if not present():
            raise DatasetError(
                f"CelebA not found under {root}: put {CELEBA_IMAGES}{os.sep} (the aligned "
                f"178x218 JPEGs) and {CELEBA_PARTITION} in {folder}{os.sep} ({note})")

    def parse():
        by_partition = _read_celeba_partition(partition)
        on_disk = set(os.listdir(image_dir))
        listed = [n for names in by_partition.values() for n in names]
        absent = [n for n in listed if n not in on_disk]
        if absent:
            raise DatasetError(
                f"{len(absent)} of the {len(listed)} images listed in {partition} are "
                f"missing from {image_dir}{os.sep} (first: {absent[0]})")
        return {split: [os.path.join(image_dir, n)
                        for n in by_partition[_CELEBA_PARTITION_OF_SPLIT[split]]]
                for split in SPLITS}

    # The image folder's mtime changes when files are added or removed, so it keys
    # the cache along with the partition list.
    return _cached("CelebA", [partition, image_dir], parse)


# ---------------------------------------------------------------- CelebAMask-HQ (PNG labels)

def _numbered_pngs(folder):
    if not os.path.isdir(folder):
        return None
    numbered = []
    for name in os.listdir(folder):
        m = _LABEL_NAME.match(name)
        if m:
            numbered.append((int(m.group(1)), name))
    numbered.sort()  # numeric order, so 10.png follows 9.png
    return [os.path.join(folder, name) for _, name in numbered]


def celebamask_files(root, split):
    """List of label-map paths for one split, in numeric file order.

    A prepared ``<split>_label_64`` folder is preferred when it is complete (same file
    count as ``<split>_label``, or the only one present): it saves the 512->64 resize.
    """
    folder = os.path.join(root, CELEBAMASK_DIR)
    full = _numbered_pngs(os.path.join(folder, f"{split}_label"))
    small = _numbered_pngs(os.path.join(folder, f"{split}_label_64"))
    if small and (full is None or len(small) == len(full)):
        return small
    if full:
        return full
    absent = [f"{s}_label{os.sep}" for s in SPLITS
              if not _numbered_pngs(os.path.join(folder, f"{s}_label"))
              and not _numbered_pngs(os.path.join(folder, f"{s}_label_64"))]
    raise DatasetError(
        f"CelebAMask_HQ not found under {root}: {', '.join(absent)} missing or "
        f"empty in {folder}{os.sep}; run `python -m data.prepare_celebamask_hq --src "
        f"RELEASE_DIR --dst {root}` to write {{train,val,test}}_label{os.sep}<n>.png there "
        "(no automatic download)")
