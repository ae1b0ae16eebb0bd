"""Device selection: the one place that names device types."""
import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def select_device(name="auto", local_rank=0):
    """`auto` picks CUDA, then Apple's MPS, then the CPU. Under torchrun, a bare `cuda`
    means this process's own GPU, cuda:LOCAL_RANK."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
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


def is_cuda(device):
    return torch.device(device).type == "cuda"


def set_deterministic(enabled, device):
    """Bitwise-repeatable kernels where the backend offers them."""
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and is_cuda(device)
