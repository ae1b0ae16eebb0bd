import json
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from data import prepare_celebamask_hq as prep
from tests.celebamask_fixture import PARTS, boxes, expected_label, write_mask, write_release
from util.io import FileLock

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
    """(inode, mtime_ns, size) of every file below folder, by relative path (but the lock
    file, which each run holds and writes its process id into)."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in set(names) - {prep.LOCK_FILE}:
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
    assert manifest["faces"] == {split: list(splits[split]) for split in SPLITS}


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
    temps = [root / "train_label" / ".0.png.4242.tmp", root / ".manifest.json.4242.tmp",
             root / "test_label_64" / ".1.png.x8_kq2.tmp"]
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
    assert "faces written 3, already up to date 5, files removed 6" in out  # 3 + 3 temps


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
    assert "train 2 faces, val 3 faces, test 2 faces" in out
    manifest = json.loads((dst / "CelebAMask-HQ" / "manifest.json").read_text())
    assert [(s["k"], s["split"]) for s in manifest["skipped"]] == [(2, "train")]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_strict_makes_a_bad_face_fatal(capsys, release, dst, problem):
    path = _break(release, problem)
    rc, out, err = run(capsys, release, dst, "--strict", workers=2)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
    assert "Traceback" not in err + out
    written = [name for _, _, names in os.walk(dst) for name in names]
    assert written == [prep.LOCK_FILE]  # no output, no manifest.json


@pytest.mark.parametrize("case", ["mapping", "src", "mask_folder", "mask_subfolder", "bad_row",
                                  "bad_header", "repeated_idx"])
@pytest.mark.parametrize("strict", [False, True])
def test_fatal_input_errors_exit_2_with_one_line(capsys, release, dst, case, strict):
    mapping = release.mapping
    if case == "mapping":
        os.remove(mapping)
        named = mapping
    elif case == "src":
        shutil.rmtree(release.root)
        named = release.root
    elif case in ("mask_folder", "mask_subfolder"):  # a missing folder 0: faces 0..1999
        named = os.path.join(release.root, "CelebAMask-HQ-mask-anno",
                             *(["0"] if case == "mask_subfolder" else []))
        shutil.rmtree(named)
    else:
        lines = open(mapping).read().splitlines()
        lines[0 if case == "bad_header" else 3] = (
            "5 162771 5.jpg" if case == "repeated_idx" else "7 not-a-number 1.jpg")
        open(mapping, "w").write("\n".join(lines) + "\n")
        named = f"{mapping} line {1 if case == 'bad_header' else 4}"
    rc, out, err = run(capsys, release, dst, *(["--strict"] if strict else []))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err
    assert out == ""


def test_fixing_a_face_renumbers_the_faces_after_it(capsys, release, dst):
    _break(release, "garbage_mask")
    assert run(capsys, release, dst, "--size", "64")[0] == 0
    val_before = snapshot(dst / "CelebAMask-HQ" / "val_label")
    write_mask(release.mask(2, "hair"), dict(boxes(2))["hair"])

    rc, out, err = run(capsys, release, dst, workers=2)  # no --size: label_64 kept in step
    assert rc == 0, err
    assert_prepared(release, dst, release.splits, sizes=(64,))
    # k = 2 comes back as train n = 0; k = 3 and k = 1 move from n = 0, 1 to n = 1, 2.
    assert snapshot(dst / "CelebAMask-HQ" / "val_label") == val_before
    assert "faces written 3, already up to date 5, files removed 6" in out
    assert "faces skipped: 0" in out


def test_a_changed_source_file_is_copied_again(capsys, release, dst):
    assert run(capsys, release, dst, "--size", "64")[0] == 0
    before = snapshot(dst)
    image = release.image(5)  # test n = 0; same size, other bytes: only the mtime tells
    data = bytearray(read_bytes(image))
    data[len(data) // 2] ^= 0xFF
    with open(image, "wb") as f:
        f.write(data)
    write_mask(release.mask(7, "hair"), (0, 512, 0, 512))  # val n = 0: all hair now

    rc, out, err = run(capsys, release, dst)
    assert rc == 0, err
    assert read_bytes(out_path(dst, "test", "img", 0)) == bytes(data)
    hair = PARTS.index("hair") + 1  # covers all but the parts painted after it
    want = np.where(expected_label(7) > hair, expected_label(7), hair)
    np.testing.assert_array_equal(load(out_path(dst, "val", "label", 0)), want)
    assert load(out_path(dst, "val", "label_64", 0))[0, 0] == hair
    assert "faces written 2, already up to date 6" in out
    changed = {rel for rel, info in snapshot(dst).items() if before.get(rel) != info}
    assert changed == {os.path.join("CelebAMask-HQ", name) for name in (
        "test_img/0.jpg", "test_label/0.png", "test_label_64/0.png",
        "val_img/0.jpg", "val_label/0.png", "val_label_64/0.png")}


def test_an_unreadable_manifest_means_every_face_is_redone(capsys, release, dst):
    assert run(capsys, release, dst)[0] == 0
    stray = out_path(dst, "train", "img", 0)  # a well-formed file of another face
    shutil.copy(release.image(5), stray)
    (dst / "CelebAMask-HQ" / "manifest.json").write_text("{not json")
    rc, out, err = run(capsys, release, dst)
    assert rc == 0, err
    assert "faces written 8, already up to date 0" in out
    assert_prepared(release, dst, release.splits)


def _corrupt_image_data(path):
    """Break a PNG's pixel data but keep its header and its final IEND chunk."""
    data = bytearray(read_bytes(path))
    at = data.index(b"IDAT") + 8
    data[at:at + 8] = b"\xff" * 8
    with open(path, "wb") as f:
        f.write(data)


