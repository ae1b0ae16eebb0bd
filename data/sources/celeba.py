"""CelebA (aligned JPEGs and the official partition list) and CelebAMask-HQ (the label maps
``data.prepare_celebamask_hq`` writes): file lists, decoded elsewhere (``data.decode``).
"""
import os
import re

import torchvision.datasets as tvd

from ..errors import DatasetError
from .layouts import SPLITS, cached, find_folder

CELEBA_DIR = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBAMASK_DIR = "CelebAMask-HQ"
_CELEBA_PARTITION_OF_SPLIT = {"train": 0, "val": 1, "test": 2}
_LABEL_NAME = re.compile(r"^(\d+)\.png$")


# ---------------------------------------------------------------- CelebA (JPEG files)

def _read_celeba_partition(path):
    splits = {0: [], 1: [], 2: []}
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


def celeba_files(root):
    """{'train', 'val', 'test'} -> list of JPEG paths, in list_eval_partition.txt order."""
    def present(folder):
        return (os.path.isfile(os.path.join(folder, CELEBA_PARTITION))
                and os.path.isdir(os.path.join(folder, CELEBA_IMAGES)))

    folder = find_folder(
        "CelebA", root, (CELEBA_DIR,), complete=present,
        what=lambda ours: f"{CELEBA_IMAGES}{os.sep} (the aligned 178x218 JPEGs) and "
                          f"{CELEBA_PARTITION}",
        download=lambda: tvd.CelebA(root, split="all", download=True))
    image_dir = os.path.join(folder, CELEBA_IMAGES)
    partition = os.path.join(folder, CELEBA_PARTITION)

    def parse():
        by_partition = _read_celeba_partition(partition)
        on_disk = set(os.listdir(image_dir))
        listed = [n for names in by_partition.values() for n in names]
        absent = [n for n in listed if n not in on_disk]
        if absent:
            raise DatasetError(
                f"{len(absent)} of the {len(listed)} images listed in {partition} are "
                f"missing from {image_dir}{os.sep} (first: {absent[0]})")
        return {split: [os.path.join(image_dir, n)
                        for n in by_partition[_CELEBA_PARTITION_OF_SPLIT[split]]]
                for split in SPLITS}

    # The image folder's mtime changes when files are added or removed, so it keys
    # the cache along with the partition list.
    return cached("CelebA", [partition, image_dir], parse)


# ---------------------------------------------------------------- CelebAMask-HQ (PNG labels)

def _numbered_pngs(folder):
    if not os.path.isdir(folder):
        return None
    numbered = []
    for name in os.listdir(folder):
        m = _LABEL_NAME.match(name)
        if m:
            numbered.append((int(m.group(1)), name))
    numbered.sort()  # numeric order, so 10.png follows 9.png
    return [os.path.join(folder, name) for _, name in numbered]


def celebamask_files(root, split):
    """List of label-map paths for one split, in numeric file order.

    A prepared ``<split>_label_64`` folder is preferred when it is complete (same file
    count as ``<split>_label``, or the only one present): it saves the 512->64 resize.
    """
    folder = os.path.join(root, CELEBAMASK_DIR)
    full = _numbered_pngs(os.path.join(folder, f"{split}_label"))
    small = _numbered_pngs(os.path.join(folder, f"{split}_label_64"))
    if small and (full is None or len(small) == len(full)):
        return small
    if full:
        return full
    absent = [f"{s}_label{os.sep}" for s in SPLITS
              if not _numbered_pngs(os.path.join(folder, f"{s}_label"))
              and not _numbered_pngs(os.path.join(folder, f"{s}_label_64"))]
    raise DatasetError(
        f"CelebAMask_HQ not found under {root}: {', '.join(absent)} missing or "
        f"empty in {folder}{os.sep}; run `python -m data.prepare_celebamask_hq --src "
        f"RELEASE_DIR --dst {root}` to write {{train,val,test}}_label{os.sep}<n>.png there "
        "(no automatic download)")
