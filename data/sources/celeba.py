"""CelebA: the aligned 178x218 JPEGs and the official partition list, as file lists, each image
centre-cropped to 140x140 and resized to 64x64 (the release's transforms)."""
import os

import numpy as np
import torchvision.datasets as tvd
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..decode import open_image
from ..errors import DatasetError
from .layouts import SPLITS, find_folder
from .spec import Files, Reads, Source

NAME = "CelebA"
CELEBA_DIR = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_CROP = 140
IMAGE_SIZE = 64


def _read_celeba_partition(path):
    """[train, val, test] names, as list_eval_partition.txt marks them 0, 1 and 2."""
    splits = ([], [], [])
    with open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetError(f"{path} line {lineno} reads {line.strip()!r}; "
                                   "expected '<name>.jpg <0|1|2>'")
            splits[int(fields[1])].append(fields[0])
    return splits


def celeba_files(root, reads):
    """{'train', 'val', 'test'} -> list of JPEG paths, in list_eval_partition.txt order."""
    def missing(folder):
        if (os.path.isfile(os.path.join(folder, CELEBA_PARTITION))
                and os.path.isdir(os.path.join(folder, CELEBA_IMAGES))):
            return []
        return [f"{CELEBA_IMAGES}{os.sep} (the aligned 178x218 JPEGs) and {CELEBA_PARTITION}"]

    folder = find_folder(reads, NAME, root, (CELEBA_DIR,), missing=missing, hint="",
                         download=lambda: tvd.CelebA(root, split="all", download=True))
    image_dir = os.path.join(folder, CELEBA_IMAGES)
    partition = os.path.join(folder, CELEBA_PARTITION)

    def parse():
        by_partition = _read_celeba_partition(partition)
        on_disk = set(os.listdir(image_dir))
        listed = [n for names in by_partition for n in names]
        absent = [n for n in listed if n not in on_disk]
        if absent:
            raise DatasetError(f"{len(absent)} of the {len(listed)} images listed in {partition} "
                               f"are missing from {image_dir}{os.sep} (first: {absent[0]})")
        return {split: [os.path.join(image_dir, n) for n in names]
                for split, names in zip(SPLITS, by_partition)}

    # The image folder's mtime changes when files are added or removed.
    return reads.kept(NAME, [partition, image_dir], parse)


def decode_celeba(path):
    """CelebA JPEG -> uint8 3x64x64 by the release's transforms: CenterCrop(140), Resize(64)
    (torchvision's functional ops on a PIL image: bilinear, antialiased by PIL)."""
    img = open_image(path, "CelebA image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = TF.center_crop(img, [CELEBA_CROP, CELEBA_CROP])
    img = TF.resize(img, [IMAGE_SIZE, IMAGE_SIZE], interpolation=InterpolationMode.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


# What the decoding depends on besides the file, as the decoded cache's sidecar records it:
decode_celeba.params = {"crop": CELEBA_CROP, "size": IMAGE_SIZE, "resize": "bilinear"}


def read(cfg, split, recorded=None):
    return Files(celeba_files(os.path.abspath(cfg.path_dataset), Reads.of(cfg))[split],
                 decode_celeba, cache=f"celeba_{split}_{IMAGE_SIZE}")


SOURCE = Source(NAME, read)
