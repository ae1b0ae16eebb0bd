"""The codes file ``codes_<split>.npz``, numpy only and nothing pickled: ``codes`` (uint16
N x H x W), ``codebook`` (float32 K x D), ``config_hash`` (0-d str) and, for ``--encode
images``, ``names`` (docs/usage.md, "Reports and codes"); CodeUsage, the code statistics."""
import io
import os
import zipfile

import numpy as np

KEYS = ("codes", "codebook", "config_hash")
NAMES = "names"  # optional
MAX_CODES = np.iinfo(np.uint16).max + 1


class CodesError(ValueError):
    """A codes file that cannot be used; the message is one line naming the file."""


def pack_codes(codes, codebook, config_hash, names=None):
    """The bytes of a codes file; `names`, where given, name the file of each row."""
    codes, codebook = np.asarray(codes), np.asarray(codebook, dtype=np.float32)
    if codebook.ndim != 2:
        raise CodesError(f"the codebook must be K x D, got shape {codebook.shape}")
    if codebook.shape[0] > MAX_CODES:
        raise CodesError(f"{codebook.shape[0]} codes do not fit in uint16 indices")
    if codes.ndim != 3:
        raise CodesError(f"codes must be N x H x W, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook.shape[0]):
        raise CodesError(f"code indices must lie in 0..{codebook.shape[0] - 1}")
    extra = {}
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(codes):
            raise CodesError(f"{len(names)} names for {len(codes)} rows of codes")
        extra["names"] = np.array(names, dtype=str)
    buffer = io.BytesIO()
    np.savez(buffer, codes=codes.astype(np.uint16), codebook=codebook,
             config_hash=np.array(str(config_hash)), **extra)
    return buffer.getvalue()


def load_codes(path):
    """The arrays of a codes file (``config_hash`` a str, ``names`` a list), or a CodesError."""
    if not os.path.isfile(path):
        raise CodesError(f"codes file {path} does not exist (write it with "
                         "main.py -ts RUN --encode SPLIT)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            out = {} if missing else {k: npz[k] for k in KEYS + (NAMES,) if k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # np.load says "Object arrays cannot be loaded when allow_pickle=False".
        pickled = isinstance(e, ValueError) and "pickle" in str(e)
        why = "holds pickled objects, which are refused" if pickled else "is corrupt or truncated"
        raise CodesError(f"codes file {path} {why}") from None
    if missing:
        raise CodesError(f"codes file {path} lacks {', '.join(missing)}: not a codes file of "
                         "this tool")
    codes, codebook, digest = out["codes"], out["codebook"], out["config_hash"]
    for what, array, dtype, shape in (("codes are", codes, "uint16", "N x H x W"),
                                      ("codebook is", codebook, "float32", "K x D")):
        if array.dtype != dtype or array.ndim != len(shape.split(" x ")):
            raise CodesError(f"codes file {path}: {what} {array.dtype} {array.shape}, "
                             f"expected {dtype} {shape}")
    if digest.shape != () or digest.dtype.kind != "U":
        raise CodesError(f"codes file {path}: config_hash is not a string")
    if codes.size and int(codes.max()) >= codebook.shape[0]:
        raise CodesError(f"codes file {path}: index {int(codes.max())} is outside the "
                         f"codebook of {codebook.shape[0]} codes")
    loaded = {"codes": codes, "codebook": codebook, "config_hash": str(digest)}
    if NAMES in out:
        names = out[NAMES]
        if names.dtype.kind != "U" or names.shape != (len(codes),):
            raise CodesError(f"codes file {path}: names are {names.dtype} {names.shape}, "
                             f"expected {len(codes)} strings")
        loaded[NAMES] = [str(n) for n in names]
    return loaded


class CodeUsage:
    """How often each of K codes is used, and its figures. Made only by ``from_codes`` (indices)
    or ``from_counts`` (a histogram), so a histogram is never histogrammed again by mistake."""

    __slots__ = ("counts",)

    def __init__(self, counts, *, _checked=False):
        if not _checked:
            raise TypeError("use CodeUsage.from_codes(codes, size) or "
                            "CodeUsage.from_counts(counts)")
        self.counts = counts

    @classmethod
    def from_codes(cls, codes, size):
        """The usage of `size` codes by the indices `codes` (any shape)."""
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise TypeError(f"code indices must be integers, got {codes.dtype}")
        return cls(np.bincount(codes.astype(np.int64).ravel(), minlength=size), _checked=True)

    @classmethod
    def from_counts(cls, counts):
        """The usage given a histogram: a 1-D array with one count per code."""
        counts = np.asarray(counts)
        if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise ValueError("counts must be a 1-D array of non-negative integers, one per code")
        return cls(counts.astype(np.int64), _checked=True)

    @property
    def total(self):
        return int(self.counts.sum())

    @property
    def codes_used(self):
        return int((self.counts > 0).sum())

    @property
    def entropy(self):
        """Entropy in nats of the code frequencies (0 for an empty histogram)."""
        q = self.counts[self.counts > 0] / max(self.total, 1)
        return float((q * np.log(1 / q)).sum())  # a sum of non-negative terms: never -0.0

    @property
    def perplexity(self):
        """exp(entropy): the split-level ``perplexity_split`` (not the quantizer's per batch)."""
        return float(np.exp(self.entropy))
