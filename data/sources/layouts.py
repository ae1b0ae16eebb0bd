"""What the dataset modules share: this project's and the authors' folder layouts (find_folder),
downloads, and the validation split carved off an official training split."""
import contextlib
import itertools
import os
import pathlib
import socket

from util.text import one_line

from ..errors import DatasetError

SPLITS = ("train", "val", "test")
NO_DOWNLOAD_ENV, DOWNLOAD_TIMEOUT_S = "SQVAE_NO_DOWNLOAD", 10
VAL_SIZE = 10_000  # carved off the end of the official training split
# Fewer training images: a toy (a test fixture, a subset) that 10,000 would leave without any.
MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL = 20_000
_OFFLINE = ("Name or service not known", "Temporary failure in name resolution",
            "Network is unreachable", "timed out")


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


def carve_val(train, test, split_sizes):
    """{split: (images, labels)}: the official training items past split_sizes(n)[0] validate."""
    (images, labels), (n_train, _) = train, split_sizes(len(train[0]))
    return {"train": (images[:n_train], labels[:n_train]),
            "val": (images[n_train:], labels[n_train:]), "test": test}


def find_folder(reads, dataset_name, root, folder, *, missing, hint, download):
    """The folder of a dataset's files (`folder`: torchvision's path parts), ours or the
    authors', the first where ``missing(path)`` lists nothing, said once per command. Neither:
    ``download()`` is tried into ours; still missing, the error names what to put where."""
    ours, theirs = os.path.join(root, *folder), os.path.join(root, dataset_name, *folder)
    note = None
    while True:
        for path, layout in zip((ours, theirs), ("this project's layout", "the authors' layout")):
            if not missing(path):
                reads.say(f"{dataset_name}: using {path} ({layout})")
                return path
        if note is not None:
            raise DatasetError(f"{dataset_name} not found under {root}: put "
                               f"{', '.join(missing(ours))}{hint} in {ours}{os.sep} (or in "
                               f"{theirs}{os.sep}, the authors' layout; {note})")
        note = try_download(ours, download)


def try_download(target, download):
    """``download()`` into `target`, never raising (offline is expected), and removing the folders
    it created and left empty; a short note for error messages."""
    if os.environ.get(NO_DOWNLOAD_ENV, "").strip() not in ("", "0"):
        return f"download skipped: {NO_DOWNLOAD_ENV}=1"
    target = pathlib.Path(os.path.abspath(target))
    created = list(itertools.takewhile(lambda path: not path.exists(), [target, *target.parents]))
    previous = socket.getdefaulttimeout()
    # torchvision's urllib calls have no timeout: with no route out, one hangs for minutes.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download()
    except Exception as e:  # any failure (no network, quota, bad archive) means "not here"
        text = one_line(e)
        if any(marker in text for marker in _OFFLINE):
            return "download failed: no network"
        return (f"download failed: {type(e).__name__}: {text[:120]}"
                + ("..." if len(text) > 120 else ""))
    finally:
        socket.setdefaulttimeout(previous)
        for folder in created:  # deepest first; rmdir keeps a folder with anything in it
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return "download attempted"
