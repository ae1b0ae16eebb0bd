"""Crash-safe file writes: every file goes to a temporary name in the same folder, is
flushed to disk (unless durable=False), then renamed into place, so a reader never sees
half a file.

Nothing here writes through a symbolic link: a rename replaces a link at the target name
(the file it pointed to stays as it was), files opened in place (``append_jsonl``, the
locks of ``util.lock``) are opened without following one (``util.links``), and
``refuse_links`` lets a caller refuse a folder before writing anything into it. The same
holds for hard links (a file with a second name elsewhere) and special files: no rename
ever replaces a device or a FIFO, and nothing is written in place through a second name.
Run folders come from other people (the authors' release, a colleague, a download), and a
planted link would otherwise make the tool change a file anywhere the user can write.
"""
import errno
import fnmatch
import io
import json
import os
import secrets
import stat

from .links import UnsafeLink, open_no_follow, unsafe
from .lock import FileLock

# Files are created with mode 0o666 and the kernel applies the process umask, as open() does
# for any file the user writes (mkstemp's 0o600 would hide run folders from their group).
FILE_MODE = 0o666


def _new_temp_file(folder, name):
    """(fd, path) of a new file beside `name` in `folder`, opened write-only. O_EXCL never opens
    an existing name, a link included."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, FILE_MODE), tmp
        except FileExistsError:
            continue


def refuse_links(folder, patterns, subfolders=()):
    """Raise UnsafeLink for the first entry of `folder` whose name matches one of
    `patterns` (fnmatch) and is a symbolic link, a special file (a FIFO, a device, a
    socket) or a file with more than one hard link, or for any such entry inside the
    `subfolders` (which must not be links themselves: they are matched by `patterns` too).
    A hard link would write through to the file's other name, as a symbolic link would."""
    def unsafe_entries(path):
        found = []
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if unsafe(st):
                        found.append((entry.path, st))
        except (FileNotFoundError, NotADirectoryError):
            pass
        return sorted(found)
    for path, st in unsafe_entries(folder):
        if any(fnmatch.fnmatchcase(os.path.basename(path), p) for p in patterns):
            raise UnsafeLink(path, st)
    for name in subfolders:
        found = unsafe_entries(os.path.join(folder, name))
        if found:
            raise UnsafeLink(*found[0])


def remove_stale_temps(folder, names):
    """Delete the temporary files that atomic_write_bytes left for `names` in `folder` when
    its process was killed mid-write. Only call it while holding the lock that every writer
    of those names takes: a live writer's temporary file would vanish under it. Returns the
    paths removed."""
    removed = []
    patterns = [f".{name}.*.tmp" for name in names]
    with os.scandir(folder) as entries:
        for entry in entries:
            if (any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)
                    and not entry.is_dir(follow_symlinks=False)):
                try:
                    os.unlink(entry.path)  # a link is removed itself, never its target
                    removed.append(entry.path)
                except FileNotFoundError:
                    pass
    return removed


def _named(error, path):
    """`error` with `path` as its file name where the OS gave none (a failed write or
    fsync on a descriptor names no file), so the message says which file it was."""
    if isinstance(error, OSError) and not error.filename and error.errno:
        return OSError(error.errno, error.strerror, path)
    return error


def _special(path):
    """The stat of what `path` names (following links) if it is neither a regular file nor
    a folder (a device, a FIFO, a socket, /proc/self/fd/N of a pipe), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return None if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else st


def atomic_write_bytes(path, data, *, durable=True, stream_special=False):
    """Write `data` to `path` through a temporary name and a rename.

    A special file at `path` (a device, a FIFO, a socket, or a link to one) is never
    replaced: with stream_special=True (an output path the user named, as ``cp`` treats
    it) `data` is written into it in place, as a stream; otherwise it is refused
    (UnsafeLink, one line). durable=False skips the fsync: a name still never holds a
    partial file if the process dies, but after a power loss the file may be empty. Use it
    only for many files whose reader checks them (and fsync once where it matters)."""
    special = _special(path)
    if special is not None:
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
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _new_temp_file(folder, os.path.basename(path))
    except OSError as e:
        raise _named(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        # A special file that appeared meanwhile is still never replaced.
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            now = None
        if now is not None and not (stat.S_ISREG(now.st_mode) or stat.S_ISLNK(now.st_mode)):
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
    """Append records to a JSON-lines file, each a whole line, all in one write.

    Appenders (a training run, a concurrent ``-ts``) take turns under a lock on the file, so
    their lines never interleave. A last line without its newline can only be left by a
    writer that died mid-write; it is no record, and it is cut off before appending so that
    it cannot glue itself to the next one. If the write fails (a full disk), the file is
    cut back to where it was: it never keeps half a line."""
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
    """The records of a JSON-lines file ([] if it does not exist).

    A torn last line (a writer killed mid-line) is skipped, with a message to `warn` (a
    callable, e.g. print to stderr); a malformed line anywhere else raises JsonlError."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1].strip():  # after the last newline: a line its writer never finished
        if warn is not None:
            warn(f"warning: {path}: skipping a torn last line (its writer was stopped "
                 "mid-line)")
    records = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        except RecursionError:
            # No record of ours nests more than two levels; the parser recurses per level.
            raise JsonlError(f"{path}: line {number} is nested too deeply to be a record; "
                             "remove or fix that line") from None
        if not isinstance(record, dict):
            raise JsonlError(f"{path}: line {number} is not a JSON record; remove or fix "
                             "that line")
        records.append(record)
    return records


def check_writable(folder):
    """Prove a file can be written in `folder`, or, where it does not exist yet, in the
    deepest of its ancestors that does (which must be a folder); returns an error string or
    None. Nothing is created: a command that fails after this check (a dataset missing)
    leaves no empty folders behind."""
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
