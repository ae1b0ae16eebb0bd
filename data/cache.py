"""The decoded cache of the datasets read from image files: the files decoded once, by the very
function the file loader calls, into a uint8 N x C x H x W ``<root>/cache/<name>.npy`` that later
epochs and processes memory-map; rebuilt when the decoding or files its sidecar records change."""
import contextlib
import functools
import glob
import hashlib
import json
import os
import sys
from multiprocessing import get_all_start_methods, get_context

import numpy as np
import PIL
from tqdm import tqdm

from util.io import FileLock, atomic_write_text
from util.signals import worker_pool
from util.text import one_line

from .errors import DatasetError, file_state, first_few

CACHE_DIR = "cache"
FORMAT = 1  # bumped when the file layout or the sidecar's meaning changes: old caches retire
CHUNK = 256  # files per task: pickling a block back is cheap next to decoding it; the bar moves
MIN_PARALLEL = 1024  # below this many files a pool's start-up costs more than it saves
FIRST_FAILURES = CHUNK  # a skipping build stops when the first this many files all fail


def build_workers():
    """Processes a build may use: every CPU this process may run on (macOS: every CPU)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool_context():
    # fork hands workers the torch and PIL already imported: a fresh interpreter takes seconds.
    return get_context("fork" if "fork" in get_all_start_methods() else None)


def _open_matching(path, sidecar):
    """(memmap, skipped indices) of the cache at `path` if its sidecar, less "skipped", matches."""
    try:
        with open(os.path.splitext(path)[0] + ".json") as f:
            stored = json.load(f)
        if not isinstance(stored, dict) or {**stored, "skipped": 0} != {**sidecar, "skipped": 0}:
            return None
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # absent, or cut short by a crash or a full disk
        return None
    matches = array.shape == tuple(sidecar["shape"]) and array.dtype == np.uint8
    return (array, stored.get("skipped", [])) if matches else None


def open_or_build(path, *, root, paths, decode, shape, what, skip_unreadable=False,
                  instead=None):
    """(read-only memmap of the decoded `paths`, with `skip_unreadable` the indices of those not
    decoded, rows zero), built if missing or stale; None, warned, where it cannot be written."""
    files = hashlib.sha256()  # the sidecar: what the cache depends on
    for file in paths:  # root-relative names: a root moved with its mtimes keeps its cache
        files.update("{}\0{}\0{}\n".format(os.path.relpath(file, root), *file_state(file)).encode())
    # The whole module's source: a changed constant or helper changes the pixels as well.
    with open(sys.modules[decode.__module__].__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    name = getattr(decode, "__qualname__", type(decode).__qualname__)  # or a decoding object's
    # Lists, not tuples: the dict is compared with what json.load gives back.
    sidecar = {"format": FORMAT, "shape": [len(paths), *shape], "dtype": "uint8",
               "decode": {"function": f"{decode.__module__}.{name}",
                          "params": getattr(decode, "params", {}), "source_sha256": source,
                          "pillow": PIL.__version__},
               "sources": {"count": len(paths), "sha256": files.hexdigest()},
               **({"skip_unreadable": True} if skip_unreadable else {})}
    if (found := _open_matching(path, sidecar)) is not None:
        return found
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileLock(path + ".lock"):
            return _open_matching(path, sidecar) or _build(  # built meanwhile by another rank?
                path, sidecar, paths, decode, shape, what, skip_unreadable)
    except OSError as e:
        instead = instead or f"decoding the {what} files every epoch instead"
        print(f"warning: cannot write the decoded cache {path} ({one_line(e)}); {instead}",
              file=sys.stderr)
        return None


def decode_all(paths, *, decode, shape, what, skip_unreadable=False):
    """(the decoded array of `paths` in memory, as a build writes it, the skipped indices)."""
    array, skipped = np.empty((len(paths), *shape), dtype=np.uint8), []
    with contextlib.closing(_blocks(paths, decode, shape, what,
                                    skipped if skip_unreadable else None)) as blocks:
        for block, start in zip(blocks, range(0, len(paths), CHUNK)):  # CHUNK rows, the last fewer
            array[start:start + len(block)] = block
    return array, skipped


def _build(path, sidecar, paths, decode, shape, what, skip_unreadable):
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):  # we hold the lock: killed builds'
        os.remove(stale)
    tmp, skipped = f"{path}.{os.getpid()}.tmp", []
    blocks = _blocks(paths, decode, shape, what, skipped if skip_unreadable else None)
    try:
        # Sequential writes, not a writable memmap: a full disk raises OSError here, not SIGBUS.
        with open(tmp, "wb") as f, contextlib.closing(blocks):
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (len(paths), *shape)})
            f.writelines(block.tobytes() for block in blocks)
            f.flush()
            os.fsync(f.fileno())
        sidecar_file = os.path.splitext(path)[0] + ".json"
        if os.path.exists(sidecar_file):  # out first: no crash pairs an array with another's
            os.remove(sidecar_file)
        os.replace(tmp, path)
        atomic_write_text(sidecar_file, json.dumps(
            {**sidecar, "skipped": skipped} if skip_unreadable else sidecar, indent=1) + "\n")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return np.load(path, mmap_mode="r"), skipped


def _blocks(paths, decode, shape, what, skipped):
    """The decoded blocks of `paths` in file order, shape-checked, with a progress bar on a
    terminal. `skipped` None: an unreadable file raises; else a list that collects their
    indices, and a build that reads none (of all, or of the first FIRST_FAILURES) raises."""
    job = functools.partial(_decode_many, decode,
                            **({} if skipped is None else {"skip_shape": tuple(shape)}))
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    done, first_error, workers = 0, None, build_workers()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(paths), unit="img", desc=f"caching {what}",
                                       file=sys.stderr, disable=not sys.stderr.isatty()))
        results = map(job, chunks)
        if workers > 1 and len(paths) >= MIN_PARALLEL:
            # imap keeps file order; leaving early (an error, Ctrl-C) ends the workers.
            pool = worker_pool(pool_context(), min(workers, len(chunks)))
            results = stack.enter_context(pool).imap(job, chunks)
        for block, failed in results:
            if block.shape[1:] != tuple(shape):
                raise DatasetError(f"{what} files decode to {block.shape[1:]} arrays, "
                                   f"expected {tuple(shape)}")
            for i, message in failed:
                skipped.append(done + i)
                first_error = first_error or message
            done += len(block)
            if failed and len(skipped) == done and done >= min(FIRST_FAILURES, len(paths)):
                which = (f"none of its {done} image files" if done == len(paths)
                         else f"none of the first {done} of its {len(paths)} image files")
                names = first_few([os.path.basename(path) for path in paths[:done]])
                raise DatasetError(f"{what}: {which} can be decoded ({names}; first error: "
                                   f"{first_error}); point it at a folder of pictures Pillow reads")
            bar.update(len(block))
            yield block


def _decode_many(decode, paths, skip_shape=None):
    """(block of the decoded `paths`, [(position, message)] of those that failed). With
    `skip_shape` (one item's), a file that cannot be decoded leaves its row zero, not raise."""
    if skip_shape is None:
        return np.stack([decode(path) for path in paths]), []
    block, failed = np.zeros((len(paths), *skip_shape), dtype=np.uint8), []
    for i, path in enumerate(paths):
        try:
            block[i] = decode(path)
        except DatasetError as e:
            failed.append((i, str(e)))
    return block, failed
