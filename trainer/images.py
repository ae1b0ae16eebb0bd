"""Reconstruction grids: originals in the top row, reconstructions below."""
import io

import torch
from torchvision.utils import make_grid, save_image

from third_party.segmentation import colorize
from util.io import atomic_write_bytes

GRID_IMAGES = 8


def to_display(x, x_hat):
    """Image tensors in [0, 1] for the originals and their reconstructions; label maps are
    coloured with the 19-class palette (the reconstruction is the argmax channel)."""
    if x_hat.shape[1] != x.shape[1] or not torch.is_floating_point(x):
        return colorize(x.long()), colorize(x_hat.argmax(1))
    return x.float(), x_hat.float().clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model, x, n=GRID_IMAGES):
    was_training = model.training
    model.eval()
    x = x[:n]
    x_hat, _ = model(x, "deterministic")
    model.train(was_training)
    top, bottom = to_display(x, x_hat)
    return make_grid(torch.cat([top, bottom]).cpu(), nrow=len(x), padding=2)


def save_reconstructions(model, x, paths):
    """Render the grid once and write it (atomically) to every path; returns the grid."""
    grid = reconstruction_grid(model, x)
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    for path in paths:
        atomic_write_bytes(path, buffer.getvalue())
    return grid
