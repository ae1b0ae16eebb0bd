"""Crash-safe file writes: every file goes to a temporary name in the same folder, is
flushed to disk, then renamed into place, so a reader never sees half a file."""
import io
import json
import os
import tempfile

# mkstemp creates files readable by their owner only; run folders are meant to be shared
# like any file the user writes, so apply the process umask as open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def atomic_write_bytes(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path, save_fn):
    """Serialise with `save_fn(buffer)` into memory, then write atomically."""
    buffer = io.BytesIO()
    save_fn(buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_jsonl(path, records):
    """Rewrite a JSON-lines file atomically from a list of dicts."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_writable(folder):
    """Create `folder` if needed and prove a file can be written there; returns an error
    string or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror}"
    return None
