"""Checkpoints: plain data written atomically, loaded with ``weights_only=True`` and checked for
the keys their reader needs; weights loaded with a one-line mismatch. torch is imported where a
checkpoint is used: the companion commands answer --help without it."""
import os
import pickle
import warnings
import zipfile

from util.io import atomic_save

BEST, CURRENT = "best.pt", "current.pt"
# What each checkpoint must hold for its reader: key -> accepted types.
NUMBER = (int, float)
CHECKPOINT_KEYS = {
    BEST: {"model": dict, "epoch": (int, type(None))},
    CURRENT: {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "batch": int,
              "step": int, "best_loss": NUMBER, "best_epoch": int, "history": list,
              "train_meter": dict, "interval_meter": dict, "interval_codes": dict,
              "train_seconds": NUMBER, "rng": dict},
}
# Which config keys set the shape of which parameters (by name prefix).
SHAPE_KEYS = (
    ("quantizer.codebook", "quantization.size_dict, quantization.dim_dict"),
    ("encoder.head_log_var", "model.param_var_q"),
    ("log_var_x", "flags.arelbo"),
    ("log_kappa_inv", "model.name"),
    ("quantizer.ema_", "quantization.ema, quantization.size_dict, quantization.dim_dict"),
    (("encoder.res", "decoder.res"), "network.num_rb, quantization.dim_dict"),
    ("", "quantization.dim_dict, flags.bn, dataset.name"),
)


class RunError(ValueError):
    """A run folder or checkpoint problem the user can fix; one line."""


def save_checkpoint(path, state):
    import torch
    atomic_save(path, lambda buffer: torch.save(state, buffer))


def _try_load(path):
    """(the object in `path`, None) or (None, what is wrong with it)."""
    import torch
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle before refusing it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            return None, ("holds pickled Python objects, which are refused because loading "
                          "them could run code; re-save it with this tool")
        return None, "is corrupt (unreadable pickle data)"
    except FileNotFoundError:
        return None, "does not exist"
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError):
        return None, "is truncated or corrupt"


def read_checkpoint(path):
    """A checkpoint file's plain data, or a RunError saying whether the other checkpoint loads."""
    if not os.path.isfile(path):
        raise RunError(f"{path} does not exist: the run holds no checkpoint "
                       "(was it started with --save, and did it finish an epoch?)")
    state, problem = _try_load(path)
    if state is None:
        folder, name = os.path.split(path)
        other, hint = {BEST: CURRENT, CURRENT: BEST}.get(name), ""
        if other:
            usable = _try_load(os.path.join(folder, other))[0] is not None
            hint = f"; {other} " + ("in the same folder loads fine" if usable
                                    else "is not usable either")
        raise RunError(f"checkpoint {path} {problem}{hint}")
    return state


def load_checkpoint(path, needed=None):
    """A checkpoint with the keys and types `needed` (CHECKPOINT_KEYS), else a one-line RunError."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint "
                       "of this tool")
    needed = needed or CHECKPOINT_KEYS.get(os.path.basename(path), {"model": dict})
    missing = [k for k in needed if k not in state]
    wrong = [k for k, kinds in needed.items() if k in state and not isinstance(state[k], kinds)]
    if missing or wrong:
        what = (f"lacks {', '.join(missing)}" if missing else
                f"has {', '.join(f'{k} of type {type(state[k]).__name__}' for k in wrong)}")
        raise RunError(f"checkpoint {path} {what}: not a complete checkpoint of this tool"
                       + ("; best.pt in the same folder can still be evaluated with -ts"
                          if os.path.basename(path) == CURRENT else ""))
    import torch
    for key in ("model", "prior"):  # the entries that hold a module's state dict
        if key in needed and not all(isinstance(v, torch.Tensor) for v in state[key].values()):
            raise RunError(f"checkpoint {path}: its {key} entry is not a state dict of tensors")
    return state


def load_model_weights(model, state_dict, path):
    """load_state_dict, or a RunError naming mismatched parameters and the keys that set them."""
    own, problems, keys = model.state_dict(), [], []
    for name in sorted(set(own) | set(state_dict)):
        if name not in state_dict:
            problems.append(f"{name} missing from the file")
        elif name not in own:
            problems.append(f"{name} unexpected in the file")
        elif tuple(own[name].shape) != tuple(state_dict[name].shape):
            problems.append(f"{name} is {tuple(state_dict[name].shape)} in the file but "
                            f"{tuple(own[name].shape)} in the model")
        else:
            continue
        keys.append(next(k for prefix, k in SHAPE_KEYS if name.startswith(prefix)))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                          if len(problems) > 3 else "")
        raise RunError(f"checkpoint {path} does not match the config: {shown} "
                       f"(set by {', '.join(dict.fromkeys(keys))})")
    model.load_state_dict(state_dict)
