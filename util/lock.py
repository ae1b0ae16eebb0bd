"""Advisory file locks (filelock's ``flock``) that die with their process, however it ends.

The lock file is opened without following a link (``util.links``): writing the holder's PID
through a link planted in a downloaded run folder would truncate the file it points to. The
PID lets a refused second process say who holds the lock.
"""
import contextlib
import os

from filelock import lock_descriptor

from .links import open_no_follow


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``pid`` is its process id (or None)."""

    def __init__(self, path, pid):
        super().__init__(f"{path} is locked by process {pid or '(unknown)'}")
        self.path, self.pid = path, pid


class FileLock:
    """``with FileLock(path):`` holds an exclusive lock on ``path`` (created if needed);
    ``blocking=False`` raises LockHeld at once instead of waiting."""

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

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self if self.fd is not None else self.acquire()  # held already: keep it

    def __exit__(self, *exc):
        self.release()
