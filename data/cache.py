"""A decoded cache for the datasets read from image files (CelebA, CelebAMask-HQ).

A split is decoded once, by the same per-file functions the file loader calls (so the
two paths stay bit-identical), into one uint8 N x C x H x W array in
``<root>/cache/<stem>_<split>_64.npy``, which every later epoch and process memory-maps.
A sidecar ``.json`` next to it records the decoding (function, its module's source hash,
Pillow's version) and a fingerprint of the split's files (names, sizes, mtimes); when
either no longer matches, the cache is rebuilt rather than trusted.
"""
import contextlib
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import sys

import numpy as np
import PIL
from tqdm import tqdm

from util.cli import one_line
from util.io import atomic_write_text
from util.lock import FileLock
from util.signals import worker_pool

from .decode import IMAGE_SIZE
from .errors import DatasetError

CACHE_DIR = "cache"
# Bump when the file layout or the sidecar's meaning changes, to retire old caches.
FORMAT = 1
# Files decoded per task: large enough that pickling a block back is cheap next to
# decoding it, small enough that the bar moves and every worker gets work.
CHUNK = 256
# Below this many files a pool's start-up costs more than it saves.
MIN_PARALLEL = 1024


def cache_path(root, stem, split):
    return os.path.join(root, CACHE_DIR, f"{stem}_{split}_{IMAGE_SIZE}.npy")


def sidecar_path(path):
    return os.path.splitext(path)[0] + ".json"


def build_workers():
    """Processes a build may use: every CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def _fingerprint(root, paths):
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise DatasetError(f"cannot read {p}: {e.strerror}") from None
        # Root-relative names, so a dataset root moved with its mtimes keeps its cache.
        digest.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decoding(decode):
    # The whole module's source, not just the function's: a changed constant or helper
    # (crop size, resize call) changes the pixels as much as an edited body does.
    with open(sys.modules[decode.__module__].__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    return {"function": f"{decode.__module__}.{decode.__qualname__}",
            "params": getattr(decode, "params", {}), "source_sha256": source,
            "pillow": PIL.__version__}


def expected_sidecar(root, paths, decode, shape):
    """What the sidecar of an up-to-date cache of ``paths`` must hold, exactly."""
    # Lists, not tuples: the dict is compared with what json.load gives back.
    return {"format": FORMAT, "shape": [len(paths), *shape], "dtype": "uint8",
            "decode": _decoding(decode),
            "sources": {"count": len(paths), "sha256": _fingerprint(root, paths)}}


def open_matching(path, sidecar):
    """The cache at ``path`` memory-mapped read-only if its sidecar equals ``sidecar``."""
    try:
        with open(sidecar_path(path)) as f:
            if json.load(f) != sidecar:
                return None
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # absent, or cut short by a crash or a full disk
        return None
    if array.shape != tuple(sidecar["shape"]) or array.dtype != np.uint8:
        return None
    return array


def open_or_build(path, *, root, paths, decode, shape, what, workers):
    """The decoded array of ``paths`` (read-only memmap), built first if missing or stale.

    Returns None, after a one-line warning on stderr, when the cache cannot be written
    (read-only dataset root, full disk): the caller decodes the files instead. Errors
    in the files themselves raise DatasetError as the decoding path would.
    """
    sidecar = expected_sidecar(root, paths, decode, shape)
    array = open_matching(path, sidecar)
    if array is not None:
        return array
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileLock(path + ".lock"):
            # Another process (a second rank) may have finished it while this one waited.
            array = open_matching(path, sidecar)
            if array is None:
                array = _build(path, sidecar, paths, decode, shape, what, workers)
    except OSError as e:
        print(f"warning: cannot write the decoded cache {path} ({one_line(e)}); "
              f"decoding the {what} files every epoch instead", file=sys.stderr)
        return None
    return array


def _build(path, sidecar, paths, decode, shape, what, workers):
    # Only lock holders get here, so any temporary file left is from a killed build.
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):
        os.remove(stale)
    tmp = f"{path}.{os.getpid()}.tmp"
    n = len(paths)
    try:
        # Plain sequential writes rather than a writable memmap: a full disk then raises
        # OSError here instead of killing the process with SIGBUS.
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
            with contextlib.ExitStack() as stack:
                bar = stack.enter_context(tqdm(total=n, unit="img", desc=f"caching {what}",
                                               file=sys.stderr,
                                               disable=not sys.stderr.isatty()))
                blocks = stack.enter_context(
                    contextlib.closing(_decoded_blocks(paths, decode, workers)))
                for block in blocks:
                    if block.shape[1:] != tuple(shape):
                        raise DatasetError(f"{what} files decode to {block.shape[1:]} "
                                           f"arrays, expected {tuple(shape)}")
                    f.write(block.tobytes())
                    bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
        # Old sidecar out first: a crash between the two steps below must never pair
        # an outdated sidecar with the new array (or the new sidecar with an old one).
        if os.path.exists(sidecar_path(path)):
            os.remove(sidecar_path(path))
        os.replace(tmp, path)
        atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=1) + "\n")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return np.load(path, mmap_mode="r")


def _decode_many(decode, paths):
    return np.stack([decode(p) for p in paths])


def pool_context():
    # fork hands workers the already imported torch/PIL; a fresh interpreter would
    # spend seconds importing them again.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _decoded_blocks(paths, decode, workers):
    """uint8 blocks of consecutive files, in file order."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    job = functools.partial(_decode_many, decode)
    if workers < 2 or len(paths) < MIN_PARALLEL:
        yield from map(job, chunks)
        return
    # imap (not imap_unordered) so each block can be appended to the file as it comes;
    # leaving the with-block early (an error, Ctrl-C) terminates the workers, which ignore
    # Ctrl-C and end on SIGTERM by default (util.signals.worker_pool says why).
    with worker_pool(pool_context(), min(workers, len(chunks))) as pool:
        yield from pool.imap(job, chunks)
