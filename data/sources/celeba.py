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

NAME, CELEBA_DIR = "CelebA", "celeba"
CELEBA_IMAGES, CELEBA_PARTITION = "img_align_celeba", "list_eval_partition.txt"
CELEBA_CROP, IMAGE_SIZE = 140, 64


def decode_celeba(path):
    """CelebA JPEG -> uint8 3x64x64 by the release's transforms: CenterCrop(140), Resize(64)
    (torchvision's functional ops on a PIL image: bilinear, antialiased by PIL)."""
    img = TF.center_crop(open_image(path, "CelebA image").convert("RGB"), [CELEBA_CROP] * 2)
    img = TF.resize(img, [IMAGE_SIZE, IMAGE_SIZE], interpolation=InterpolationMode.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


# What the decoding depends on besides the file, as the decoded cache's sidecar records it:
decode_celeba.params = {"crop": CELEBA_CROP, "size": IMAGE_SIZE, "resize": "bilinear"}


def read(cfg, split, recorded=None):
    """One split's JPEGs, in list_eval_partition.txt's order (it marks them 0, 1, 2)."""
    root, reads = os.path.abspath(cfg.path_dataset), Reads.of(cfg)
    folder = find_folder(
        reads, NAME, root, (CELEBA_DIR,), hint="", missing=lambda folder: [] if (
            os.path.isfile(os.path.join(folder, CELEBA_PARTITION))
            and os.path.isdir(os.path.join(folder, CELEBA_IMAGES))) else [
            f"{CELEBA_IMAGES}{os.sep} (the aligned 178x218 JPEGs) and {CELEBA_PARTITION}"],
        download=lambda: tvd.CelebA(root, split="all", download=True))
    image_dir, partition = (os.path.join(folder, n) for n in (CELEBA_IMAGES, CELEBA_PARTITION))

    def parse():
        by_partition = ([], [], [])
        with open(partition, "r") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if fields and (len(fields) != 2 or fields[1] not in ("0", "1", "2")):
                    raise DatasetError(f"{partition} line {lineno} reads {line.strip()!r}; "
                                       "expected '<name>.jpg <0|1|2>'")
                if fields:
                    by_partition[int(fields[1])].append(fields[0])
        on_disk = set(os.listdir(image_dir))
        listed = [n for names in by_partition for n in names]
        absent = [n for n in listed if n not in on_disk]
        if absent:
            raise DatasetError(f"{len(absent)} of the {len(listed)} images listed in {partition} "
                               f"are missing from {image_dir}{os.sep} (first: {absent[0]})")
        return {s: [os.path.join(image_dir, n) for n in names]
                for s, names in zip(SPLITS, by_partition)}

    # The image folder's mtime changes when files are added or removed.
    return Files(reads.kept(NAME, [partition, image_dir], parse)[split], decode_celeba,
                 cache=f"celeba_{split}_{IMAGE_SIZE}")


SOURCE = Source(NAME, read)
