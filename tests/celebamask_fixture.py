"""A small synthetic CelebAMask-HQ *release*, the input of data.prepare_celebamask_hq.

``write_release(folder)`` writes 8 faces in the release layout (JPEGs, 512x512 part
masks, mapping file) and returns a Release describing what the prepared output must
be. The expected labels are painted here from the same boxes the masks are drawn
from, independently of the tool's code.
"""
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
         "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
SIZE = 512

# (k, orig_idx) in mapping-file order. orig_idx sits on both sides of each CelebA
# partition boundary (162770|162771, 182637|182638), and k is shuffled against the
# row order so that n (per split, in row order) differs from k and from the row index.
ROWS = ((5, 182638), (2, 162770), (7, 162771), (0, 182637),
        (3, 10), (6, 200000), (1, 162769), (4, 170000))
SPLITS = {"train": [2, 3, 1], "val": [7, 0, 4], "test": [5, 6]}
UNANNOTATED = (3, 6)

# Boxes (top, bottom, left, right) listed in an order that is NOT the painting order
# (hair before skin, cloth before neck, eye_g after l_eye), so a tool painting in file
# or listing order gets the overlaps wrong.
_BOXES = (
    ("hair", (40, 200, 100, 412)),
    ("cloth", (440, 512, 40, 472)),
    ("skin", (100, 400, 120, 392)),
    ("l_eye", (190, 212, 170, 222)),
    ("eye_g", (180, 222, 150, 362)),
    ("nose", (230, 290, 236, 276)),
    ("mouth", (320, 352, 210, 302)),
    ("u_lip", (316, 330, 214, 298)),
    ("neck", (380, 470, 180, 332)),
)


@dataclass
class Release:
    root: str
    rows: tuple = ROWS
    splits: dict = field(default_factory=lambda: {s: list(ks) for s, ks in SPLITS.items()})
    unannotated: tuple = UNANNOTATED

    @property
    def mapping(self):
        return os.path.join(self.root, "CelebA-HQ-to-CelebA-mapping.txt")

    def image(self, k):
        return os.path.join(self.root, "CelebA-HQ-img", f"{k}.jpg")

    def mask(self, k, part):
        return os.path.join(self.root, "CelebAMask-HQ-mask-anno", str(k // 2000),
                            f"{k:05d}_{part}.png")

    def masks(self, k):
        return [self.mask(k, part) for part, _ in boxes(k)]

    def label(self, k):
        return expected_label(k)


def boxes(k):
    """The part boxes of face k, shifted by k so every face has a different label."""
    if k in UNANNOTATED:
        return []
    shift = 4 * k
    return [(part, (t, b, max(0, l - shift), min(SIZE, r - shift)))
            for part, (t, b, l, r) in _BOXES]


def expected_label(k):
    label = np.zeros((SIZE, SIZE), np.uint8)
    by_part = dict(boxes(k))
    for value, part in enumerate(PARTS, start=1):
        if part in by_part:
            t, b, l, r = by_part[part]
            label[t:b, l:r] = value
    return label


def write_mask(path, box, mode="L", size=SIZE):
    """One part mask in a given PIL mode; the part is drawn with a nonzero value."""
    t, b, l, r = box
    present = np.zeros((size, size), bool)
    present[t:b, l:r] = True
    if mode == "L":
        img = Image.fromarray(np.where(present, 255, 0).astype(np.uint8))
    elif mode == "RGB":  # only one channel set: "any channel nonzero" must count it
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[present, 2] = 7
        img = Image.fromarray(rgb)
    elif mode == "P":  # index 1, coloured white
        img = Image.frombytes("P", (size, size), present.astype(np.uint8).tobytes())
        img.putpalette([0, 0, 0, 255, 255, 255])
    elif mode == "1":
        img = Image.fromarray(present)
    else:
        raise ValueError(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def write_image(path, k):
    """A small real JPEG whose bytes differ from face to face."""
    rng = np.random.default_rng(k)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def write_mapping(path, rows):
    with open(path, "w") as f:
        f.write("idx orig_idx orig_file\n")
        for k, orig_idx in rows:
            f.write(f"{k} {orig_idx} {orig_idx + 1:06d}.jpg\n")


def write_release(folder):
    """The 8-face release described at the top of this module; returns its Release."""
    release = Release(root=str(folder))
    modes = ("L", "RGB", "P", "1")
    os.makedirs(os.path.join(release.root, "CelebAMask-HQ-mask-anno", "0"), exist_ok=True)
    for k, _ in ROWS:
        write_image(release.image(k), k)
        for i, (part, box) in enumerate(boxes(k)):
            write_mask(release.mask(k, part), box, mode=modes[(k + i) % len(modes)])
    write_mapping(release.mapping, ROWS)
    return release
