"""Finding, downloading and reading each dataset's files under the dataset root.

Nothing here builds tensors or loaders; it returns numpy arrays (in-memory datasets)
or file lists (file-backed datasets) split into train/val/test.

Each dataset is looked for in this project's folder under the root first, then in the
one the authors' code (sony/sqvae) uses; a download always goes to this project's.
MNIST and Fashion-MNIST are parsed by torchvision; CIFAR10 batches are unpickled here,
with only numpy arrays and plain values allowed.
"""
import codecs
import contextlib
import gzip
import os
import pickle
import re
import socket
import zlib

import numpy as np
import torchvision.datasets as tvd

from util.io import atomic_write_bytes

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

# Folder of each dataset's files under the root, as path parts: this project's layout
# (torchvision's, rooted at the dataset root) first, then the authors' (torchvision's
# rooted at <root>/<Name>), so a dataset root prepared for their code works unchanged.
LAYOUTS = {
    "MNIST": (("MNIST", "raw"), ("MNIST", "MNIST", "raw")),
    "FashionMNIST": (("FashionMNIST", "raw"), ("FashionMNIST", "FashionMNIST", "raw")),
    "CIFAR10": ((CIFAR10_DIR,), ("CIFAR10", CIFAR10_DIR)),
    "CelebA": ((CELEBA_DIR,), ("CelebA", CELEBA_DIR)),
}
LAYOUT_NAMES = ("this project's layout", "the authors' layout")


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


# ---------------------------------------------------------------- layouts

# (dataset, folder) pairs already reported: train, val and test loaders each look the
# dataset up, and the user needs to read where it came from once.
_ANNOUNCED = set()


def _layout_folders(dataset_name, root):
    return [os.path.join(root, *parts) for parts in LAYOUTS[dataset_name]]


def _announce(dataset_name, folder, layout):
    if (dataset_name, folder) not in _ANNOUNCED:
        _ANNOUNCED.add((dataset_name, folder))
        print(f"{dataset_name}: using {folder} ({layout})", flush=True)


def _locate(dataset_name, root, complete):
    """The first layout folder (ours, then the authors') for which ``complete`` holds."""
    for folder, layout in zip(_layout_folders(dataset_name, root), LAYOUT_NAMES):
        if complete(folder):
            _announce(dataset_name, folder, layout)
            return folder
    return None


def _find(dataset_name, root, complete, missing_error):
    """The dataset's folder, downloading into our layout when neither layout is complete;
    ``missing_error(note)`` builds the error when it is still missing after that."""
    folder = _locate(dataset_name, root, complete)
    if folder is None:
        note = try_download(dataset_name, root)
        folder = _locate(dataset_name, root, complete)
        if folder is None:
            raise missing_error(note)
    return folder


def _also_accepted(dataset_name, root):
    return f"or in {_layout_folders(dataset_name, root)[1]}{os.sep}, the authors' layout"


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


def _absent_folders(folder):
    """``folder`` and those of its ancestors that do not exist yet, deepest first."""
    absent = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        absent.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return absent


def _remove_if_empty(folders):
    for folder in folders:
        try:
            # rmdir refuses a folder with anything in it, so a partial download (or a
            # file some other process put there meanwhile) is never lost.
            os.rmdir(folder)
        except OSError:
            pass


def try_download(dataset_name, root):
    """Ask torchvision to download a dataset into our layout; return a short note for
    error messages.

    Failure is expected offline and is never raised here: the caller re-checks the
    files and reports what is still missing. Folders the attempt created and left
    empty are removed again, so an offline run leaves the dataset root as it found it.
    """
    if download_disabled():
        return f"download skipped: {NO_DOWNLOAD_ENV}=1"
    if dataset_name not in LAYOUTS:
        return "no automatic download"
    created = _absent_folders(_layout_folders(dataset_name, root)[0])
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            if dataset_name in ("MNIST", "FashionMNIST"):
                getattr(tvd, dataset_name)(root, train=True, download=True)
            elif dataset_name == "CIFAR10":
                # Download and extract only: constructing tvd.CIFAR10 would also
                # unpickle every batch, which _read_cifar_batch does safely later.
                tvd.utils.download_and_extract_archive(
                    tvd.CIFAR10.url, root, filename=tvd.CIFAR10.filename,
                    md5=tvd.CIFAR10.tgz_md5)
            else:
                tvd.CelebA(root, split="all", download=True)
    except Exception as e:  # any failure (no network, quota, bad archive) means "not here"
        return f"download failed: {_short_reason(e)}"
    finally:
        _remove_if_empty(created)
    return "download attempted"


