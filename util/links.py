"""Opening a file in place without following a symbolic link at its name.

A file opened in place (an append-only metrics file, a lock file) would be written through
a link planted at its name, into whatever the link points to, and through a hard link into
the file's other name (``cp -al`` backups make those); these open the name itself and
refuse with ``UnsafeLink`` a link, a file with several names or a special file.
``util.io`` (atomic writes, JSON lines) and ``util.lock`` both build on this module, which
imports nothing of ours.
"""
import errno
import os
import stat

# Not every platform has it (Windows); there the up-front check of util.io.refuse_links
# remains.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafeLink(ValueError):
    """A name the tool writes is a symbolic link, a hard link (a file with more than one
    name, one of which may be anywhere on the file system) or a special file (a FIFO, a
    device, a socket); the message names it and the fix. `st` is the name's lstat, taken
    by the caller that found it (looked up again where not given)."""

    def __init__(self, path, st=None):
        if st is None:
            try:
                st = os.lstat(path)
            except OSError:
                st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            message = (f"{path} has {st.st_nlink} hard links (the same file under another "
                       "name, possibly outside this folder); this tool never writes through "
                       "links in a run folder: replace it with a copy of its own (cp -p "
                       "FILE FILE.copy && mv FILE.copy FILE), or remove it, then run again")
        elif st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                                     or stat.S_ISDIR(st.st_mode)):
            message = (f"{path} is {special_kind(st)}, not a regular file; this tool never "
                       "replaces or writes into one there: remove it or choose another "
                       "name, then run again")
        else:
            try:
                target = f" (to {os.readlink(path)})"
            except OSError:
                target = ""
            message = (f"{path} is a symbolic link{target}; this tool never writes through "
                       "links in a run folder: replace the link with a copy of the file, or "
                       "remove it, then run again")
        super().__init__(message)
        self.path = path


def special_kind(st):
    """What a file that is neither regular, a folder nor a link is, in words."""
    mode = st.st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def unsafe(st):
    """Whether a name with this lstat must not be written in place in a run folder: a
    symbolic link, a special file, or a regular file with more than one hard link."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return False
    return not stat.S_ISREG(mode) or st.st_nlink > 1


def open_no_follow(path, flags, mode=0o666):
    """os.open that refuses a symbolic link at `path` (UnsafeLink) instead of following it
    (with O_CREAT, following a dangling link would create its target), and refuses what
    it opened unless it is a regular file with one name: a hard link would write through
    to the file's other name, a FIFO or device is nothing to append to or lock."""
    try:
        fd = os.open(path, flags | O_NOFOLLOW, mode)
    except OSError as e:
        # ELOOP on Linux and macOS, EMLINK on FreeBSD; check the name itself to be sure.
        if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise UnsafeLink(path) from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if unsafe(st):
        os.close(fd)
        raise UnsafeLink(path, st)
    return fd
