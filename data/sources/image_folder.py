"""ImageFolder: every picture Pillow reads under ``path_dataset``, split by train/, val/ and
test/ where all three exist, else by a stable hash of each name (90/5/5), or as a run recorded."""
import bisect
import hashlib
import itertools
import os

from .. import pictures
from ..errors import DatasetError, first_few
from .layouts import SPLITS
from .spec import Reads, Source

NAME = "ImageFolder"
# Upper ends of the hash ranges of train and val (the rest is test): about 90 / 5 / 5.
HASH_SHARES = (0.90, 0.95)


def hash_position(name):
    """Where a relative name falls in [0, 1): the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2 ** 64


def hash_splits(names):
    """{split: names} by hash_position; an empty val or test takes train's highest position."""
    if len(names) < len(SPLITS):
        raise DatasetError(f"{len(names)} picture(s): at least {len(SPLITS)} are needed, one "
                           "per split (train, val, test)")
    position = {name: hash_position(name) for name in names}
    splits = {split: [] for split in SPLITS}
    for name in names:  # below HASH_SHARES[0]: train, below HASH_SHARES[1]: val, else test
        splits[SPLITS[bisect.bisect_right(HASH_SHARES, position[name])]].append(name)
    for split in ("test", "val"):
        if not splits[split]:
            splits[split].append(max(splits["train"], key=position.__getitem__))
            splits["train"].remove(splits[split][0])
    return splits


def folder_splits(folder, names, reads):
    """{split: names} from train/, val/ and test/ where all three exist, else None."""
    present = [s for s in SPLITS if os.path.isdir(os.path.join(folder, s))]
    if not present:
        return None
    if len(present) < len(SPLITS):
        absent = [f"{s}/" for s in SPLITS if s not in present]
        raise DatasetError(f"{folder} has {', '.join(f'{s}/' for s in present)} but no "
                           f"{', '.join(absent)}: where train/, val/ and test/ all exist they are "
                           "the splits; add the missing one, or rename the folders so that "
                           "every picture is split by its name's hash")
    splits = {s: [n for n in names if n.startswith(s + "/")] for s in SPLITS}
    if empty := [s for s in SPLITS if not splits[s]]:
        raise DatasetError(f"{os.path.join(folder, empty[0])} holds no picture")
    if outside := len(names) - sum(map(len, splits.values())):
        reads.say(f"{folder}: {outside} picture(s) outside train/, val/ and test/ are not used")
    return splits


def read(cfg, split, recorded=None):
    folder, reads = os.path.abspath(cfg.path_dataset), Reads.of(cfg)
    names = pictures.list_pictures(folder)
    if recorded:  # the recorded splits, checked against the folder as it is now
        splits = {s: list(recorded[s].get("files", [])) for s in SPLITS if s in recorded}
        skipped_before = {n for r in recorded.values() for n in r.get("skipped", [])}
        if split not in splits:
            raise DatasetError(f"the run folder's record of its files has no {split} split; "
                               "it cannot say which pictures to read")
        gone = [n for n in splits[split] if not os.path.isfile(os.path.join(folder, n))]
        if gone:
            raise DatasetError(
                f"{len(gone)} of the {len(splits[split])} pictures the run recorded for its "
                f"{split} split are no longer under {folder} (first: {gone[0]}); put them back, "
                f"or evaluate the folder as it is with -ts RUN --images {folder}")
        known = skipped_before.union(*(r.get("files", []) for r in recorded.values()))
        added = [n for n in names if n not in known]
        if added:
            reads.say(
                f"{folder}: {len(added)} picture(s) added since the run recorded its splits are "
                f"left out ({first_few(added)}); its splits are the recorded ones (-ts RUN "
                "--images DIR evaluates a whole folder)")
    else:
        by_folder = folder_splits(folder, names, reads)
        splits, skipped_before = by_folder or hash_splits(names), set()
        rule = "train/, val/ and test/" if by_folder else "the hash of their names"
        reads.say(f"{folder}: {sum(map(len, splits.values())):,} pictures, split by {rule}: "
                  + ", ".join(f"{len(splits[s]):,} {s}" for s in SPLITS))
    # One decoding of all splits' pictures (and those the run skipped) still present, sorted:
    # the same set, so the same cache, whether read afresh or by the record.
    used = sorted(set(names).intersection(itertools.chain(*splits.values(), skipped_before)))
    return pictures.decoded(folder, used, tuple(cfg.dataset.shape), cached=cfg.cache_decoded,
                            reads=reads, wanted=splits[split],
                            where=f"of the {split} split under {folder}")


SOURCE = Source(NAME, read)
