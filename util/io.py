"""Crash-safe file writes: every file goes to a temporary name in the same folder, is flushed
to disk (unless durable=False), then renamed into place, so a reader never sees half a file.

Nothing here writes through a link: a rename replaces a symbolic link at the target name (the
file it pointed to stays as it was), files opened in place (``append_jsonl``, the locks) are
opened without following one (``util.links``), no rename replaces a device or a FIFO, and
``refuse_links`` lets a caller refuse a folder before writing anything into it. Run folders
come from other people, and a planted link would make the tool change a file anywhere.
"""
import errno
import fnmatch
import io
import json
import os
import secrets
import stat

from .links import O_NOFOLLOW, UnsafeLink, open_no_follow, unsafe
from .lock import FileLock

# The kernel applies the process umask, as open() does (mkstemp's 0o600 would hide run
# folders from their group).
FILE_MODE = 0o666


def _new_temp_file(folder, name):
    """(fd, path) of a new file beside `name`; O_EXCL never opens an existing name or link."""
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW,
                           FILE_MODE), tmp
        except FileExistsError:
            continue


def _unsafe_entries(folder):
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                st = _stat(entry.path, follow=False)  # None: removed meanwhile
                if st is not None and unsafe(st):
                    found.append((entry.path, st))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return sorted(found)


def refuse_links(folder, patterns, subfolders=()):
    """UnsafeLink for the first entry of `folder` matching one of `patterns` (fnmatch) that is
    a symbolic link, a special file or a file with several hard links, or for any such entry
    inside `subfolders`."""
    for path, st in _unsafe_entries(folder):
        if any(fnmatch.fnmatchcase(os.path.basename(path), p) for p in patterns):
            raise UnsafeLink(path, st)
    for name in subfolders:
        found = _unsafe_entries(os.path.join(folder, name))
        if found:
            raise UnsafeLink(*found[0])


def remove_stale_temps(folder, names):
    """Delete the temporary files a killed writer left for `names` in `folder`. Only while
    holding the lock every writer of those names takes: a live writer's file would vanish."""
    patterns = [f".{name}.*.tmp" for name in names]
    with os.scandir(folder) as entries:
        stale = [entry.path for entry in entries if not entry.is_dir(follow_symlinks=False)
                 and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)]
    for path in stale:
        try:
            os.unlink(path)  # a link is removed itself, never its target
        except FileNotFoundError:
            pass
    return stale


def _named(error, path):
    """`error` naming `path` where the OS named no file (a failed write on a descriptor)."""
    if isinstance(error, OSError) and not error.filename and error.errno:
        return OSError(error.errno, error.strerror, path)
    return error


def _is_special(st):
    return st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                                   or stat.S_ISLNK(st.st_mode))


def _stat(path, follow=True):
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None


def atomic_write_bytes(path, data, *, durable=True, stream_special=False):
    """Write `data` to `path` through a temporary name and a rename.

    A special file at `path` (or a link to one) is never replaced: with stream_special=True
    (an output path the user named, as ``cp`` treats it) `data` is written into it as a
    stream, else it is refused (UnsafeLink). durable=False skips the fsync: the name still
    never holds a partial file, but after a power loss the file may be empty."""
    if _is_special(_stat(path)):
        if not stream_special:
            raise UnsafeLink(path)
        try:
            with open(path, "wb") as f:  # follows a link, as cp does: the user named it
                f.write(data)
        except OSError as e:
            raise _named(e, path) from None
        return
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    try:
        fd, tmp = _new_temp_file(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    except OSError as e:
        raise _named(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        now = _stat(path, follow=False)
        if _is_special(now):  # one that appeared meanwhile is still never replaced
            raise UnsafeLink(path, now)
        os.replace(tmp, path)  # replaces a link at `path`, never writes through it
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        named = _named(e, path)
        if named is e:
            raise
        raise named from None


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path, save_fn, *, durable=True):
    """Serialise with `save_fn(buffer)` into memory, then write atomically."""
    buffer = io.BytesIO()
    save_fn(buffer)
    atomic_write_bytes(path, buffer.getvalue(), durable=durable)


class JsonlError(ValueError):
    """A JSON-lines file with a malformed line before its last; the message names the line."""


def append_jsonl(path, records):
    """Append records to a JSON-lines file as whole lines, in one write, under a lock on the
    file (a training run and a concurrent ``-ts`` never interleave). A last line without its
    newline (a writer died mid-write) is cut off first, and a failed write (a full disk) is
    cut back: the file never keeps half a line."""
    if not records:
        return
    payload = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    try:
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
    except OSError as e:
        raise _named(e, path) from None
    try:
        folder, name = os.path.split(path)
        with FileLock(os.path.join(folder, f".{name}.lock")):
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                size -= len(tail) - (tail.rfind(b"\n") + 1)
                os.ftruncate(fd, size)
            try:
                written = 0
                while written < len(payload):
                    written += os.write(fd, payload[written:])
                os.fsync(fd)
            except BaseException as e:
                os.ftruncate(fd, size)
                named = _named(e, path)
                if named is e:
                    raise
                raise named from None
    finally:
        os.close(fd)


def read_jsonl(path, warn=None):
    """The records of a JSON-lines file ([] if it does not exist). A torn last line is
    skipped, with a message to `warn`; a malformed line elsewhere raises JsonlError."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1].strip() and warn is not None:  # a line its writer never finished
        warn(f"warning: {path}: skipping a torn last line (its writer was stopped mid-line)")
    records = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        except RecursionError:  # no record of ours nests; the parser recurses per level
            raise JsonlError(f"{path}: line {number} is nested too deeply to be a record; "
                             "remove or fix that line") from None
        if not isinstance(record, dict):
            raise JsonlError(f"{path}: line {number} is not a JSON record; remove or fix "
                             "that line")
        records.append(record)
    return records


def check_writable(folder):
    """An error string unless a file can be written in `folder` (or in its deepest existing
    ancestor); nothing is left behind."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot write to {folder}: {os.strerror(errno.ENOTDIR)} ({existing})"
    try:
        fd, tmp = _new_temp_file(existing, "write-test")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror}"
    return None
