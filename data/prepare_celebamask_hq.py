"""Turn the public CelebAMask-HQ release into the split folders the training loader reads.

DATA_ROOT/CelebAMask-HQ/ gets {split}_img/<n>.jpg, {split}_label[_<S>]/<n>.png and
manifest.json; files already complete are kept. docs/usage.md says the rules and exit codes."""
import collections
import contextlib
import functools
import json
import os
import re
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from util.cli import EXIT_INPUT, OneLineParser, run_cli
from util.io import FileLock, LockHeld, UnsafeLink, atomic_save, atomic_write_text
from util.signals import worker_pool
from util.text import one_line

from .cache import build_workers, pool_context
from .decode import open_image
from .errors import DatasetError, first_few
from .sources import SPLITS
from .sources.celebamask_hq import LABEL_PARTS as PARTS

MASK_SIZE, FACES_PER_MASK_FOLDER = 512, 2000
VAL_START, TEST_START = 162771, 182638  # CelebA's list_eval_partition.txt
IMAGE_DIR, MASK_DIR = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
OUT_DIR, MANIFEST_FILE, LOCK_FILE = "CelebAMask-HQ", "manifest.json", ".lock"
_SIZED_LABEL_FOLDER = re.compile(r"^(?:train|val|test)_label_([1-9]\d*)$")
_PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"  # then width, height, depth, colour
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# A face the first pass numbered; newest_source_ns: the latest mtime of its image and masks
Face = collections.namedtuple("Face", "k split n parts image_size newest_source_ns")


def split_of(orig_idx):
    """'train', 'val' or 'test' for a 0-based index into the original CelebA."""
    if orig_idx < 0:
        raise ValueError(f"orig_idx must be >= 0, got {orig_idx}")
    return "train" if orig_idx < VAL_START else "val" if orig_idx < TEST_START else "test"


def label_from_masks(masks, shape=(MASK_SIZE, MASK_SIZE)):
    """Paint {part: mask} into a uint8 label map in PARTS order, whatever the dict order. A mask
    has the given shape, or one more axis of channels (any nonzero one counts)."""
    if set(masks) - set(PARTS):
        raise ValueError(f"unknown part names {sorted(set(masks) - set(PARTS))}")
    label = np.zeros(shape, np.uint8)
    for value, part in ((value, part) for value, part in enumerate(PARTS, 1) if part in masks):
        mask = np.asarray(masks[part])
        mask = _any_channel(mask) if mask.ndim == 3 else mask
        if mask.shape != tuple(shape):
            raise ValueError(f"mask {part!r} has shape {mask.shape}, expected {shape}")
        np.copyto(label, value, where=mask.astype(bool, copy=False))
    return label


def _any_channel(array):
    present = array[..., 0] != 0  # one OR per channel: ~50x faster than .any(axis=-1)
    for channel in range(1, array.shape[-1]):
        present |= array[..., channel] != 0
    return present


def read_mask(path):
    """One release mask file -> 2-D array, nonzero where the part is present."""
    img = open_image(path, "mask")
    if img.size != (MASK_SIZE, MASK_SIZE):
        raise DatasetError(f"mask {path} is {img.size[0]}x{img.size[1]}, expected 512x512")
    if img.mode != "P" and len(img.getbands()) == 1:
        return np.asarray(img)
    # Other modes count by the colour shown: a nonzero palette index may be black.
    return _any_channel(np.asarray(img.convert("RGB")))


