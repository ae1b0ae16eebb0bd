"""What the dataset modules share: the two folder layouts, downloads and the validation split
carved off an official training split. No dataset is named here.

A dataset's files sit in a folder named as torchvision names it: directly under the dataset
root in this project's layout, under ``<root>/<Name>/`` in the authors' (sony/sqvae). Ours is
looked at first, and a download always goes to ours.
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
# Below this many training images the file is a toy (a test fixture or a subset), where a
# fixed 10,000 would leave nothing to train on.
MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL = 20_000


def carved_split_sizes(dataset_name, n_official_train, tiny_val_divisor):
    """(n_train, n_val): the last 10,000 validate (60,000 give 50,000/10,000); a file of fewer
    than 20,000 gives 1/`tiny_val_divisor` (the ratio of the real sizes) to validation."""
    n = int(n_official_train)
    if n >= MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL:
        return n - VAL_SIZE, VAL_SIZE
    if n < 2:
        raise DatasetError(f"{dataset_name} training file holds {n} image(s); "
                           "at least 2 are needed to split off a validation set")
    n_val = max(1, n // tiny_val_divisor)
    return n - n_val, n_val


def carve_val(train, test, n_train):
    """{'train', 'val', 'test'} from the official (images, labels) pairs: the first `n_train`
    training items train, the rest validate (views of the arrays read, not copies)."""
    images, labels = train
    return {"train": (images[:n_train], labels[:n_train]),
            "val": (images[n_train:], labels[n_train:]), "test": test}


def find_folder(reads, dataset_name, root, folder, *, complete, what, download):
    """The folder of a dataset's files (`folder`: the path parts of torchvision's), ours or
    the authors', whichever ``complete(path)`` accepts first; said once per command (`reads`).
    Neither: ``download()`` is tried into ours; still missing, the error names what to put
    where (``what(ours)``)."""
    folders = [os.path.join(root, *folder), os.path.join(root, dataset_name, *folder)]
    note = None
    while True:
        for path, layout in zip(folders, LAYOUT_NAMES):
            if complete(path):
                reads.say(f"{dataset_name}: using {path} ({layout})")
                return path
        if note is not None:
            break
        note = try_download(folders[0], download)
    ours, theirs = folders
    raise DatasetError(f"{dataset_name} not found under {root}: put {what(ours)} in {ours}{os.sep}"
                       f" (or in {theirs}{os.sep}, the authors' layout; {note})")


def download_disabled():
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def _socket_timeout(seconds):
    # torchvision's urllib calls have no timeout of their own; without one a machine with no
    # route out can hang for minutes before reporting the dataset missing.
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


def try_download(target, download):
    """Call ``download()`` (whose files land in `target`); a short note for error messages.

    A failure (expected offline) is never raised: the caller looks for the files again. The
    folders the attempt created and left empty are removed, so an offline run leaves the
    dataset root as it found it.
    """
    if download_disabled():
        return f"download skipped: {NO_DOWNLOAD_ENV}=1"
    created, folder = [], os.path.abspath(target)
    while not os.path.exists(folder) and folder not in created:
        created.append(folder)  # deepest first
        folder = os.path.dirname(folder)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            download()
    except Exception as e:  # any failure (no network, quota, bad archive) means "not here"
        return f"download failed: {_short_reason(e)}"
    finally:
        for folder in created:
            # rmdir refuses a folder with anything in it: a partial download (or a file
            # another process put there meanwhile) is never lost.
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return "download attempted"
