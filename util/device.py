"""The one place that names device types: selection, kernels, free memory, and the state of
every random-number generator a run touches (a resumed run draws what an uninterrupted one
would have drawn)."""
import os
import random

import numpy as np
import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def select_device(name="auto", local_rank=0):
    """`auto` picks CUDA, then Apple's MPS, then the CPU; a bare `cuda` is cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}; use one of auto, cpu, cuda, cuda:N, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine; "
                          "use --device cpu or --device auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not mps_available():
        raise DeviceError(f"--device {name}: MPS is not available; use --device cpu or auto")
    return device


def mps_available():
    mps = getattr(torch.backends, "mps", None)  # absent from some builds
    return mps is not None and mps.is_available()


def is_cuda(device):
    return torch.device(device).type == "cuda"


def configure_kernels(device, deterministic=None, cudnn_benchmark=False):
    """Choose the kernels before the first CUDA computation; returns whether deterministic
    algorithms are on (None: on for the CPU, where two runs with one seed are bitwise equal).
    cuDNN follows the release unless `cudnn_benchmark` picks the fastest, unrepeatable ones."""
    if deterministic is None:
        deterministic = not cudnn_benchmark and torch.device(device).type not in ("cuda", "mps")
    if deterministic and cudnn_benchmark:
        raise DeviceError("--deterministic and --cudnn-benchmark exclude each other: "
                          "give one of them")
    if deterministic and is_cuda(device):  # PyTorch refuses it without a fixed cuBLAS workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    # The EMA codebook fills with subnormal floats, slow microcode on CPUs: flushed, a 100-epoch
    # MNIST VQ-VAE (EMA) trains 2.7x faster and changes no code (benchmarks/denormals.py).
    torch.set_flush_denormal(True)
    torch.backends.cudnn.deterministic = not cudnn_benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return deterministic


def _proc_bytes(path, field):
    """The kB figure of `field` in a /proc file such as /proc/meminfo, in bytes, or None."""
    with open(path) as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field)), None)


def free_memory(device):
    """Bytes a new allocation on `device` can still get, or None: the CPU's MemAvailable (or
    less under RLIMIT_AS), CUDA's free memory and cache, MPS's recommended working set."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device.type == "mps":
            return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
        available = _proc_bytes("/proc/meminfo", "MemAvailable:")
        if available is None:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return min(n for n in (available, address_space_left()) if n is not None)
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def address_space_left():
    """Bytes left under RLIMIT_AS (`ulimit -v`), beyond which an allocation fails however much
    memory is free, or None (no limit, or no way to tell)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        used = _proc_bytes("/proc/self/status", "VmSize:")
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or used is None else max(soft - used, 0)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device and MPS


def get_rng_state():
    """All generator states as tensors and plain values (loadable with weights_only=True)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "keys": list(keys), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
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
