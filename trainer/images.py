"""Reconstruction grids: originals in the top row, reconstructions below."""
import io

import torch
from torchvision.utils import save_image

from third_party.segmentation import colorize
from util.grid import reconstruction_grid as layout
from util.io import atomic_write_bytes

GRID_IMAGES = 8


def displayable(x, labels):
    """Images clamped to [0, 1], or label maps coloured with the 19-class palette."""
    return colorize(x.long()) if labels else x.float().clamp(0, 1)


def to_display(x, x_hat, labels):
    """The originals and their reconstructions (label maps: the argmax channel), to show."""
    return displayable(x, labels), displayable(x_hat.argmax(1) if labels else x_hat, labels)


@torch.no_grad()
def save_reconstructions(model, x, paths, n=GRID_IMAGES):
    """Write the grid of `x[:n]` over its deterministic reconstructions to each path; returns it."""
    was_training = model.training
    model.eval()
    x = x[:n]
    x_hat, _ = model(x, "deterministic")
    model.train(was_training)
    top, bottom = to_display(x, x_hat, model.OUTPUTS == "labels")
    grid = layout(top.cpu(), bottom.cpu(), columns=len(x))[0]
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    for path in paths:
        atomic_write_bytes(path, buffer.getvalue())
    return grid