def test_a_mask_that_only_fails_to_decode_ends_the_run_and_is_skipped_by_the_next(
        capsys, release, dst):
    path = release.mask(2, "hair")
    _corrupt_image_data(path)
    rc, out, err = run(capsys, release, dst, "--size", "64", workers=2)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "k=2" in err and str(path) in err and "run the same command again" in err
    val = snapshot(dst / "CelebAMask-HQ" / "val_label")  # the other faces were written
    assert sorted(val) == ["0.png", "1.png", "2.png"]

    rc, out, err = run(capsys, release, dst)
    assert rc == 0, err
    assert "k=2 (train): " in out and str(path) in out
    assert_prepared(release, dst, dict(release.splits, train=[3, 1]), sizes=(64,))
    assert snapshot(dst / "CelebAMask-HQ" / "val_label") == val
    # train n = 1 held k = 3, now k = 1: 3 files; n = 2 is beyond the count now: 3 files
    assert "faces written 2, already up to date 5, files removed 6" in out
    assert run(capsys, release, dst)[1].count("nothing to do") == 1

    rc, out, err = run(capsys, release, dst, "--strict")
    assert rc == 2 and err.count("\n") == 1 and str(path) in err


def test_a_killed_run_resumes_without_redoing_finished_files(capsys, release, dst):
    pid = os.fork()
    if pid == 0:  # SIGKILL right before the 9th rename: the manifest's, then 7 outputs
        try:
            renames, real_replace = [], os.replace

            def replace(source, target):
                renames.append(target)
                if len(renames) == 9:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(source, target)
            os.replace = replace
            prep.main(["--src", release.root, "--dst", str(dst), "--workers", "1"])
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = snapshot(dst)
    finished = {rel: info for rel, info in left.items()
                if rel.endswith((".jpg", ".png")) and not os.path.basename(rel).startswith(".")}
    assert len(finished) == 7 and sum(rel.endswith(".tmp") for rel in left) == 1

    rc, out, err = run(capsys, release, dst)
    assert rc == 0, err
    assert_prepared(release, dst, release.splits)
    after = snapshot(dst)
    assert {rel: after[rel] for rel in finished} == finished
    assert not any(rel.endswith(".tmp") for rel in after)
    assert "this run: faces written 5, already up to date 3, files removed 1" in out


def test_ctrl_c_exits_130_and_the_next_run_finishes(capsys, release, dst, monkeypatch):
    renames, real_replace = [], os.replace

    def replace(source, target):
        renames.append(target)
        if len(renames) == 4:
            raise KeyboardInterrupt
        real_replace(source, target)
    monkeypatch.setattr(os, "replace", replace)
    rc, out, err = run(capsys, release, dst)
    assert rc == 130 and err == "interrupted; run the same command again to resume\n"
    monkeypatch.undo()
    rc, out, err = run(capsys, release, dst)
    assert rc == 0, err
    assert_prepared(release, dst, release.splits)
    assert "faces written 7, already up to date 1" in out


def test_a_run_is_refused_while_another_holds_the_output(capsys, release, dst):
    root = dst / "CelebAMask-HQ"
    root.mkdir(parents=True)
    with FileLock(str(root / prep.LOCK_FILE)):
        rc, out, err = run(capsys, release, dst)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and f"process {os.getpid()}" in err and str(root) in err
    assert sorted(os.listdir(root)) == [prep.LOCK_FILE]
    assert run(capsys, release, dst)[0] == 0  # the lock went with its holder


def test_unwritable_output_exits_1_with_one_line(capsys, release, dst):
    root = dst / "CelebAMask-HQ"
    root.mkdir(parents=True)
    (root / "val_label").write_bytes(b"a file where a folder must go")
    rc, out, err = run(capsys, release, dst)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert str(root / "val_label") in err and "Traceback" not in err
    dst_file = dst.parent / "a_file"
    dst_file.write_bytes(b"")
    rc, out, err = run(capsys, release, dst_file)
    assert rc == 1 and err.count("\n") == 1 and str(dst_file) in err


@pytest.mark.parametrize("flags", [["--size", "512"], ["--size", "0"], ["--workers", "0"]])
def test_out_of_range_flags_are_usage_errors(capsys, release, dst, flags):
    assert prep.main(["--src", release.root, "--dst", str(dst), *flags]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not dst.exists()


def test_help_explains_every_flag(capsys):
    assert prep.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--src", "--dst", "--workers", "--strict", "--size"):
        assert flag in out
    assert prep.main(["--src", "x"]) == 2  # --dst missing: usage error
    assert "--dst" in capsys.readouterr().err
