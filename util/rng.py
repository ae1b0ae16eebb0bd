"""Seeding and capturing every random-number generator a run touches, so a resumed run
continues with exactly the random stream an uninterrupted one would have drawn."""
import random

import numpy as np
import torch

from .device import mps_available


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device and MPS


def get_rng_state():
    """All generator states as tensors and plain values (loadable with weights_only=True)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_all"] = torch.cuda.get_rng_state_all()
    if mps_available():  # MPS draws (Gumbel noise, dropout) from its own generator
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    py_state, np_state = state["python"], state["numpy"]
    random.setstate((py_state["version"], tuple(py_state["keys"]), py_state["gauss"]))
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda_all" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_all"])
    if "mps" in state and mps_available():
        torch.mps.set_rng_state(state["mps"])
