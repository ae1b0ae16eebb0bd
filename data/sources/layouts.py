"""What the dataset modules share: the two folder layouts, downloads, the validation split
carved off an official training split, and the parsed-array cache. No dataset is named here:
each module passes its own name, folders and sizes.

A dataset's files sit in a folder named as torchvision names it. This project's layout puts
that folder directly under the dataset root; the authors' code (sony/sqvae) roots
torchvision at ``<root>/<Name>``, so theirs is ``<root>/<Name>/<folder>``. Ours is looked at
first, and a download always goes to ours.
"""
import contextlib
import os
import socket

from util.text import one_line

from ..errors import DatasetError

SPLITS = ("train", "val", "test")
NO_DOWNLOAD_ENV = "SQVAE_NO_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 10
LAYOUT_NAMES = ("this project's layout", "the authors' layout")

# Validation size carved off the end of the official training split.
VAL_SIZE = 10_000
# Below this many training images the file is a toy (a test fixture or a subset),
# where a fixed 10,000 would leave nothing to train on.
MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL = 20_000


def carved_split_sizes(dataset_name, n_official_train, tiny_val_divisor):
    """(n_train, n_val) carved from the official training split, train first.

    Real files (>= 20,000 images) keep the fixed rule: the last 10,000 validate (60,000
    give 50,000/10,000, 50,000 give 40,000/10,000). Only smaller (tiny,
    fixture-sized) files get a proportional split instead: 1/`tiny_val_divisor` validates,
    the dataset module's choice (the ratio of its real sizes).
    """
    n = int(n_official_train)
    if n >= MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL:
        return n - VAL_SIZE, VAL_SIZE
    if n < 2:
        raise DatasetError(f"{dataset_name} training file holds {n} image(s); "
                           "at least 2 are needed to split off a validation set")
    n_val = max(1, n // tiny_val_divisor)
    return n - n_val, n_val


def carve_val(train, test, n_train):
    """{'train', 'val', 'test'} from the official (images, labels) pairs: the first
    `n_train` training items train, the rest validate."""
    images, labels = train
    # Slices, not copies: the three splits stay views of the arrays read from disk.
    return {"train": (images[:n_train], labels[:n_train]),
            "val": (images[n_train:], labels[n_train:]),
            "test": test}


# ---------------------------------------------------------------- layouts

# (dataset, folder) pairs already reported: train, val and test loaders each look the
# dataset up, and the user needs to read where it came from once.
_ANNOUNCED = set()


def layout_folders(dataset_name, root, folder):
    """[ours, the authors'] for `folder`, the path parts of torchvision's folder."""
    return [os.path.join(root, *folder), os.path.join(root, dataset_name, *folder)]


def _locate(dataset_name, folders, complete):
    """The first of `folders` (ours, then the authors') for which ``complete`` holds."""
    for folder, layout in zip(folders, LAYOUT_NAMES):
        if complete(folder):
            if (dataset_name, folder) not in _ANNOUNCED:
                _ANNOUNCED.add((dataset_name, folder))
                print(f"{dataset_name}: using {folder} ({layout})", flush=True)
            return folder
    return None


def find_folder(dataset_name, root, folder, *, complete, what, download):
    """The folder of a dataset's files, ours or the authors' (see the module docstring),
    whichever ``complete(path)`` accepts first.

    When neither does, ``download()`` is tried into ours and both are looked at again;
    still missing, the error names what to put where: ``what(ours)``, in our folder.
    """
    folders = layout_folders(dataset_name, root, folder)
    found = _locate(dataset_name, folders, complete)
    if found is None:
        note = try_download(folders[0], download)
        found = _locate(dataset_name, folders, complete)
        if found is None:
            ours, theirs = folders
            raise DatasetError(
                f"{dataset_name} not found under {root}: put {what(ours)} in {ours}{os.sep} "
                f"(or in {theirs}{os.sep}, the authors' layout; {note})")
    return found


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


def try_download(target, download):
    """Call ``download()`` (torchvision's downloader for a dataset, whose files land in
    `target`); return a short note for error messages.

    Failure is expected offline and is never raised here: the caller re-checks the
    files and reports what is still missing. Folders the attempt created and left
    empty are removed again, so an offline run leaves the dataset root as it found it.
    """
    if download_disabled():
        return f"download skipped: {NO_DOWNLOAD_ENV}=1"
    created = _absent_folders(target)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            download()
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


def cached(key_name, paths, parse):
    """``parse()``, once per `key_name` and state of the files at `paths`."""
    key = (key_name, _signature(paths))
    if key not in _ARRAY_CACHE:
        _ARRAY_CACHE[key] = parse()
    return _ARRAY_CACHE[key]
