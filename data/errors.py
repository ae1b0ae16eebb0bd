"""DatasetError, for problems with dataset files, and what its messages share."""
import os


class DatasetError(ValueError):
    """Dataset files missing, truncated or corrupt; one line: which file, what to put where."""


def file_state(path):
    """(size, mtime in ns) of the file at `path`; DatasetError where it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror}") from None
    return stat.st_size, stat.st_mtime_ns


def first_few(names, count=3):
    """The first `count` of `names`, comma-separated, ending in ', ...' when there are more."""
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")