# ---------------------------------------------------------------- cache

# Parsed arrays per (dataset, files with their size and mtime): train and val loaders
# of one process share a single read, and a replaced file is read afresh.
_ARRAY_CACHE = {}


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
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} "
                           f"images; {dataset_name} images are 28x28")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                           f"{len(labels)} labels; the pair must match")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path} holds label {int(labels.max())}; "
                           f"{dataset_name} labels are 0..9")
    return images[:, None], labels


def _mnist_missing_error(dataset_name, root, note):
    raw_dir = _layout_folders(dataset_name, root)[0]
    missing = _missing_mnist_files(raw_dir)
    return DatasetError(
        f"{dataset_name} not found under {root}: put {', '.join(missing)} (or the same "
        f"names with .gz) in {raw_dir}{os.sep} ({_also_accepted(dataset_name, root)}; {note})")


def load_mnist_like(dataset_name, root):
    """{'train', 'val', 'test'} -> (uint8 N x 1 x 28 x 28, int64 N) for MNIST/FashionMNIST."""
    raw_dir = _find(dataset_name, root, lambda folder: not _missing_mnist_files(folder),
                    lambda note: _mnist_missing_error(dataset_name, root, note))
    _extract_gz(raw_dir)
    paths = [os.path.join(raw_dir, n) for n in MNIST_FILES]

    def parse():
        train = _read_mnist_pair(dataset_name, raw_dir, "train")
        test = _read_mnist_pair(dataset_name, raw_dir, "t10k")
        return _carve_val(dataset_name, train, test)

    return _cached(dataset_name, paths, parse)


def _carve_val(dataset_name, train, test):
    images, labels = train
    n_train, _ = split_sizes(dataset_name, len(images))
    # Slices, not copies: the three splits stay views of the arrays read from disk.
    return {"train": (images[:n_train], labels[:n_train]),
            "val": (images[n_train:], labels[n_train:]),
            "test": test}


# ---------------------------------------------------------------- CIFAR10 (pickles)

# Our own reader rather than torchvision's CIFAR10: that one unpickles the batch files
# with plain pickle.load, and a pickle can call anything it names (os.system included)
# while loading, so a tampered file from a mirror or a shared disk would run code. The
# official batches name only these globals; everything else in them (dict, list, str,
# int) is built by pickle opcodes that need no lookup.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
# At pickle protocol 5 numpy rebuilds an array from its raw buffer with this one instead.
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]
_CIFAR_GLOBALS = {
    # The official files were written by numpy 1.x; numpy 2 moved the module to _core.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes this way at pickle protocol 2 (the official files, from
    # Python 2, hold plain strings, but a re-saved copy holds bytes keys).
    ("_codecs", "encode"): codecs.encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module, name):
        # Pickles of protocol 2 name Python 2's module (Python 3 writes builtins that way).
        module = {"__builtin__": "builtins"}.get(module, module)
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            # latin1 is what the Python 2 pickles of the official release need to
            # restore their numpy arrays.
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise DatasetError(f"CIFAR10 batch {path} holds a pickled {e.qualified_name}, which "
                           "is refused: only numpy arrays, lists, bytes, str and int are "
                           "allowed; download the official files again") from None
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
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"CIFAR10 batch {path} has labels that are not integers "
                           f"({one_line(e)})") from None
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
    names = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)

    def missing(folder):
        return [n for n in names if not os.path.isfile(os.path.join(folder, n))]

    def missing_error(note):
        ours = _layout_folders("CIFAR10", root)[0]
        return DatasetError(
            f"CIFAR10 not found under {root}: put {', '.join(missing(ours))} (extracted "
            f"from cifar-10-python.tar.gz) in {ours}{os.sep} "
            f"({_also_accepted('CIFAR10', root)}; {note})")

    folder = _find("CIFAR10", root, lambda f: not missing(f), missing_error)
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
    def present(folder):
        return (os.path.isfile(os.path.join(folder, CELEBA_PARTITION))
                and os.path.isdir(os.path.join(folder, CELEBA_IMAGES)))

    def missing_error(note):
        ours = _layout_folders("CelebA", root)[0]
        return DatasetError(
            f"CelebA not found under {root}: put {CELEBA_IMAGES}{os.sep} (the aligned "
            f"178x218 JPEGs) and {CELEBA_PARTITION} in {ours}{os.sep} "
            f"({_also_accepted('CelebA', root)}; {note})")

    folder = _find("CelebA", root, present, missing_error)
    image_dir = os.path.join(folder, CELEBA_IMAGES)
    partition = os.path.join(folder, CELEBA_PARTITION)

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
