"""The reconstruction grid, as a plain array: the one layout every figure and PNG uses."""
import math

import numpy as np


def reconstruction_grid(originals, reconstructions, columns=8, pad=2):
    """One image: rows of `columns` originals, each row followed by the row of their
    reconstructions; grey lines between images, a wider gap between row pairs. Returns the
    image (H x W x C) and the centre row of every original and reconstruction row."""
    n, h, w, c = originals.shape
    columns = min(columns, n)
    pairs = math.ceil(n / columns)
    gap = 4 * pad
    width = columns * (w + pad) - pad
    grid = np.full((pairs * (2 * h + pad) + (pairs - 1) * gap, width, c), 0.5, np.float32)
    centres = []
    for i in range(n):
        pair, col = divmod(i, columns)
        top = pair * (2 * h + pad + gap)
        left = col * (w + pad)
        grid[top:top + h, left:left + w] = originals[i]
        grid[top + h + pad:top + 2 * h + pad, left:left + w] = reconstructions[i]
        if col == 0:
            centres += [(top + h / 2, "original"), (top + h + pad + h / 2, "reconstruction")]
    return grid, centres
