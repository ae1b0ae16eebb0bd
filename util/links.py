"""Opening a file in place without following a link at its name.

A file opened in place (an append-only metrics file, a lock file) would be written through a
symbolic link planted at its name, and through a hard link into the file's other name (``cp
-al`` backups make those): ``open_no_follow`` refuses both, and special files, with
``UnsafeLink``.
"""
import errno
import os
import stat

# Absent on Windows, where the up-front check of util.io.refuse_links remains.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class UnsafeLink(ValueError):
    """A name the tool writes is a symbolic link, a hard link or a special file (a FIFO, a
    device, a socket); the message names it and the fix. `st`: the name's lstat, if known."""

    def __init__(self, path, st=None):
        if st is None:
            try:
                st = os.lstat(path)
            except OSError:
                st = None
        mode = st.st_mode if st is not None else 0
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            message = (f"{path} has {st.st_nlink} hard links (the same file under another "
                       "name, possibly outside this folder); this tool never writes through "
                       "links in a run folder: replace it with a copy of its own (cp -p "
                       "FILE FILE.copy && mv FILE.copy FILE), or remove it, then run again")
        elif st is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)
                                     or stat.S_ISDIR(mode)):
            kind = next((name for test, name in SPECIAL_KINDS if test(mode)), "a special file")
            message = (f"{path} is {kind}, not a regular file; this tool never replaces or "
                       "writes into one there: remove it or choose another name, then run "
                       "again")
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


def unsafe(st):
    """Whether a name with this lstat must not be written in place: a symbolic link, a
    special file, or a regular file with more than one hard link."""
    if stat.S_ISDIR(st.st_mode):
        return False
    return not stat.S_ISREG(st.st_mode) or st.st_nlink > 1


def open_no_follow(path, flags, mode=0o666):
    """os.open that refuses (UnsafeLink) a symbolic link at `path` instead of following it
    (with O_CREAT, a dangling one would create its target), and what it opened unless it is
    a regular file with one name."""
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
