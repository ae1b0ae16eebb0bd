"""Turn the public CelebAMask-HQ release into the split folders the training loader reads.

    python -m data.prepare_celebamask_hq --src RELEASE_DIR --dst DATA_ROOT
                                         [--workers N] [--strict] [--size 64]

Input, RELEASE_DIR (the unpacked release):
    CelebA-HQ-img/<k>.jpg                                 k = 0..29999
    CelebAMask-HQ-mask-anno/<k // 2000>/<k:05d>_<part>.png  512x512, nonzero = part present
    CelebA-HQ-to-CelebA-mapping.txt                       "idx orig_idx orig_file" rows

Output, under DATA_ROOT/CelebAMask-HQ/:
    {train,val,test}_img/<n>.jpg        the release JPEG, byte for byte
    {train,val,test}_label/<n>.png      512x512 single-channel uint8, classes 0..18
    {train,val,test}_label_<S>/<n>.png  with --size S: the 512 label resized to SxS with
                                        PIL NEAREST, exactly what the loader would do
    manifest.json                       which face k every (split, n) holds

Labels: the 18 parts of PARTS are painted in that order with values 1..18 on a zero
background; a later part overwrites an earlier one. A face without any mask file gets
an all-zero label (the summary counts these faces).

Splits follow CelebA's official partition of the face's orig_idx (see split_of).

Numbering: n counts the faces *written* to a split, in the order of the rows of the
mapping file, so every folder holds exactly 0..N-1 with no holes. A face that is
skipped for bad input therefore moves the later faces of its split down by one; the
summary names every skipped face, and manifest.json maps each (split, n) to its k.
When the problem is fixed, the next run renumbers: faces whose number changed are
renamed into place (their files are not recomputed).

Interruption and re-runs: each output is written under a temporary name and renamed
into place, so a name in an output folder only ever holds a complete file. New outputs
are first staged in CelebAMask-HQ/.staging (keyed by the face and a fingerprint of its
source files, so a killed run resumes from what it finished) and renamed into the split
folders once the numbering is known. manifest.json records (split, n, k) and the source
fingerprint of every finished face; it is rewritten atomically, and before any output
is renamed or deleted it is cut down to the entries that stay true meanwhile, so it
never vouches for a file it does not describe. A face counts as done when the manifest
lists it at the same (split, n) with the same fingerprint AND its files pass a cheap
check: the JPEG has the source's byte count; a PNG ends with an IEND chunk and decodes
completely to the right size and mode with values 0..18. Anything else (a missing,
truncated or malformed file, a changed source file) is redone; a well-formed file that
something else put under a finished name is not detected. Numbered files beyond a split's
count and temporary files of killed runs are deleted. A run that finds everything done
writes nothing and says so. If `_label_<S>` folders exist from an earlier run they are
kept up to date even without --size, because the loader prefers a complete
`_label_64` folder over `_label` and a stale one would pair labels with wrong images.

Bad input: a missing --src, image folder, mask folder or mapping file, or a malformed
mapping file is fatal (exit 2). Problems of one face -- a missing image, an unreadable
mask, a mask that is not 512x512 -- skip that face and are listed in the summary; with
--strict the first one is fatal (exit 2). Fatal errors print one line on stderr, no
traceback. Exit codes: 0 done, 1 cannot write the output or its final check failed,
2 bad input or another run holds DATA_ROOT/CelebAMask-HQ, 130 interrupted.
"""
import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import one_line

try:
    import fcntl
except ImportError:  # not POSIX: run without the guard against concurrent runs
    fcntl = None

PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
         "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
NUM_CLASSES = len(PARTS) + 1
MASK_SIZE = 512
SPLITS = ("train", "val", "test")
# First orig_idx of CelebA's val and test partitions (list_eval_partition.txt).
VAL_START = 162771
TEST_START = 182638

IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
OUT_DIR = "CelebAMask-HQ"
MANIFEST_FILE = "manifest.json"
STAGING_DIR = ".staging"
FACES_PER_MASK_FOLDER = 2000
# Bumped whenever the output for the same sources changes, so old outputs are redone.
FORMAT_VERSION = 1

