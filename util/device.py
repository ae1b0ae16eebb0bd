"""Device selection: the one place that names device types."""
import os

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def select_device(name="auto", local_rank=0):
    """`auto` picks CUDA, then Apple's MPS, then the CPU. Under torchrun, a bare `cuda`
    means this process's own GPU, cuda:LOCAL_RANK."""
    mps_ok = mps_available()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        else:
            return torch.device("mps") if mps_ok else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use one of {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine; "
                              "use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                              "device(s) here")
    elif device.type == "mps" and not mps_ok:
        raise DeviceError(f"--device {name}: MPS is not available; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}; use one of {DEVICE_CHOICES}")
    return device


def mps_available():
    mps = getattr(torch.backends, "mps", None)  # absent from some builds
    return mps is not None and mps.is_available()


def is_cuda(device):
    return torch.device(device).type == "cuda"


def widest_float(device):
    """The most precise float dtype `device` computes in: float64, but float32 on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


# cuBLAS needs a fixed workspace for repeatable results; PyTorch refuses deterministic
# algorithms on CUDA without this setting, which cuBLAS reads at its first call.
CUBLAS_WORKSPACE = ":4096:8"


def configure_kernels(device, deterministic=None, cudnn_benchmark=False):
    """Choose the kernels (before the first CUDA computation); returns whether deterministic
    algorithms are on. `deterministic` None: on for the CPU (two runs with one seed are
    bitwise equal), off on GPUs. cuDNN follows the release (deterministic, no benchmark)
    unless `cudnn_benchmark` lets it pick the fastest, unrepeatable algorithms."""
    if deterministic is None:
        deterministic = (not cudnn_benchmark and not is_cuda(device)
                         and torch.device(device).type != "mps")
    if deterministic and cudnn_benchmark:
        raise DeviceError("--deterministic and --cudnn-benchmark exclude each other: "
                          "give one of them")
    if deterministic and is_cuda(device):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    # Subnormal floats (below 1.2e-38) go through slow microcode on CPUs. The EMA codebook
    # fills with them: an unused code's statistics shrink by the decay every step. Flushed
    # to zero, a 100-epoch MNIST VQ-VAE (EMA) trains 2.7x and evaluates 3.8x faster
    # (benchmarks/denormals.py); a value that small changes no distance, code or loss.
    torch.set_flush_denormal(True)
    torch.backends.cudnn.deterministic = not cudnn_benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return deterministic


def free_memory(device):
    """Bytes a new allocation on `device` can still get, or None where unknown: on the CPU
    MemAvailable (no swapping, no OOM killer) or what RLIMIT_AS leaves if less, on CUDA the
    free memory plus PyTorch's cache, on MPS the recommended working set."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device.type == "mps":
            return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f
                              if line.startswith("MemAvailable:")), None)
        if available is None:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit = address_space_left()
        return available if limit is None else min(available, limit)
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None


def address_space_left():
    """Bytes of address space left under RLIMIT_AS (`ulimit -v`), or None (no limit, or no
    way to tell): an allocation beyond it fails however much memory is free."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("VmSize:"))
    except (ImportError, OSError, ValueError, StopIteration):
        return None
    return max(soft - used, 0)
