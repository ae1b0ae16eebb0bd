"""Per-file decoding for the datasets read from image files.

Each function maps one file to the uint8 array the model sees (before scaling), so
the decoded cache (``data.cache``) calls the very same code and stays bit-identical.
"""
import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from util.cli import one_line

from .errors import DatasetError

CELEBA_CROP = 140
IMAGE_SIZE = 64
# The CelebAMask-HQ face parts, in the order the label maps paint them (a later part
# overwrites an earlier one); label k + 1 is PARTS[k], 0 is background.
LABEL_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear",
               "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck",
               "cloth")
NUM_LABEL_CLASSES = len(LABEL_PARTS) + 1  # 19

# What PIL raises on unreadable input: UnidentifiedImageError and "image file is
# truncated" are OSErrors, but some plugins (PNG among them) raise SyntaxError or
# ValueError for broken chunks, and a short read can surface as EOFError.
_PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def open_image(path, what):
    try:
        # open() is lazy: decode now, so a broken file fails here with its name, and
        # leave the block with the pixels in memory and the file closed either way.
        with Image.open(path) as img:
            img.load()
    except _PIL_READ_ERRORS as e:
        raise DatasetError(f"cannot read {what} {path}: {one_line(e)} "
                           "(truncated or corrupt; replace the file)") from None
    return img


def decode_celeba(path):
    """CelebA JPEG -> uint8 array 3x64x64: CenterCrop(140) then Resize(64).

    torchvision's functional ops on a PIL image are used (bilinear, antialiased by PIL)
    so the result equals transforms.Compose([CenterCrop(140), Resize(64)]) exactly.
    """
    img = open_image(path, "CelebA image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = TF.center_crop(img, [CELEBA_CROP, CELEBA_CROP])
    img = TF.resize(img, [IMAGE_SIZE, IMAGE_SIZE], interpolation=InterpolationMode.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_celebamask_label(path):
    """CelebAMask-HQ label PNG -> uint8 array 1x64x64 of class indices 0..18.

    Nearest-neighbour resizing keeps every pixel a valid class index; a file that is
    already 64x64 (the prepared ``*_label_64`` folders) passes through unchanged.
    """
    img = open_image(path, "CelebAMask-HQ label map")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise DatasetError(f"CelebAMask-HQ label map {path} has {arr.shape[-1]} channels; "
                           "expected a single-channel PNG of class indices 0..18")
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_LABEL_CLASSES):
        raise DatasetError(f"CelebAMask-HQ label map {path} holds values "
                           f"{int(arr.min())}..{int(arr.max())}; expected class indices 0..18")
    return arr.astype(np.uint8)[None]


# What each function's output depends on besides the file, recorded by the decoded cache
# (data.cache) next to the cached arrays for anyone reading its sidecar.
decode_celeba.params = {"crop": CELEBA_CROP, "size": IMAGE_SIZE, "resize": "bilinear"}
decode_celebamask_label.params = {"size": IMAGE_SIZE, "resize": "nearest"}
