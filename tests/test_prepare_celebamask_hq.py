import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data import prepare_celebamask_hq as prep
from tests.celebamask_fixture import PARTS, boxes, expected_label, write_mask, write_release

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("pristine") / "release")


@pytest.fixture
def release(pristine, tmp_path):
    """A private copy of the synthetic release (copytree keeps the mtimes)."""
    shutil.copytree(pristine.root, tmp_path / "release")
    return type(pristine)(root=str(tmp_path / "release"))


@pytest.fixture
def dst(tmp_path):
    return tmp_path / "data"


def run(capsys, release, dst, *extra, workers=1):
    rc = prep.main(["--src", release.root, "--dst", str(dst), "--workers", str(workers),
                    *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def out_path(dst, split, kind, n):
    ext = "jpg" if kind == "img" else "png"
    return dst / "CelebAMask-HQ" / f"{split}_{kind}" / f"{n}.{ext}"


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def load(path):
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img).copy()


def snapshot(folder):
    """(inode, mtime_ns, size) of every file below folder, by relative path."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(base, name))
            found[os.path.relpath(os.path.join(base, name), folder)] = (
                st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def assert_prepared(release, dst, splits, sizes=()):
    """Every split folder holds exactly the faces `splits` lists, in that order."""
    root = dst / "CelebAMask-HQ"
    for split in SPLITS:
        ks = splits[split]
        for kind in ("img", "label") + tuple(f"label_{s}" for s in sizes):
            assert sorted(os.listdir(root / f"{split}_{kind}")) == sorted(
                f"{n}.{'jpg' if kind == 'img' else 'png'}" for n in range(len(ks)))
        for n, k in enumerate(ks):
            assert read_bytes(out_path(dst, split, "img", n)) == read_bytes(release.image(k))
            label = load(out_path(dst, split, "label", n))
            np.testing.assert_array_equal(label, expected_label(k))
            for s in sizes:
                small = load(out_path(dst, split, f"label_{s}", n))
                with Image.open(out_path(dst, split, "label", n)) as img:
                    want = np.asarray(img.resize((s, s), Image.NEAREST))
                np.testing.assert_array_equal(small, want)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [(f["split"], f["n"], f["k"]) for f in manifest["faces"]] == sorted(
        ((s, n, k) for s in SPLITS for n, k in enumerate(splits[s])),
        key=lambda e: [k for k, _ in release.rows].index(e[2]))
    assert not (root / ".staging").exists()


# ---------------------------------------------------------------- pure functions

def test_split_of_follows_the_celeba_partition_boundaries():
    assert [prep.split_of(i) for i in (0, 162770, 162771, 182637, 182638, 202598)] == [
        "train", "train", "val", "val", "test", "test"]
    with pytest.raises(ValueError):
        prep.split_of(-1)


def test_label_from_masks_paints_in_part_order_not_dict_order():
    skin = np.ones((6, 6), bool)
    hair = np.zeros((6, 6), np.uint8)
    hair[0:2] = 255
    neck = np.zeros((6, 6), bool)
    neck[3:6, 1:5] = True
    cloth = np.zeros((6, 6, 3), np.uint8)  # colour mask: any nonzero channel counts
    cloth[5, :, 1] = 9
    skin[5, 5] = False
    label = prep.label_from_masks({"cloth": cloth, "neck": neck, "hair": hair, "skin": skin},
                                  shape=(6, 6))
    s, h, nk, c = (PARTS.index(p) + 1 for p in ("skin", "hair", "neck", "cloth"))
    assert (label[0:2] == h).all()  # hair over skin
    assert (label[5, :] == c).all()  # cloth over neck and over the background pixel
    assert (label[3:5, 1:5] == nk).all() and label[3, 0] == s
    assert prep.label_from_masks({}, shape=(3, 3)).tolist() == [[0] * 3] * 3
    assert label.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown part"):
        prep.label_from_masks({"beard": skin}, shape=(6, 6))
    with pytest.raises(ValueError, match="shape"):
        prep.label_from_masks({"skin": np.ones((5, 6))}, shape=(6, 6))


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1"])
def test_read_mask_treats_any_nonzero_colour_as_present(tmp_path, mode):
    path = tmp_path / "m.png"
    write_mask(path, (10, 20, 30, 50), mode=mode)
    present = prep.read_mask(path) != 0
    want = np.zeros((512, 512), bool)
    want[10:20, 30:50] = True
    np.testing.assert_array_equal(present, want)


# ---------------------------------------------------------------- the tool

def test_prepares_splits_labels_and_small_labels(capsys, release, dst):
    rc, out, err = run(capsys, release, dst, "--size", "64", workers=2)
    assert rc == 0, err
    # Renumbering per split in mapping order: train rows are k = 2, 3, 1.
    assert read_bytes(out_path(dst, "train", "img", 1)) == read_bytes(release.image(3))
    # The partition boundaries: 162770 -> train, 162771 / 182637 -> val, 182638 -> test.
    assert read_bytes(out_path(dst, "train", "img", 0)) == read_bytes(release.image(2))
    assert read_bytes(out_path(dst, "val", "img", 0)) == read_bytes(release.image(7))
    assert read_bytes(out_path(dst, "val", "img", 1)) == read_bytes(release.image(0))
    assert read_bytes(out_path(dst, "test", "img", 0)) == read_bytes(release.image(5))
    assert_prepared(release, dst, release.splits, sizes=(64,))
    # Overlaps resolved by precedence; an unannotated face is all background.
    label = load(out_path(dst, "train", "label", 0))  # k = 2
    assert label[150, 200] == PARTS.index("hair") + 1  # inside hair and skin
    assert label[450, 250] == PARTS.index("cloth") + 1  # inside cloth and neck
    assert label[200, 180] == PARTS.index("l_eye") + 1  # inside l_eye and eye_g
    assert label[5, 5] == 0
    assert not load(out_path(dst, "train", "label", 1)).any()  # k = 3
    assert "faces without any annotation (all-zero label): 2 (k = 3, 6)" in out
    assert "faces skipped: 0" in out
    assert err == ""


def test_second_run_rewrites_nothing_and_says_so(capsys, release, dst):
    assert run(capsys, release, dst, "--size", "64")[0] == 0
    before = snapshot(dst)
    rc, out, _ = run(capsys, release, dst, workers=2)  # a _label_64 folder is kept anyway
    assert rc == 0
    assert snapshot(dst) == before
    assert "nothing to do: all 8 faces were already up to date" in out


def test_partial_and_foreign_files_are_redone_and_temps_removed(capsys, release, dst):
    assert run(capsys, release, dst, "--size", "64")[0] == 0
    root = dst / "CelebAMask-HQ"
    cut_label = out_path(dst, "val", "label", 1)  # k = 0
    cut_label.write_bytes(cut_label.read_bytes()[:len(cut_label.read_bytes()) // 2])
    cut_jpg = out_path(dst, "train", "img", 0)  # k = 2
    cut_jpg.write_bytes(cut_jpg.read_bytes()[:100])
    small = out_path(dst, "test", "label_64", 1)  # right name, wrong size
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small)
    surplus = [out_path(dst, "train", "img", 3), out_path(dst, "val", "label", 7),
               root / "val_label" / "01.png"]
    for path in surplus:
        shutil.copy(out_path(dst, "train", "label", 0), path)
    (root / ".staging").mkdir()
    temps = [root / "train_label" / ".0.png.4242.tmp", root / ".manifest.json.4242.tmp",
             root / ".staging" / ".2.abc.label.png.4242.tmp"]
    for path in temps:
        path.write_bytes(b"half")
    before = snapshot(dst)

    rc, out, err = run(capsys, release, dst, "--size", "64")
    assert rc == 0, err
    assert_prepared(release, dst, release.splits, sizes=(64,))
    assert not any(p.exists() for p in surplus + temps)
    after = snapshot(dst)
    redone = {os.path.relpath(p, dst) for p in (cut_label, cut_jpg, small)}
    for rel, info in before.items():
        if rel in after and rel not in redone and rel != os.path.join("CelebAMask-HQ",
                                                                      "manifest.json"):
            assert after[rel] == info, f"{rel} was rewritten"
    for rel in redone:
        assert after[rel] != before[rel]
    assert "files removed: 3 surplus, 3 left by interrupted runs" in out


def _break(release, problem, k=2):
    """Apply one kind of bad input to face k; returns the path the error must name."""
    if problem == "missing_image":
        os.remove(release.image(k))
        return release.image(k)
    path = release.mask(k, "hair")
    if problem == "garbage_mask":
        with open(path, "wb") as f:
            f.write(b"this is not a png at all")
    elif problem == "truncated_mask":
        data = read_bytes(path)
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    elif problem == "small_mask":
        write_mask(path, (1, 20, 1, 20), size=256)
    return path


PROBLEMS = ["missing_image", "garbage_mask", "truncated_mask", "small_mask"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_face_is_listed_and_skipped_with_dense_numbering(capsys, release, dst, problem):
    path = _break(release, problem)
    rc, out, err = run(capsys, release, dst)
    assert rc == 0, err
    assert "k=2 (train): " in out and str(path) in out
    if problem == "small_mask":
        assert "is 256x256, expected 512x512" in out
    splits = dict(release.splits, train=[3, 1])  # k = 2 was train n = 0
    assert_prepared(release, dst, splits)
    assert "train: 3 mapping rows - 1 skipped = 2" in out
    manifest = json.loads((dst / "CelebAMask-HQ" / "manifest.json").read_text())
    assert [(s["k"], s["split"]) for s in manifest["skipped"]] == [(2, "train")]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_strict_makes_a_bad_face_fatal(capsys, release, dst, problem):
    path = _break(release, problem)
    rc, out, err = run(capsys, release, dst, "--strict", workers=2)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
    assert "Traceback" not in err + out
    root = dst / "CelebAMask-HQ"
    assert all(not os.listdir(root / f"{s}_{kind}") for s in SPLITS for kind in ("img", "label"))
    assert not (root / "manifest.json").exists()


@pytest.mark.parametrize("case", ["mapping", "src", "mask_folder", "bad_row", "bad_header"])
@pytest.mark.parametrize("strict", [False, True])
def test_fatal_input_errors_exit_2_with_one_line(capsys, release, dst, case, strict):
    mapping = release.mapping
    if case == "mapping":
        os.remove(mapping)
        named = mapping
    elif case == "src":
        shutil.rmtree(release.root)
        named = release.root
    elif case == "mask_folder":
        named = os.path.join(release.root, "CelebAMask-HQ-mask-anno")
        shutil.rmtree(named)
    else:
        lines = open(mapping).read().splitlines()
        lines[0 if case == "bad_header" else 3] = "7 not-a-number 1.jpg"
        open(mapping, "w").write("\n".join(lines) + "\n")
        named = f"{mapping} line {1 if case == 'bad_header' else 4}"
    rc, out, err = run(capsys, release, dst, *(["--strict"] if strict else []))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err
    assert out == ""


def test_fixing_a_face_renumbers_by_renaming(capsys, release, dst):
    _break(release, "garbage_mask")
    assert run(capsys, release, dst, "--size", "64")[0] == 0
    was = {n: os.stat(out_path(dst, "train", "img", n)).st_ino for n in (0, 1)}  # k = 3, 1
    val_before = snapshot(dst / "CelebAMask-HQ" / "val_label")
    write_mask(release.mask(2, "hair"), dict(boxes(2))["hair"])

    rc, out, err = run(capsys, release, dst, workers=2)  # no --size: label_64 kept in step
    assert rc == 0, err
    assert_prepared(release, dst, release.splits, sizes=(64,))
    # k = 3 and k = 1 moved from n = 0, 1 to n = 1, 2 by rename, not by a new copy.
    assert os.stat(out_path(dst, "train", "img", 1)).st_ino == was[0]
    assert os.stat(out_path(dst, "train", "img", 2)).st_ino == was[1]
    assert snapshot(dst / "CelebAMask-HQ" / "val_label") == val_before
    assert "faces written 1, renumbered by renaming 2, already up to date 5" in out
    assert "faces skipped: 0" in out


def test_an_interrupted_run_resumes_from_staged_work(capsys, release, dst):
    # --strict stops at k = 4, the last mapping row, after staging all other faces.
    _break(release, "garbage_mask", k=4)
    assert run(capsys, release, dst, "--strict")[0] == 2
    staging = dst / "CelebAMask-HQ" / ".staging"
    staged_jpg = [n for n in os.listdir(staging) if n.startswith("5.") and n.endswith(".jpg")]
    assert len(staged_jpg) == 1
    inode = os.stat(staging / staged_jpg[0]).st_ino
    write_mask(release.mask(4, "hair"), dict(boxes(4))["hair"])

    rc, _, err = run(capsys, release, dst)
    assert rc == 0, err
    assert_prepared(release, dst, release.splits)
    assert os.stat(out_path(dst, "test", "img", 0)).st_ino == inode  # k = 5, not recopied


def test_help_explains_every_flag(capsys):
    assert prep.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--src", "--dst", "--workers", "--strict", "--size"):
        assert flag in out
    assert prep.main(["--src", "x"]) == 2  # --dst missing: usage error
    assert "--dst" in capsys.readouterr().err
