"""Refuse, before any run folder exists, a training batch that cannot work: larger than the
split, or whose activations (a lower bound: every module's output for one blank image, times
the batch) exceed the free memory, where the OOM killer would end a CPU run uncleanly.
"""
import torch

from configs import ConfigError
from util.device import free_memory, get_rng_state, set_rng_state

GIB, MIB = 2 ** 30, 2 ** 20


@torch.no_grad()
def activation_bytes_per_image(cfg, model, device):
    """Bytes of the outputs of the model's leaf modules (and the input) for one image."""
    labels = model.OUTPUTS == "labels"
    x = torch.zeros(1, *cfg.dataset.shape, dtype=torch.long if labels else torch.float32,
                    device=device)
    total = [x.numel() * x.element_size()]

    def count(module, inputs, output):
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total.append(out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training, rng = model.training, get_rng_state()
    try:
        model.eval()  # no batch-norm statistics or EMA codebook updates
        model(x, "deterministic")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        set_rng_state(rng)
    per_image = sum(total)
    # bf16 autocast halves the convolutions' outputs at most.
    return per_image // 2 if cfg.train.amp else per_image


def check_batch(cfg, model, loader, device):
    """ConfigError for no training batch, or one larger than the split or the free memory."""
    batch, images = loader.batch_size, loader.num_samples
    if len(loader) == 0:
        raise ConfigError(f"no training batch: {images} training images on this process make "
                          f"no batch of {batch} with train.drop_last True; lower train.bs or "
                          "set train.drop_last False")
    if batch > images:
        raise ConfigError(f"train.bs {cfg.train.bs} makes batches of {batch} images, more than "
                          f"the {images} training images of this process; set train.bs to "
                          f"at most {images}")
    available = free_memory(device)
    if available is None:
        return
    per_image = activation_bytes_per_image(cfg, model, device)
    if per_image * batch > available:
        raise ConfigError(
            f"train.bs {cfg.train.bs}: a batch of {batch} images needs at least "
            f"{per_image * batch / GIB:.1f} GiB for its activations ({per_image / MIB:.2f} MiB "
            f"per image), but {torch.device(device).type} has {available / GIB:.1f} GiB free; "
            f"set train.bs to at most {max(1, available // per_image)}")
