"""Opening an image file, and any picture to the square array a model reads (the decoded cache
calls the very same code). A dataset's own decoding lives in its module under data/sources/."""
import warnings

import numpy as np
from PIL import Image, ImageOps

from util.text import one_line

from .errors import DatasetError

# What PIL raises on unreadable input: OSError mostly; some plugins (PNG) raise SyntaxError or
# ValueError on broken chunks, a short read EOFError, a claim of billions of pixels a bomb error.
_PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(path, what):
    try:  # open() is lazy: decode now, so that a broken file fails here with its name
        with warnings.catch_warnings():  # legitimate pictures over 89 Mpx warn: decode them
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
    except _PIL_READ_ERRORS as e:
        raise DatasetError(f"cannot read {what} {path}: {one_line(e)} "
                           "(truncated or corrupt; replace the file)") from None
    return img


class PictureDecoder:
    """Any picture Pillow reads -> uint8 C x size x size: upright by its EXIF orientation, grey
    or RGB (`channels` 1 or 3; under alpha the colour shows, as torchvision loads it), its
    centred square resized with antialiasing; else DatasetError. An object: workers get it."""

    def __init__(self, channels, size):
        self.channels, self.size = int(channels), int(size)
        # What the output depends on besides the file: the decoded cache's sidecar records it.
        self.params = {"channels": self.channels, "size": self.size, "crop": "centre square",
                       "resize": "bicubic, antialiased"}

    def __call__(self, path):
        img = open_image(path, "image")
        try:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                # 16-bit greys by full range; 32-bit ints and floats as 8 bits if they fit, else 16
                values = np.asarray(img, dtype=np.float64)
                if img.mode.startswith("I;16") or (values.size and values.max() > 255):
                    values = values / 257.0
                img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # what Pillow asks for, rather than warn
            mode = "L" if self.channels == 1 else "RGB"
            img = img if img.mode == mode else img.convert(mode)
            (width, height), side = img.size, min(img.size)
            if width != height:  # the largest centred square, resized unless it fits
                left, top = (width - side) // 2, (height - side) // 2
                img = img.crop((left, top, left + side, top + side))
            if side != self.size:
                img = img.resize((self.size, self.size), Image.BICUBIC)
        except _PIL_READ_ERRORS as e:  # e.g. a broken EXIF block or an exotic mode
            raise DatasetError(f"cannot read image {path}: {one_line(e)}") from None
        array = np.asarray(img, dtype=np.uint8)
        return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
