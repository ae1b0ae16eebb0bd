"""The codes file: a split's discrete code indices as plain numpy arrays.

``codes_<split>.npz`` (``np.savez``, no pickled objects) holds

* ``codes``: uint16, N x H x W, the deterministic code index of every latent position,
  in dataset order;
* ``codebook``: float32, K x D, the code vectors as the decoder sees them;
* ``config_hash``: a 0-d unicode array, the sha256 hex digest of the run's resolved
  config, so the codes are never decoded by a different model.

Only numpy is used here, so a prior can be trained on these files without importing
torch or this repository.
"""
import io
import os
import zipfile

import numpy as np

KEYS = ("codes", "codebook", "config_hash")
MAX_CODES = np.iinfo(np.uint16).max + 1


class CodesError(ValueError):
    """A codes file that cannot be used; the message is one line naming the file."""


def pack_codes(codes, codebook, config_hash):
    """The bytes of a codes file (write them atomically, e.g. with util.io)."""
    codes = np.asarray(codes)
    codebook = np.asarray(codebook, dtype=np.float32)
    if codebook.ndim != 2:
        raise CodesError(f"the codebook must be K x D, got shape {codebook.shape}")
    if codebook.shape[0] > MAX_CODES:
        raise CodesError(f"{codebook.shape[0]} codes do not fit in uint16 indices")
    if codes.ndim != 3:
        raise CodesError(f"codes must be N x H x W, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook.shape[0]):
        raise CodesError(f"code indices must lie in 0..{codebook.shape[0] - 1}")
    buffer = io.BytesIO()
    np.savez(buffer, codes=codes.astype(np.uint16), codebook=codebook,
             config_hash=np.array(str(config_hash)))
    return buffer.getvalue()


def load_codes(path):
    """``{"codes": uint16 N x H x W, "codebook": float32 K x D, "config_hash": str}``, or a
    CodesError saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise CodesError(f"codes file {path} does not exist (write it with "
                         "main.py -ts RUN --encode SPLIT)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise CodesError(f"codes file {path} lacks {', '.join(missing)}: "
                                 "not a codes file of this tool")
            out = {k: npz[k] for k in KEYS}
    except CodesError:
        raise
    except ValueError as e:
        # np.load says "Object arrays cannot be loaded when allow_pickle=False".
        reason = "holds pickled objects, which are refused" if "pickle" in str(e) \
            else "is corrupt or truncated"
        raise CodesError(f"codes file {path} {reason}") from None
    except (OSError, EOFError, zipfile.BadZipFile):
        raise CodesError(f"codes file {path} is corrupt or truncated") from None
    codes, codebook, digest = out["codes"], out["codebook"], out["config_hash"]
    if codes.dtype != np.uint16 or codes.ndim != 3:
        raise CodesError(f"codes file {path}: codes are {codes.dtype} {codes.shape}, "
                         "expected uint16 N x H x W")
    if codebook.dtype != np.float32 or codebook.ndim != 2:
        raise CodesError(f"codes file {path}: codebook is {codebook.dtype} {codebook.shape}, "
                         "expected float32 K x D")
    if digest.shape != () or digest.dtype.kind != "U":
        raise CodesError(f"codes file {path}: config_hash is not a string")
    if codes.size and int(codes.max()) >= codebook.shape[0]:
        raise CodesError(f"codes file {path}: index {int(codes.max())} is outside the "
                         f"codebook of {codebook.shape[0]} codes")
    return {"codes": codes, "codebook": codebook, "config_hash": str(digest)}


def code_usage(codes, size):
    """How often each of `size` codes occurs in `codes`, the perplexity exp(H) of those
    frequencies (as the trainer's split-level ``perplexity_split``) and the codes in use."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64).ravel(), minlength=size)
    total = counts.sum()
    q = counts[counts > 0] / max(total, 1)
    return {"counts": counts, "perplexity": float(np.exp(-(q * np.log(q)).sum())),
            "codes_used": int((counts > 0).sum())}