def mask_path(mask_dir, k, part):
    return os.path.join(mask_dir, str(k // FACES_PER_MASK_FOLDER), f"{k:05d}_{part}.png")


def png_problem(path, what, side=MASK_SIZE, grey=False):
    """What a PNG's first 26 and last 12 bytes show wrong (not a PNG, not side x side, with grey:
    not 8-bit grey, no IEND at its end), or None. OSError if it cannot be opened."""
    with open(path, "rb") as f:
        head = f.read(26)
        f.seek(max(26, os.fstat(f.fileno()).st_size - len(_PNG_END)))
        end = f.read()
    if len(head) < 26 or not head.startswith(_PNG_START):
        return f"unreadable {what} {path}: not a PNG file"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if (width, height) != (side, side) or grey and head[24:26] != b"\x08\x00":
        return f"{what} {path} is {width}x{height}, expected {side}x{side}{' grey' * grey}"
    return None if end == _PNG_END else f"truncated {what} {path}: no IEND chunk at its end"


def _check_face(image_dir, mask_dir, job):
    """The first pass over one face: (problem or None, parts, image size, newest mtime of its
    files). With `decode` (skipped before: is it fixed?) its masks are decoded too."""
    k, decode = job
    masks = {part: path for part in PARTS if os.path.exists(path := mask_path(mask_dir, k, part))}
    try:
        stats = [os.stat(path) for path in [os.path.join(image_dir, f"{k}.jpg"), *masks.values()]]
        problem = next(filter(None, (png_problem(path, "mask") for path in masks.values())), None)
        for path in masks.values() if decode and not problem else ():
            read_mask(path)
    except (OSError, DatasetError) as e:  # a missing image, an unreadable mask
        return one_line(e), (), 0, 0
    return problem, tuple(masks), stats[0].st_size, max(stat.st_mtime_ns for stat in stats)


def _write_face(root, image_dir, mask_dir, side_of_kind, face):
    """Write the output files of a Face that are not complete: (face, wrote any, problem)."""
    todo = {}
    for kind, side in side_of_kind.items():
        path = os.path.join(root, f"{face.split}_{kind}", f"{face.n}.{'png' if side else 'jpg'}")
        stat = os.stat(path) if os.path.exists(path) else None
        if not (stat and stat.st_mtime_ns >= face.newest_source_ns and (
                png_problem(path, "label", side, grey=True) is None if side
                else stat.st_size == face.image_size)):
            todo[kind] = path, side
    try:  # read everything first: a face that fails here gets no new file
        if set(todo) - {"img"}:
            label = Image.fromarray(label_from_masks(
                {part: read_mask(mask_path(mask_dir, face.k, part)) for part in face.parts}))
        if "img" in todo:  # after the masks: held while they decode, the JPEG's 0.5 MB made
            # malloc give memory back and fault it in again for every mask (20% slower)
            with open(os.path.join(image_dir, f"{face.k}.jpg"), "rb") as f:
                jpeg = f.read()
    except (OSError, DatasetError) as e:  # DatasetError: a mask that does not decode
        return face, False, one_line(e)
    for path, side in todo.values():  # side 0: the JPEG's bytes as they are
        if side:  # zlib level 1 below: a third of the time, files a third larger
            image = label if side == MASK_SIZE else label.resize((side, side), Image.NEAREST)
        atomic_save(path, functools.partial(image.save, format="PNG", compress_level=1) if side
                    else lambda f: f.write(jpeg), durable=False)
    return face, bool(todo), None


def _release(src):
    """(mapping rows [(k, orig_idx)] in file order, image folder, mask folder) of `src`, checked."""
    if not os.path.isdir(src):
        raise DatasetError(f"missing release folder {src}")
    path = os.path.join(src, MAPPING_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read mapping file {path}: "
                           f"{one_line(getattr(e, 'strerror', None) or e)}") from None
    (number, header), *rows = lines or [(1, [])]
    if header[:2] != ["idx", "orig_idx"] or not rows:
        raise DatasetError(f"mapping file {path} line {number}: expected the header 'idx "
                           f"orig_idx orig_file' and rows, got {' '.join(header)[:80]!r}")
    orig_idx_of = {}
    for number, fields in rows:
        if len(fields) < 2 or not "".join(fields[:2]).isdecimal() or int(fields[0]) in orig_idx_of:
            raise DatasetError(f"mapping file {path} line {number}: expected '<idx> <orig_idx> "
                               f"<orig_file>' with a new idx, got {' '.join(fields)[:80]!r}")
        orig_idx_of[int(fields[0])] = int(fields[1])
    image_dir, mask_dir = os.path.join(src, IMAGE_DIR), os.path.join(src, MASK_DIR)
    for folder in [image_dir, mask_dir, *sorted({os.path.dirname(mask_path(mask_dir, k, ""))
                                                 for k in orig_idx_of})]:
        if not os.path.isdir(folder):
            raise DatasetError(f"missing folder {folder}")
    return list(orig_idx_of.items()), image_dir, mask_dir


def _number_faces(rows, checks, strict):
    """(Faces, skipped entries, ks by split) from the first pass's `checks` of the `rows`."""
    faces, skipped, ks_of_split = [], [], {split: [] for split in SPLITS}
    for (k, orig_idx), (problem, *facts) in zip(rows, checks):
        split = split_of(orig_idx)
        if problem and strict:
            raise DatasetError(problem)
        if problem:
            skipped.append({"k": k, "split": split, "reason": problem})
        else:  # facts: parts, image_size, newest_source_ns
            faces.append(Face(k, split, len(ks_of_split[split]), *facts))
            ks_of_split[split].append(k)
    return faces, skipped, ks_of_split


def _prepare(parser, args):
    if args.workers < 1 or not all(0 < size < MASK_SIZE for size in args.size):
        parser.error("--workers must be at least 1 and --size in 1..511")
    rows, image_dir, mask_dir = _release(args.src)
    root, workers = os.path.join(args.dst, OUT_DIR), max(1, min(args.workers, len(rows)))
    os.makedirs(root, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(FileLock(os.path.join(root, LOCK_FILE), blocking=False))
        try:  # an earlier run's manifest, its ks by split and its skipped ks
            with open(os.path.join(root, MANIFEST_FILE), encoding="utf-8") as f:
                old_manifest = json.load(f)
            ks_before = {split: list(old_manifest["faces"][split]) for split in SPLITS}
            skipped_before = {entry["k"] for entry in old_manifest["skipped"]}
        except (OSError, ValueError, LookupError, TypeError):
            old_manifest, ks_before, skipped_before = None, {}, set()
        map_faces = map  # one worker: this process; workers ignore Ctrl-C, which stops them
        if workers > 1:  # as the parent leaves this block (util.signals.worker_pool)
            pool = worker_pool(pool_context(), workers)
            map_faces = functools.partial(stack.enter_context(pool).imap,
                                          chunksize=max(1, min(16, len(rows) // (4 * workers))))
        faces, skipped, ks_of_split = _number_faces(rows, map_faces(
            functools.partial(_check_face, image_dir, mask_dir),
            [(k, k in skipped_before) for k, _ in rows]), args.strict)
        earlier_sizes = {int(m[1]) for m in map(_SIZED_LABEL_FOLDER.match, os.listdir(root))
                         if m and int(m[1]) < MASK_SIZE}  # the loader prefers them: kept
        side_of_kind = {"img": 0, "label": MASK_SIZE,  # 0: the JPEG
                        **{f"label_{s}": s for s in sorted(set(args.size) | earlier_sizes)}}
        removed = _clean(root, "", [], [])  # the lock is ours: every .tmp file is a leftover
        for split, (kind, side) in ((s, item) for s in SPLITS for item in side_of_kind.items()):
            removed += _clean(os.path.join(root, f"{split}_{kind}"), "png" if side else "jpg",
                              ks_of_split[split], ks_before.get(split, []))
        manifest = {"faces": ks_of_split, "skipped": skipped}
        if manifest != old_manifest:
            atomic_write_text(os.path.join(root, MANIFEST_FILE), json.dumps(manifest) + "\n")
        results = list(tqdm(  # disable=None: a bar on a terminal only, not in logs and pipes
            map_faces(functools.partial(_write_face, root, image_dir, mask_dir, side_of_kind),
                      faces), total=len(faces), unit="face", desc=OUT_DIR, disable=None))
    failed = [(face, problem) for face, _, problem in results if problem]
    if failed:  # listed as skipped: the next run decodes their masks in its first pass
        for face, problem in failed:
            ks_of_split[face.split][face.n] = None
            skipped.append({"k": face.k, "split": face.split, "reason": problem})
        atomic_write_text(os.path.join(root, MANIFEST_FILE), json.dumps(manifest) + "\n")
        print(f"error: {len(failed)} face(s) did not decode and are now listed as skipped; run the "
              f"same command again (first: k={failed[0][0].k}: {failed[0][1]})", file=sys.stderr)
        return 1
    written, bare = sum(wrote for _, wrote, _ in results), [str(f.k) for f in faces if not f.parts]
    print(f"{OUT_DIR} in {root}: " + ", ".join(
        f"{split} {sum(face.split == split for face in faces)} faces" for split in SPLITS)
        + f"\nfaces without any annotation (all-zero label): {len(bare)}"
        + (f" (k = {first_few(bare, 20)})" if bare else "") + f"\nfaces skipped: {len(skipped)}"
        + "".join(f"\n  k={entry['k']} ({entry['split']}): {entry['reason']}" for entry in skipped))
    print(f"this run: faces written {written}, already up to date {len(faces) - written}, "
          f"files removed {removed}" if written or removed or manifest != old_manifest
          else f"nothing to do: all {len(faces)} faces were already up to date")
    return 0


def _clean(folder, ext, ks, ks_before):
    """Make `folder`; delete (and count) its temporary files (killed runs) and the <n>.ext past
    len(ks), named non-canonically (the loader reads 007.png as 7) or not ks[n] (ks_before[n])."""
    os.makedirs(folder, exist_ok=True)
    removed = 0
    for name in os.listdir(folder):
        stem = name[:-len(ext) - 1] if ext and name.endswith("." + ext) else ""
        n = int(stem) if stem.isdecimal() else -1
        if (name.startswith(".") and name.endswith(".tmp") or n >= len(ks)
                or n >= 0 and (stem != str(n) or ks_before[n:n + 1] != [ks[n]])):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


def main(argv=None):
    """The command; its exit code: 2 bad input, another run, a linked lock; 1 unwritable output."""
    p = OneLineParser(prog="python -m data.prepare_celebamask_hq",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, metavar="RELEASE", help="the unpacked release")
    p.add_argument("--dst", required=True, metavar="DATA_ROOT",
                   help=f"dataset root (cfg.path_dataset); output goes to DATA_ROOT/{OUT_DIR}/")
    p.add_argument("--workers", type=int, default=build_workers(), metavar="N",
                   help="worker processes (default: the CPUs usable here, %(default)s)")
    p.add_argument("--strict", action="store_true", help="a bad face is fatal, not skipped")
    p.add_argument("--size", type=int, action="append", default=[], metavar="S",
                   help="also write {split}_label_S/: labels resized to SxS (1..511); repeatable")
    return run_cli(lambda: _prepare(p, p.parse_args(argv)),
                   errors=(((DatasetError, LockHeld, UnsafeLink), EXIT_INPUT),),
                   interrupted="{what}; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
