"""``-ts RUN --encode SPLIT``: ``codes_<SPLIT>.npz`` (util/codes.py), the code of every latent
position of a split; images decoded back from codes, and shown (reconstruction grids)."""
import hashlib
import io
import os

import numpy as np
import torch
from torchvision.utils import save_image

import data
from configs import config_to_yaml
from third_party.segmentation import colorize
from util.codes import MAX_CODES, pack_codes
from util.grid import reconstruction_grid as layout
from util.io import atomic_write_bytes

from .checkpoints import RunError

# The config sections that define a model: codes stay valid when the data or the run move.
MODEL_SECTIONS = ("dataset", "model", "network", "quantization", "flags")
# Keys that change no number a model computes (what dataset.shape restates, the memory
# layout): left out, so a config hashes as it did before they existed.
RESTATED = {"dataset": ("channels", "image_size"), "network": ("channels_last",)}


def config_hash(cfg):
    text = "".join(f"{name}:\n" + config_to_yaml(type(cfg[name])(
        {k: v for k, v in cfg[name].items() if k not in RESTATED.get(name, ())}))
        for name in MODEL_SECTIONS)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def whole_split(cfg, split, device="cpu", recorded=None):
    """A loader over every image of `split` in order, whatever --limit-batches or torchrun say."""
    return data.build_loader(cfg, split, batch_size=cfg.test.bs, shuffle=False, device=device,
                             recorded=recorded)


@torch.no_grad()
def encode_split(model, loader):
    """The code indices of every batch of `loader`, in order: uint16 N x H x W on the host."""
    model.eval()
    if model.codebook.shape[0] > MAX_CODES:
        raise RunError(f"{model.codebook.shape[0]} codes do not fit in uint16 indices")
    chunks = [model.encode(x).to("cpu", torch.int32) for x, _ in loader]
    return torch.cat(chunks).numpy().astype(np.uint16)


def write_codes(run_dir, cfg, split, codes, model, names=None):
    """Write codes_<split>.npz (with `names` where given) into the run folder; its path."""
    path = os.path.join(run_dir, f"codes_{split}.npz")
    codebook = model.code_vectors().detach().float().cpu().numpy()
    atomic_write_bytes(path, pack_codes(codes, codebook, config_hash(cfg), names=names))
    return path


@torch.no_grad()
def decode_indices(model, codes, device="cpu", batch_size=256):
    """Images for code indices N x H x W (any integer array or tensor): float N x C x H x W
    in [0, 1], or for label maps the argmax class N x 1 x H x W (int64). On the CPU."""
    model.eval()
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    if codes.dim() != 3 or tuple(codes.shape[1:]) != tuple(model.latent_shape):
        raise RunError(f"codes of shape {tuple(codes.shape)} do not fit this model: it "
                       f"decodes N x {model.latent_shape[0]} x {model.latent_shape[1]} grids")
    labels, out = model.OUTPUTS == "labels", []
    for chunk in codes.split(batch_size):  # each chunk to the host at once: logits are large
        x_hat = model.decode(chunk.to(device))
        out.append((x_hat.argmax(1, keepdim=True) if labels else x_hat).cpu())
    return torch.cat(out)


def displayable(x, labels):
    """Images clamped to [0, 1], or label maps coloured with the 19-class palette."""
    return colorize(x.long()) if labels else x.float().clamp(0, 1)


@torch.no_grad()
def reconstruct(model, x):
    """(x_hat, x and x_hat to show on the host): the deterministic pass, in eval mode, then back."""
    was_training, labels = model.training, model.OUTPUTS == "labels"
    model.eval()
    x_hat, _ = model(x, "deterministic")
    model.train(was_training)
    shown = displayable(x_hat.argmax(1) if labels else x_hat, labels)
    return x_hat, displayable(x, labels).cpu(), shown.cpu()


def write_png(images, paths, **grid):
    """Write `images` (one grid of them, torchvision's save_image) as a PNG to each path."""
    buffer = io.BytesIO()
    save_image(images, buffer, format="png", **grid)
    for path in paths:
        atomic_write_bytes(path, buffer.getvalue())


def save_reconstructions(model, x, paths, n=8):
    """Write the grid of `x[:n]` over its deterministic reconstructions to each path; returns it."""
    _, top, bottom = reconstruct(model, x[:n])
    grid = layout(top, bottom, columns=len(top))[0]
    write_png(grid, paths)
    return grid