_PART_INDEX = {part: i for i, part in enumerate(PARTS, start=1)}
_MASK_NAME = re.compile(r"^(\d+)_([a-z_]+)\.png$")
_SIZE_FOLDER = re.compile(r"^(?:train|val|test)_label_([1-9]\d*)$")
_TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")
_PNG_TAIL = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Pillow reports corrupt data through several exception types: OSError (unidentified
# or truncated file), SyntaxError/ValueError (broken PNG chunks), EOFError (short read).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class FatalError(Exception):
    """Input or environment problem that ends the run; the message is one line."""


class FaceError(Exception):
    """Bad input of one face; the message names the file at fault."""


# ---------------------------------------------------------------- pure helpers

def split_of(orig_idx):
    """'train', 'val' or 'test' for a 0-based index into the original CelebA."""
    if orig_idx < 0:
        raise ValueError(f"orig_idx must be >= 0, got {orig_idx}")
    if orig_idx < VAL_START:
        return "train"
    return "val" if orig_idx < TEST_START else "test"


def label_from_masks(masks, shape=(MASK_SIZE, MASK_SIZE)):
    """Paint part masks into one uint8 label map of the given shape.

    ``masks`` maps part names (from PARTS) to arrays of that shape, or (H, W, C) arrays
    where a pixel counts when any channel is nonzero. Precedence comes from PARTS, not
    from the order of ``masks``.
    """
    unknown = sorted(set(masks) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part names {unknown}; expected names from PARTS")
    label = np.zeros(shape, np.uint8)
    for part, value in _PART_INDEX.items():
        if part not in masks:
            continue
        mask = np.asarray(masks[part])
        if mask.ndim == 3:
            mask = _any_channel(mask)
        if mask.shape != tuple(shape):
            raise ValueError(f"mask {part!r} has shape {mask.shape}, expected {tuple(shape)}")
        np.copyto(label, value, where=mask.astype(bool, copy=False))
    return label


def _any_channel(array):
    # A numpy reduction over a short last axis runs ~50x slower than one OR per channel.
    present = array[..., 0] != 0
    for c in range(1, array.shape[-1]):
        present |= array[..., c] != 0
    return present


def read_mask(path):
    """One release mask file -> 2-D array, nonzero where the part is present."""
    try:
        with Image.open(path) as img:
            if img.size != (MASK_SIZE, MASK_SIZE):
                raise FaceError(f"mask {path} is {img.size[0]}x{img.size[1]}, "
                                f"expected {MASK_SIZE}x{MASK_SIZE}")
            img.load()
            if img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;"):
                return np.asarray(img)
            if img.mode == "LA":
                return np.asarray(img)[..., 0]
            if img.mode != "RGB":
                # Palette and other colour modes are judged by the colour they show: a
                # palette index may well be nonzero and still stand for black.
                img = img.convert("RGB")
            return _any_channel(np.asarray(img))
    except _PIL_ERRORS as e:
        raise FaceError(f"unreadable mask {path}: {one_line(e)}") from None


def mask_path(mask_dir, k, part):
    return os.path.join(mask_dir, str(k // FACES_PER_MASK_FOLDER), f"{k:05d}_{part}.png")


def read_mapping(path):
    """Rows of the mapping file as [(k, orig_idx)], in file order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise FatalError(f"mapping file {path} is not text") from None
    except OSError as e:
        raise FatalError(f"cannot read mapping file {path}: {one_line(e)}") from None
    rows, seen, header_seen = [], set(), False
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if not header_seen:
            if fields[:2] != ["idx", "orig_idx"]:
                raise FatalError(f"mapping file {path} line {number}: expected the header "
                                 f"'idx orig_idx orig_file', got {line.strip()[:80]!r}")
            header_seen = True
            continue
        try:
            k, orig_idx = int(fields[0]), int(fields[1])
            if k < 0 or orig_idx < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise FatalError(f"mapping file {path} line {number}: expected "
                             f"'<idx> <orig_idx> <orig_file>', got {line.strip()[:80]!r}") from None
        if k in seen:
            raise FatalError(f"mapping file {path} line {number}: face {k} is listed twice")
        seen.add(k)
        rows.append((k, orig_idx))
    if not rows:
        raise FatalError(f"mapping file {path} lists no faces")
    return rows


def _kinds(sizes):
    return ("img", "label") + tuple(f"label_{s}" for s in sizes)


def _ext(kind):
    return "jpg" if kind == "img" else "png"


def _side(kind):
    return MASK_SIZE if kind == "label" else int(kind[len("label_"):])


def _final_path(root, kind, split, n):
    return os.path.join(root, f"{split}_{kind}", f"{n}.{_ext(kind)}")


def _staged_path(root, kind, k, fp):
    return os.path.join(root, STAGING_DIR, f"{k}.{fp}.{kind}.{_ext(kind)}")


def _write_atomic(path, write):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _output_ok(kind, path, image_bytes):
    """Cheap completeness check of one output file (see the module docstring)."""
    try:
        if kind == "img":
            return os.stat(path).st_size == image_bytes
        side = _side(kind)
        with open(path, "rb") as f:
            # A cut-off PNG loses its IEND chunk; checking it first spares the decode.
            f.seek(-len(_PNG_TAIL), os.SEEK_END)
            if f.read() != _PNG_TAIL:
                return False
            f.seek(0)
            with Image.open(f) as img:
                if img.format != "PNG" or img.mode != "L" or img.size != (side, side):
                    return False
                img.load()
                return int(np.asarray(img).max()) < NUM_CLASSES
    except _PIL_ERRORS:
        return False


def _save_png(array, path):
    Image.fromarray(array).save(path, format="PNG")


# ---------------------------------------------------------------- per-face work (workers)

_CFG = None


def _init_worker(cfg, in_pool):
    global _CFG
    _CFG = cfg
    if in_pool:
        # Ctrl-C is the parent's to handle (it stops the pool); workers would only
        # add a traceback each.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fingerprint(image_stat, mask_stats):
    sig = [FORMAT_VERSION, image_stat.st_size, image_stat.st_mtime_ns, *mask_stats]
    return hashlib.blake2b(repr(sig).encode(), digest_size=8).hexdigest()


def _process_face(job):
    """Check or build every output of face k; returns where each output now is.

    job = (k, parts, old) with old = (split, n, fingerprint) from the manifest or None.
    The result's state maps each output kind to "old" (valid at the manifest's place)
    or "staged" (complete in the staging folder); an "error" result means skip.
    """
    k, parts, old = job
    cfg = _CFG
    image = os.path.join(cfg["image_dir"], f"{k}.jpg")
    try:
        image_stat = os.stat(image)
    except FileNotFoundError:
        return {"k": k, "error": f"missing image {image}"}
    except OSError as e:
        return {"k": k, "error": f"unreadable image {image}: {one_line(e.strerror or e)}"}
    if not stat.S_ISREG(image_stat.st_mode):
        return {"k": k, "error": f"image {image} is not a regular file"}
    masks, mask_stats = {}, []
    for part in parts:
        path = masks[part] = mask_path(cfg["mask_dir"], k, part)
        try:
            st = os.stat(path)
        except OSError as e:
            return {"k": k, "error": f"unreadable mask {path}: {one_line(e.strerror or e)}"}
        mask_stats += [part, st.st_size, st.st_mtime_ns]
    fp = _fingerprint(image_stat, mask_stats)

    root, size = cfg["root"], image_stat.st_size
    known_good = old is not None and old[2] == fp
    state = {}
    for kind in cfg["kinds"]:
        if known_good and _output_ok(kind, _final_path(root, kind, old[0], old[1]), size):
            state[kind] = "old"
        elif _output_ok(kind, _staged_path(root, kind, k, fp), size):
            state[kind] = "staged"
    need = [kind for kind in cfg["kinds"] if kind not in state]
    if not need:
        return {"k": k, "fp": fp, "state": state}

    # Staged outputs are only ever written after the masks decoded, so any of them
    # (or a manifest entry with this fingerprint) proves this face's input is good.
    label = None
    if any(kind != "img" for kind in need) or not (known_good or state):
        try:
            label = label_from_masks({part: read_mask(p) for part, p in masks.items()})
        except FaceError as e:
            return {"k": k, "error": str(e)}
    for kind in need:
        dest = _staged_path(root, kind, k, fp)
        if kind == "img":
            try:
                source = open(image, "rb")
            except OSError as e:
                return {"k": k, "error": f"unreadable image {image}: {one_line(e.strerror or e)}"}
            with source:
                _write_atomic(dest, lambda tmp: _copy_into(source, tmp))
        elif kind == "label":
            _write_atomic(dest, lambda tmp: _save_png(label, tmp))
        else:
            side = _side(kind)
            small = np.asarray(Image.fromarray(label).resize((side, side), Image.NEAREST))
            _write_atomic(dest, lambda tmp: _save_png(small, tmp))
        state[kind] = "staged"
    return {"k": k, "fp": fp, "state": state}


def _copy_into(source, path):
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


# ---------------------------------------------------------------- run

def _pool_context():
    # Running as `python -m data.…` imports the data package and torch with it; fork
    # gives workers that state for free where a fresh interpreter would import it again.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _lock(root):
    fd = os.open(root, os.O_RDONLY)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FatalError(f"another run is writing {root}; wait for it to end") from None
    return fd


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def _load_manifest(path):
    """(faces {k: (split, n, fp)}, sizes, raw dict) of a valid manifest, else empty."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, (), None
    except (OSError, ValueError) as e:
        _warn(f"ignoring unreadable {path} ({one_line(e)}); every face will be redone")
        return {}, (), None
    try:
        if data.get("format") != FORMAT_VERSION:
            return {}, (), None
        faces, places = {}, set()
        for entry in data["faces"]:
            k, split, n, fp = entry["k"], entry["split"], entry["n"], entry["fp"]
            if (split not in SPLITS or not isinstance(k, int) or not isinstance(n, int)
                    or not isinstance(fp, str) or k in faces or (split, n) in places):
                raise ValueError
            faces[k] = (split, n, fp)
            places.add((split, n))
        sizes = tuple(int(s) for s in data["sizes"])
    except (AttributeError, KeyError, TypeError, ValueError):
        _warn(f"ignoring malformed {path}; every face will be redone")
        return {}, (), None
    return faces, sizes, data


def _write_manifest(path, data):
    fields = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            # One entry per line: readable, and diffs between runs stay small.
            text = "[\n" + ",\n".join(f"  {json.dumps(v)}" for v in value) + "\n ]"
        else:
            text = json.dumps(value)
        fields.append(f" {json.dumps(key)}: {text}")

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("{\n" + ",\n".join(fields) + "\n}\n")
            f.flush()
            # The manifest vouches for thousands of files; make it survive a crash.
            os.fsync(f.fileno())
    _write_atomic(path, write)


def _numbered(folder, ext):
    """{n: name} of the files an index-based reader would take for numbered ones."""
    found = {}
    for name in os.listdir(folder):
        stem, dot, suffix = name.partition(".")
        if dot and suffix == ext and stem.isdigit():
            found.setdefault(int(stem), []).append(name)
    return found


def _scan_masks(mask_dir, wanted):
    """Part names present per face, the mask folders present, and ignored files."""
    parts, folders, ignored = {}, set(), []
    for entry in os.scandir(mask_dir):
        if not (entry.is_dir() and entry.name.isdigit()):
            continue
        folder = int(entry.name)
        folders.add(folder)
        for name in os.listdir(entry.path):
            m = _MASK_NAME.match(name)
            k = int(m.group(1)) if m else -1
            if (not m or m.group(2) not in _PART_INDEX or name != f"{k:05d}_{m.group(2)}.png"
                    or k // FACES_PER_MASK_FOLDER != folder):
                ignored.append(os.path.join(entry.path, name))
            elif k in wanted:
                parts.setdefault(k, set()).add(m.group(2))
    return ({k: tuple(p for p in PARTS if p in found) for k, found in parts.items()},
            folders, ignored)


def _run_jobs(cfg, jobs, workers, strict):
    results = {}
    with contextlib.ExitStack() as stack:
        if workers > 1:
            chunk = max(1, min(16, len(jobs) // (workers * 4)))
            pool = stack.enter_context(
                _pool_context().Pool(workers, _init_worker, (cfg, True)))
            it = pool.imap_unordered(_process_face, jobs, chunksize=chunk)
        else:
            _init_worker(cfg, False)
            it = map(_process_face, jobs)
        # disable=None shows the bar on a terminal only, keeping logs and pipes clean.
        bar = stack.enter_context(tqdm(total=len(jobs), unit="face", desc="CelebAMask-HQ",
                                       file=sys.stderr, disable=None))
        for res in it:
            if strict and "error" in res:
                raise FatalError(res["error"])
            results[res["k"]] = res
            bar.update()
    return results


def _prepare(args):
    src = args.src
    if not os.path.isdir(src):
        raise FatalError(f"release folder {src} not found (--src)")
    mapping = os.path.join(src, MAPPING_FILE)
    image_dir = os.path.join(src, IMAGE_DIR)
    mask_dir = os.path.join(src, MASK_DIR)
    if not os.path.isfile(mapping):
        raise FatalError(f"missing mapping file {mapping}")
    if not os.path.isdir(image_dir):
        raise FatalError(f"missing image folder {image_dir}")
    if not os.path.isdir(mask_dir):
        raise FatalError(f"missing mask folder {mask_dir}")
    rows = read_mapping(mapping)
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        raise FatalError(f"--dst {args.dst} is not a folder")
    root = os.path.join(args.dst, OUT_DIR)
    os.makedirs(root, exist_ok=True)
    fd = _lock(root)
    try:
        return _prepare_locked(args, rows, image_dir, mask_dir, root)
    finally:
        os.close(fd)


def _prepare_locked(args, rows, image_dir, mask_dir, root):
    manifest_path = os.path.join(root, MANIFEST_FILE)
    old_faces, old_sizes, old_manifest = _load_manifest(manifest_path)
    on_disk = {int(m.group(1)) for m in map(_SIZE_FOLDER.match, os.listdir(root)) if m}
    kept_sizes = {s for s in set(old_sizes) | on_disk if 1 <= s < MASK_SIZE} - set(args.size)
    sizes = tuple(sorted(set(args.size) | kept_sizes))
    kinds = _kinds(sizes)
    staging = os.path.join(root, STAGING_DIR)
    folders = [os.path.join(root, f"{split}_{kind}") for split in SPLITS for kind in kinds]
    for folder in folders + [staging]:
        os.makedirs(folder, exist_ok=True)

    # The lock is ours, so any temporary file is a leftover of a killed run.
    stale = 0
    for folder in [root] + folders + [staging]:
        for name in os.listdir(folder):
            if _TEMP_NAME.match(name):
                os.unlink(os.path.join(folder, name))
                stale += 1

    wanted = {k for k, _ in rows}
    parts, mask_folders, ignored = _scan_masks(mask_dir, wanted)
    if ignored:
        _warn(f"ignored {len(ignored)} file(s) in {mask_dir} that are not "
              f"<k:05d>_<part>.png masks of a known part in folder k//{FACES_PER_MASK_FOLDER} "
              f"(first: {ignored[0]})")
    for folder in sorted({k // FACES_PER_MASK_FOLDER for k in wanted} - mask_folders):
        first = folder * FACES_PER_MASK_FOLDER
        message = (f"missing mask folder {os.path.join(mask_dir, str(folder))} "
                   f"(faces {first}..{first + FACES_PER_MASK_FOLDER - 1})")
        if args.strict:
            raise FatalError(message)
        _warn(message + " -- those faces get empty labels")

    cfg = {"image_dir": image_dir, "mask_dir": mask_dir, "root": root, "kinds": kinds}
    jobs = [(k, parts.get(k, ()), old_faces.get(k)) for k, _ in rows]
    workers = max(1, min(args.workers, len(jobs)))
    results = _run_jobs(cfg, jobs, workers, args.strict)

    # Numbering, in mapping order over the faces that are written.
    counts = dict.fromkeys(SPLITS, 0)
    plan, skipped = [], []
    for k, orig_idx in rows:
        split, res = split_of(orig_idx), results[k]
        if "error" in res:
            skipped.append({"k": k, "split": split, "reason": res["error"]})
            continue
        plan.append((k, split, counts[split], res["fp"], res["state"]))
        counts[split] += 1

    moves, places, still_true, renamed, unchanged = _changes(root, plan, old_faces)
    extras = _surplus(root, kinds, counts, moved_away={a for a, _ in moves})

    new_manifest = {
        "format": FORMAT_VERSION,
        "sizes": list(sizes),
        "counts": counts,
        "faces": [{"split": s, "n": n, "k": k, "fp": fp} for k, s, n, fp, _ in plan],
        "skipped": skipped,
    }
    if moves or places or extras:
        _write_manifest(manifest_path, dict(new_manifest, faces=still_true))
    # Movers go to the staging folder first, so no rename can land on a file that
    # another face still has to move away.
    for a, b in moves:
        os.replace(a, b)
    for a, b in places:
        os.replace(a, b)
    for path in extras:
        os.unlink(path)

    problems = [f"{folder} holds {len(found)} numbered files, expected 0..{counts[split] - 1}"
                for split in SPLITS for kind in kinds
                for folder in [os.path.join(root, f"{split}_{kind}")]
                for found in [_numbered(folder, _ext(kind))]
                if sorted(found) != list(range(counts[split]))]
    if problems:
        print(f"error: final check failed: {problems[0]}"
              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
              file=sys.stderr)
        return 1
    manifest_changed = new_manifest != old_manifest
    if manifest_changed:
        _write_manifest(manifest_path, new_manifest)
    leftovers = os.listdir(staging)
    shutil.rmtree(staging)

    _summary(root, rows, counts, plan, skipped, parts, kinds, kept_sizes,
             unchanged, renamed, len(extras), stale + len(leftovers),
             nothing_done=not (moves or places or extras or manifest_changed or stale))
    return 0


def _changes(root, plan, old_faces):
    """Renames that put every planned face in place, given where its outputs are now.

    Returns (moves, places, still_true, renamed, unchanged): moves take valid outputs
    of renumbered faces from their old place to the staging folder, places take
    staged outputs to their final names; still_true are the manifest entries that
    none of these renames can falsify.
    """
    moves, places, still_true = [], [], []
    renamed = unchanged = 0
    for k, split, n, fp, state in plan:
        old = old_faces.get(k)
        same = old == (split, n, fp)
        if same:
            still_true.append({"split": split, "n": n, "k": k, "fp": fp})
        todo = [kind for kind, where in state.items() if not (same and where == "old")]
        for kind in todo:
            staged = _staged_path(root, kind, k, fp)
            if state[kind] == "old":
                moves.append((_final_path(root, kind, old[0], old[1]), staged))
            places.append((staged, _final_path(root, kind, split, n)))
        if not todo:
            unchanged += 1
        elif all(state[kind] == "old" for kind in todo):
            renamed += 1
    return moves, places, still_true, renamed, unchanged


def _surplus(root, kinds, counts, moved_away):
    """Numbered output files no face is planned for (or with a non-canonical name
    such as 007.png, which a reader would take for 7.png)."""
    extras = []
    for split in SPLITS:
        for kind in kinds:
            folder = os.path.join(root, f"{split}_{kind}")
            for n, names in _numbered(folder, _ext(kind)).items():
                extras += [path for name in names
                           if (n >= counts[split] or name != f"{n}.{_ext(kind)}")
                           and (path := os.path.join(folder, name)) not in moved_away]
    return extras


def _summary(root, rows, counts, plan, skipped, parts, kinds, kept_sizes, unchanged,
             renamed, removed, stale, nothing_done):
    rows_per_split = dict.fromkeys(SPLITS, 0)
    for _, orig_idx in rows:
        rows_per_split[split_of(orig_idx)] += 1
    out = sys.stdout
    print(f"CelebAMask-HQ in {root}: "
          + ", ".join(f"{s} {counts[s]} faces" for s in SPLITS)
          + f" (checked: every split has {'/'.join(kinds)} files 0..N-1)", file=out)
    for s in SPLITS:
        if rows_per_split[s] != counts[s]:
            print(f"  {s}: {rows_per_split[s]} mapping rows - "
                  f"{rows_per_split[s] - counts[s]} skipped = {counts[s]}", file=out)
    bare = [k for k, *_ in plan if not parts.get(k)]
    shown = ", ".join(map(str, bare[:20])) + (", ..." if len(bare) > 20 else "")
    print(f"faces without any annotation (all-zero label): {len(bare)}"
          + (f" (k = {shown})" if bare else ""), file=out)
    print(f"faces skipped: {len(skipped)}", file=out)
    for entry in skipped:
        print(f"  k={entry['k']} ({entry['split']}): {entry['reason']}", file=out)
    if kept_sizes:
        print("also kept up to date from an earlier run: "
              + ", ".join(f"*_label_{s}" for s in sorted(kept_sizes)), file=out)
    if nothing_done:
        print(f"nothing to do: all {len(plan)} faces were already up to date", file=out)
    else:
        written = len(plan) - unchanged - renamed
        print(f"this run: faces written {written}, renumbered by renaming {renamed}, "
              f"already up to date {unchanged}; files removed: {removed} surplus, "
              f"{stale} left by interrupted runs", file=out)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m data.prepare_celebamask_hq",
        description="Turn the CelebAMask-HQ release into DATA_ROOT/CelebAMask-HQ/"
                    "{train,val,test}_{img,label}/<n>.{jpg,png} (labels: 512x512 uint8, "
                    "classes 0..18), split by CelebA's partition and numbered per split in "
                    "mapping order.",
        epilog="Skipped faces leave no holes: n counts the faces written, and "
               "CelebAMask-HQ/manifest.json records (split, n, k) for each. Safe to "
               "interrupt and re-run: finished files are kept, partial ones redone, and a "
               "run with nothing to do writes nothing. Exit codes: 0 done, 1 output not "
               "writable or final check failed, 2 bad input, 130 interrupted.")
    p.add_argument("--src", required=True, metavar="RELEASE_DIR",
                   help=f"unpacked release holding {IMAGE_DIR}/, {MASK_DIR}/ and {MAPPING_FILE}")
    p.add_argument("--dst", required=True, metavar="DATA_ROOT",
                   help=f"dataset root (cfg.path_dataset); output goes to DATA_ROOT/{OUT_DIR}/")
    p.add_argument("--workers", type=_positive, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes (default: os.cpu_count(), here %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="stop with exit code 2 at the first bad face (missing image, "
                        "unreadable or wrongly sized mask, missing mask folder) instead of "
                        "skipping it and listing it in the summary")
    p.add_argument("--size", type=_label_size, action="append", default=[], metavar="S",
                   help="also write {split}_label_S/<n>.png, the 512 label resized to SxS with "
                        "PIL NEAREST as the loader would (e.g. 64); may be repeated")
    return p


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _label_size(text):
    value = int(text)
    if not 1 <= value < MASK_SIZE:
        raise argparse.ArgumentTypeError(f"must be in 1..{MASK_SIZE - 1}, got {value}")
    return value


def main(argv=None):
    """Command-line entry point; returns the exit code (see the module docstring)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        return _prepare(args)
    except FatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
