"""Crash-safe files never written through a link: atomic writes (temporary name, fsync, rename),
append-only JSON lines, locks opened without following one, ``refuse_links`` before writing into
a folder. Run folders come from others: a planted link could change any file (docs/failures.md)."""
import contextlib
import errno
import fnmatch
import io
import json
import os
import secrets
import stat
import tempfile

from filelock import lock_descriptor

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows: refuse_links's check remains there
SPECIAL_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
                 stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _stat(path, follow=True):
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None


def _special(st):
    """Whether `st` (None: no such name) is neither a file, a folder nor a symbolic link."""
    return st is not None and stat.S_IFMT(st.st_mode) not in (stat.S_IFREG, stat.S_IFDIR,
                                                              stat.S_IFLNK)


def _unsafe(st):
    """Whether a name with this lstat is a link, a special file or a file with several names."""
    return not stat.S_ISDIR(st.st_mode) and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1)


class UnsafeLink(ValueError):
    """A name the tool writes is a link or a special file; the message names it and the fix."""

    def __init__(self, path, st=None):
        st = st or _stat(path, follow=False)
        never = "this tool never writes through links in a run folder"
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            problem = (f"has {st.st_nlink} hard links (the same file under another name, possibly "
                       f"outside this folder); {never}: replace it with a copy of its own (cp -p "
                       "FILE FILE.copy && mv FILE.copy FILE), or remove it")
        elif _special(st):
            kind = SPECIAL_KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
            problem = (f"is {kind}, not a regular file; this tool never replaces or writes into "
                       "one there: remove it or choose another name")
        else:
            target = ""
            with contextlib.suppress(OSError):
                target = f" (to {os.readlink(path)})"
            problem = (f"is a symbolic link{target}; {never}: replace the link with a copy of "
                       "the file, or remove it")
        super().__init__(f"{path} {problem}, then run again")


def open_no_follow(path, flags, mode=0o666):
    """os.open refusing (UnsafeLink) a symbolic link at `path` rather than following it (with
    O_CREAT a dangling one would create its target), and anything but a file with one name."""
    try:
        fd = os.open(path, flags | O_NOFOLLOW, mode)
    except OSError:
        if os.path.islink(path):  # O_NOFOLLOW's ELOOP (EMLINK on FreeBSD), or any other error
            raise UnsafeLink(path) from None
        raise
    try:
        if _unsafe(st := os.fstat(fd)):
            raise UnsafeLink(path, st)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _naming(path):
    """An OSError inside names `path` where the OS named no file (a write on a descriptor)."""
    try:
        yield
    except OSError as e:
        if e.filename or not e.errno:
            raise
        raise OSError(e.errno, e.strerror, path) from None


def refuse_links(folder, patterns, subfolders=()):
    """UnsafeLink for the first link, special file or file with several names in `folder`
    whose name matches one of `patterns` (fnmatch), or anywhere inside `subfolders`."""
    places = [(folder, patterns), *((os.path.join(folder, name), ["*"]) for name in subfolders)]
    for where, names in places:
        found = []  # stays empty where the folder is missing
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(where) as it:
            found = [(e.path, st) for e in it if any(fnmatch.fnmatchcase(e.name, p) for p in names)
                     and (st := _stat(e.path, follow=False)) is not None  # None: removed meanwhile
                     and _unsafe(st)]
        if found:
            raise UnsafeLink(*min(found))


def remove_stale_temps(folder, names):
    """Delete the temporary files a killed writer left for `names` in `folder`. Only while
    holding the lock every writer of those names takes: a live writer's file would vanish."""
    patterns = [f".{name}.*.tmp" for name in names]
    with os.scandir(folder) as entries:
        stale = [entry.path for entry in entries if not entry.is_dir(follow_symlinks=False)
                 and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a link is removed itself, never its target


def atomic_write_bytes(path, data, *, durable=True, stream_special=False):
    """Write `data` to `path` through a temporary name and a rename. A special file there (or
    a link to one) is never replaced: streamed into with stream_special=True (a path the user
    named, as ``cp`` does), else UnsafeLink. durable=False: no fsync (maybe empty on power loss)."""
    if _special(_stat(path)):
        if not stream_special:
            raise UnsafeLink(path)
        with _naming(path), open(path, "wb") as f:  # follows a link, as cp does: the user named it
            f.write(data)
        return
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    folder, name = os.path.split(os.path.abspath(path))
    with _naming(path):
        # O_EXCL opens no existing name; 0o666 less the umask, not mkstemp's 0o600 (group-blind)
        while True:
            tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
            with contextlib.suppress(FileExistsError):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o666)
                break
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            if _special(now := _stat(path, follow=False)):  # one that appeared meanwhile too
                raise UnsafeLink(path, now)
            os.replace(tmp, path)  # replaces a link at `path`, never writes through it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


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
    """Append records as whole lines, in one write, under a lock on the file (a run and a
    concurrent ``-ts`` never interleave). A torn last line (a writer died) is cut off first and
    a failed write (a full disk) cut back: the file never keeps half a line."""
    if not records:
        return
    payload = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    with _naming(path):
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            with FileLock(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")):
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
                except BaseException:
                    os.ftruncate(fd, size)
                    raise
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
            problem = None if isinstance(record, dict) else "not a JSON record"
        except RecursionError:  # no record of ours nests; the parser recurses per level
            problem = "nested too deeply to be a record"
        except ValueError:
            problem = "not a JSON record"
        if problem:
            raise JsonlError(f"{path}: line {number} is {problem}; remove or fix that line")
        records.append(record)
    return records


def check_writable(folder):
    """An error string unless a file can be written in `folder` (or its deepest existing one)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot write to {folder}: {os.strerror(errno.ENOTDIR)} ({existing})"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror}"
    return None


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``pid`` is its process id (or None)."""

    def __init__(self, path, pid):
        super().__init__(f"{path} is locked by process {pid or '(unknown)'}")
        self.pid = pid


class FileLock:
    """``with FileLock(path):`` an exclusive flock, dropped with its process however it ends;
    ``blocking=False``: LockHeld at once. The file holds the PID, for the refused to name."""

    def __init__(self, path, blocking=True):
        self.path, self.blocking, self.fd = path, blocking, None

    def acquire(self):
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if not lock_descriptor(fd, blocking=self.blocking):
                text = os.pread(fd, 32, 0).strip()
                raise LockHeld(self.path, int(text) if text.isdigit() else None)
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the PID is a courtesy; the lock is held
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd
        return self

    def __enter__(self):
        return self if self.fd is not None else self.acquire()  # held already: keep it

    def release(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    __exit__ = release
