"""The reconstruction grid every PNG and report figure shows, laid out by make_grid."""
import math

import torch
from torchvision.utils import make_grid


def reconstruction_grid(originals, reconstructions, columns=8, pad=2):
    """Rows of `columns` originals (N x C x H x W in [0, 1]) above their reconstructions, on grey:
    a C x H x W image, and the centre height of each row with what it shows."""
    n, c, h, w = originals.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    blank = originals.new_full((rows * columns - n, c, h, w), 0.5)  # the last row's gap
    pairs = torch.stack([torch.cat([images, blank]).unflatten(0, (rows, columns))
                         for images in (originals, reconstructions)], 1)
    centres = [(pad + row * (h + pad) + h / 2, ("original", "reconstruction")[row % 2])
               for row in range(2 * rows)]
    return make_grid(pairs.flatten(0, 2), nrow=columns, padding=pad, pad_value=0.5), centres
