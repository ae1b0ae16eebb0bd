"""Advisory file locks that die with their process.

``flock`` locks belong to an open file description, so the kernel drops them when the
holder exits, however it exits (SIGKILL, a crash, a power cut): a killed writer never
leaves a stale lock behind, and no lock file ever has to be cleaned up by hand. The
holder writes its PID into the lock file, so a refused second process can say who holds
it. Where ``fcntl`` does not exist (Windows) the locks are no-ops.

A lock file is opened without following a symbolic link (``UnsafeLink``): writing the PID
through a link planted in a downloaded run folder would truncate the file it points to.
"""
import os

from .links import open_no_follow

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``pid`` is its process id (or None)."""

    def __init__(self, path, pid):
        super().__init__(f"{path} is locked by process {pid if pid else '(unknown)'}")
        self.path, self.pid = path, pid


def _holder(fd):
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class FileLock:
    """``with FileLock(path):`` holds an exclusive lock on ``path`` (created if needed).

    ``blocking=False`` raises LockHeld at once instead of waiting. ``release()`` (or
    leaving the block) gives it back; so does the end of the process.
    """

    def __init__(self, path, blocking=True):
        self.path, self.blocking = path, blocking
        self.fd = None

    def acquire(self):
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise LockHeld(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the PID is a courtesy for error messages; the lock itself is held
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
