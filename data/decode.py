"""Opening an image file, and any picture to the square array a model reads (the decoded cache
calls the very same code). A dataset's own decoding lives in its module under data/sources/."""
import warnings

import numpy as np
from PIL import Image, ImageOps

from util.text import one_line

from .errors import DatasetError

# What PIL raises on unreadable input: UnidentifiedImageError and "image file is
# truncated" are OSErrors, but some plugins (PNG among them) raise SyntaxError or
# ValueError for broken chunks, a short read can surface as EOFError, and a file that
# claims billions of pixels raises DecompressionBombError rather than allocate them.
_PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(path, what):
    try:
        # open() is lazy: decode now, so a broken file fails here with its name, and
        # leave the block with the pixels in memory and the file closed either way.
        with warnings.catch_warnings():
            # Large but legitimate pictures (over 89 Mpx) warn; they are decoded all the same.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
    except _PIL_READ_ERRORS as e:
        raise DatasetError(f"cannot read {what} {path}: {one_line(e)} "
                           "(truncated or corrupt; replace the file)") from None
    return img


# Integer modes wider than 8 bits, and what brings their values to 0..255: 16-bit greys
# (PNG, TIFF) by their full range; 32-bit ints and floats as 8-bit values when they fit,
# else as 16-bit ones.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _eight_bit_grey(img):
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def as_channels(img, channels):
    """`img` as 8-bit grey (`channels` 1) or RGB (3). Alpha is dropped (the colour under a
    transparent pixel shows, as torchvision's image loader does), palette images are
    expanded, 16-bit greys scaled to 8 bits."""
    if img.mode in _WIDE_MODES:
        img = _eight_bit_grey(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what Pillow asks for, rather than warn
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


def centre_square(img, size):
    """The largest centred square of `img`, resized (antialiased, bicubic) to size x size."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if (width, height) != (side, side):
        img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.BICUBIC)


class PictureDecoder:
    """Any picture Pillow reads -> uint8 C x size x size: upright by its EXIF orientation,
    grey or RGB (`channels` 1 or 3), its centred square resized with antialiasing. Raises
    DatasetError naming the file when it cannot be decoded. An object (not a closure) so
    that the decoded cache's worker processes can be handed it."""

    def __init__(self, channels, size):
        self.channels, self.size = int(channels), int(size)
        # What the output depends on besides the file (the decoded cache's sidecar records it).
        self.params = {"channels": self.channels, "size": self.size, "crop": "centre square",
                       "resize": "bicubic, antialiased"}

    def __call__(self, path):
        img = open_image(path, "image")
        try:
            img = ImageOps.exif_transpose(img)
            img = centre_square(as_channels(img, self.channels), self.size)
        except _PIL_READ_ERRORS as e:  # e.g. a broken EXIF block or an exotic mode
            raise DatasetError(f"cannot read image {path}: {one_line(e)}") from None
        array = np.asarray(img, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)
