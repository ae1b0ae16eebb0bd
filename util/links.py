"""Opening a file in place without following a symbolic link at its name.

A file opened in place (an append-only metrics file, a lock file) would be written through
a link planted at its name, into whatever the link points to; these open the name itself
or refuse with ``UnsafeLink``. ``util.io`` (atomic writes, JSON lines) and ``util.lock``
both build on this module, which imports nothing of ours.
"""
import errno
import os

# Not every platform has it (Windows); there the up-front check of util.io.refuse_links
# remains.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafeLink(ValueError):
    """A name the tool writes is a symbolic link; the message names it and the fix."""

    def __init__(self, path):
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        super().__init__(f"{path} is a symbolic link{target}; this tool never writes "
                         "through links in a run folder: replace the link with a copy of "
                         "the file, or remove it, then run again")
        self.path = path


def open_no_follow(path, flags, mode=0o666):
    """os.open that refuses a symbolic link at `path` (UnsafeLink) instead of following it
    (with O_CREAT, following a dangling link would create its target)."""
    try:
        return os.open(path, flags | O_NOFOLLOW, mode)
    except OSError as e:
        # ELOOP on Linux and macOS, EMLINK on FreeBSD; check the name itself to be sure.
        if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise UnsafeLink(path) from None
        raise
