"""CelebAMask-HQ: the label maps ``data.prepare_celebamask_hq`` writes (``CelebAMask-HQ/
{train,val,test}_label/<n>.png``), as 64x64 maps of 19 class indices (no automatic download)."""
import os
import re

import numpy as np
from PIL import Image

from ..decode import open_image
from ..errors import DatasetError
from .layouts import SPLITS
from .spec import Files, Source

NAME, CELEBAMASK_DIR, IMAGE_SIZE = "CelebAMask_HQ", "CelebAMask-HQ", 64
# The face parts in the order they are painted (a later one wins): label k + 1, 0 background.
LABEL_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
               "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
NUM_LABEL_CLASSES = len(LABEL_PARTS) + 1  # 19


def _numbered_pngs(root, split, suffix=""):
    """<root>/<split>_label<suffix>/<n>.png in numeric order (10 after 9); None: no folder."""
    folder = os.path.join(root, f"{split}_label{suffix}")
    if not os.path.isdir(folder):
        return None
    numbered = sorted((int(m[1]), m.string) for m in (re.match(r"(\d+)\.png$", name)
                                                       for name in os.listdir(folder)) if m)
    return [os.path.join(folder, name) for _, name in numbered]


def celebamask_files(root, split):
    """The label maps of one split in numeric order: a prepared ``<split>_label_64`` where it is
    complete (as many as ``<split>_label``, or alone), which saves the 512->64 resize."""
    folder = os.path.join(root, CELEBAMASK_DIR)
    full, small = _numbered_pngs(folder, split), _numbered_pngs(folder, split, "_64")
    found = small if small and (full is None or len(small) == len(full)) else full
    if found:
        return found
    absent = [f"{s}_label{os.sep}" for s in SPLITS
              if not (_numbered_pngs(folder, s) or _numbered_pngs(folder, s, "_64"))]
    raise DatasetError(f"{NAME} not found under {root}: {', '.join(absent)} missing or empty in "
                       f"{folder}{os.sep}; run `python -m data.prepare_celebamask_hq --src "
                       f"RELEASE_DIR --dst {root}` to write {{train,val,test}}_label{os.sep}"
                       "<n>.png there (no automatic download)")


def decode_celebamask_label(path):
    """Label PNG -> uint8 1x64x64 of class indices 0..18, resized nearest unless it is 64x64."""
    img = open_image(path, "CelebAMask-HQ label map")  # resized unless 64x64 (then copied)
    arr = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST))
    if arr.ndim != 2:
        raise DatasetError(f"CelebAMask-HQ label map {path} has {arr.shape[-1]} channels; "
                           "expected a single-channel PNG of class indices 0..18")
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_LABEL_CLASSES):
        raise DatasetError(f"CelebAMask-HQ label map {path} holds values "
                           f"{int(arr.min())}..{int(arr.max())}; expected class indices 0..18")
    return arr.astype(np.uint8)[None]


# What the decoding depends on besides the file, as the decoded cache's sidecar records it:
decode_celebamask_label.params = {"size": IMAGE_SIZE, "resize": "nearest"}


def read(cfg, split, recorded=None):
    return Files(celebamask_files(os.path.abspath(cfg.path_dataset), split),
                 decode_celebamask_label, cache=f"celebamask_{split}_{IMAGE_SIZE}")


SOURCE = Source(NAME, read)
