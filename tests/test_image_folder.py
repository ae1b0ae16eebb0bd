"""Your own pictures: the image-folder dataset (data/sources/image_folder.py), the decoding of
any picture (data.decode.PictureDecoder, data.pictures) and ``-ts RUN --images DIR``.

Every folder is written here with real bytes (Pillow's JPEG and PNG encoders); the expected
pixels are worked out with Pillow calls written out in the test, not read from the code under
test. The oracle test evaluates a trained MNIST run (``mnist_runs``) on the shipped MNIST test
images written out as PNG files: the pixels are the same, so the figures must be too.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import data
import main
from configs import load_config
from data.decode import PictureDecoder
from data.sources import image_folder, mnist
from trainer import runs
from util.codes import load_codes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--limit-batches", "2", "train.epoch_max", "1", "network.num_rb", "1",
        "quantization.size_dict", "16", "quantization.dim_dict", "8", "train.bs", "4",
        "test.bs", "4"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("SQVAE_CHECKPOINTS", raising=False)
    monkeypatch.delenv("SQVAE_DATA", raising=False)


def last_records(run_dir, n=2):
    with open(os.path.join(run_dir, runs.METRICS_FILE)) as f:
        return [json.loads(line) for line in f.read().splitlines()[-n:]]


def the_run(root, specific):
    (run,) = os.listdir(os.path.join(root, specific))
    return os.path.join(root, specific, run)


def smooth(rng, width, height):
    """An RGB picture with structure (a coarse colour field), so resizing has work to do."""
    coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def write_mixed_folder(folder, seed=0):
    """RGB, grey and RGBA pictures, JPEG and PNG, of several sizes and aspect ratios, a nested
    subfolder, a corrupt JPEG, and a file that is no picture; returns the readable names."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "nested", "deeper"))
    readable = []
    sizes = [(64, 64), (300, 100), (90, 200), (17, 17), (128, 96), (40, 41), (500, 320)]
    for i in range(28):
        width, height = sizes[i % len(sizes)]
        mode = ("RGB", "L", "RGBA")[i % 3]
        img = smooth(rng, width, height).convert(mode)
        where = ("nested/deeper/" if i % 5 == 0 else "nested/" if i % 4 == 0 else "")
        ext = "png" if mode == "RGBA" or i % 2 else "jpg"
        name = f"{where}pic{i:02d}.{ext}"
        img.save(os.path.join(folder, name), **({"quality": 90} if ext == "jpg" else {}))
        readable.append(name)
    with open(os.path.join(folder, "nested", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG after all")
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not a picture: never read\n")
    return sorted(readable)


# ----------------------------------------------------------------------------- decoding

def test_a_picture_is_grey_or_rgb_centre_cropped_and_resized(tmp_path):
    rng = np.random.default_rng(1)
    wide = smooth(rng, 300, 100)
    wide.save(tmp_path / "wide.png")
    # The centred 100 x 100 square, resized with Pillow's antialiased bicubic filter.
    expected = np.asarray(wide.crop((100, 0, 200, 100)).resize((32, 32), Image.BICUBIC))
    got = PictureDecoder(3, 32)(str(tmp_path / "wide.png"))
    assert got.dtype == np.uint8 and got.shape == (3, 32, 32)
    assert np.array_equal(got, expected.transpose(2, 0, 1))
    # Grey: Pillow's L conversion of the same square.
    grey = np.asarray(wide.crop((100, 0, 200, 100)).convert("L").resize((32, 32), Image.BICUBIC))
    assert np.array_equal(PictureDecoder(1, 32)(str(tmp_path / "wide.png")), grey[None])
    # A tall RGBA picture: alpha dropped, the centred square of a 90 x 200 picture.
    tall = smooth(rng, 90, 200).convert("RGBA")
    tall.putalpha(7)
    tall.save(tmp_path / "tall.png")
    expected = np.asarray(tall.convert("RGB").crop((0, 55, 90, 145)).resize((28, 28),
                                                                            Image.BICUBIC))
    assert np.array_equal(PictureDecoder(3, 28)(str(tmp_path / "tall.png")),
                          expected.transpose(2, 0, 1))
    # A picture already at the size passes through untouched.
    exact = np.asarray(smooth(rng, 28, 28).convert("L"))
    Image.fromarray(exact).save(tmp_path / "exact.png")
    assert np.array_equal(PictureDecoder(1, 28)(str(tmp_path / "exact.png")), exact[None])


def test_sixteen_bit_grey_is_scaled_and_exif_rotation_applied(tmp_path):
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # up to 65520
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = PictureDecoder(1, 64)(str(tmp_path / "deep.png"))
    assert np.array_equal(got[0], np.round(values / 257).astype(np.uint8))
    # A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view).
    upright = np.zeros((40, 80, 3), np.uint8)
    upright[:, :40] = 255  # white left half when upright (80 wide, 40 high)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40 wide, 80 high
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    got = PictureDecoder(1, 28)(str(tmp_path / "sideways.jpg"))[0]
    # Upright, the centred 40 x 40 square has white on its left half, black on its right.
    assert got[:, :10].mean() > 200 and got[:, -10:].mean() < 50


def test_the_folder_lists_pictures_pillow_reads_recursively_in_sorted_order(tmp_path):
    readable = write_mixed_folder(tmp_path)
    os.makedirs(tmp_path / ".hidden")
    shutil.copy(tmp_path / readable[0], tmp_path / ".hidden" / "x.png")
    from data import pictures
    assert pictures.list_pictures(str(tmp_path)) == sorted(readable + ["nested/broken.jpg"])


# ----------------------------------------------------------------------------- the oracle

def test_images_of_the_mnist_test_split_give_the_figures_of_its_test_split(
        mnist_runs, small_data, tmp_path):
    """The shipped MNIST test images written out as PNG files named by index (zero-padded, so
    sorted order is file order): -ts --images on them is -ts, to 1e-6 relative. The run
    evaluates in batches of 10 (mnist_runs); the first 50 batches, 500 images, are written
    and compared with -ts --limit-batches 50."""
    run = shutil.copytree(mnist_runs[0], tmp_path / "run")
    folder = tmp_path / "mnist_test_png"
    folder.mkdir()
    images = mnist.load_mnist_like("MNIST", small_data)["test"][0][:500]
    for i, image in enumerate(images):
        Image.fromarray(image[0]).save(folder / f"{i:05d}.png")
    common = ["-c", "mnist_gauss_1.yaml", "path_dataset", small_data]
    assert main.run([*common, "-ts", str(run), "--limit-batches", "50"]) == 0
    test = last_records(run)[-1]
    assert main.run([*common, "-ts", str(run), "--images", str(folder), "--encode",
                     "images"]) == 0
    stochastic, pictures = last_records(run)
    assert test["split"] == "test" and pictures["split"] == "images"
    assert stochastic["split"] == "images_stochastic"
    assert pictures["folder"] == str(folder) and pictures["pictures"] == 500
    for key in ("mse", "perplexity_split", "loss", "codes_used"):
        assert pictures[key] == pytest.approx(test[key], rel=1e-6), key
    # And their codes, one row per file, named.
    codes = load_codes(os.path.join(run, "codes_images.npz"))
    assert codes["names"] == [f"{i:05d}.png" for i in range(500)]
    assert codes["codes"].shape == (500, 7, 7)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_release_run_folder_is_evaluated_on_pictures_and_left_untouched(small_data,
                                                                           tmp_path, capsys):
    run = shutil.copytree(os.path.join(REPO, "tests", "release", "mnist_gauss_1_seed3"),
                          tmp_path / "release_run")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(mnist.load_mnist_like("MNIST", small_data)["test"][0][:40]):
        Image.fromarray(image[0]).save(folder / f"{i:03d}.png")
    before = snapshot(run)
    assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", str(run), "--images",
                     str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"not recorded: {run} is a run folder of the authors' release" in out
    assert re.search(r"^images \(best\.pt\): loss \d+\.\d\d, mse/pixel ", out, re.M)
    assert snapshot(run) == before
    # Its codes would be written into it: refused in one line, the folder as it was.
    assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", str(run), "--images", str(folder),
                     "--encode", "images"]) == 2
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- real bytes

def test_training_on_a_folder_of_mixed_files_then_ts_and_encode(tmp_path, capfd):
    folder, root = tmp_path / "pictures", tmp_path / "runs"
    readable = write_mixed_folder(folder)
    train = ["-c", "images_gauss_1.yaml", "--save", *TINY, "path", str(root),
             "path_dataset", str(folder)]
    assert main.run(train) == 0
    out, err = capfd.readouterr()
    # The corrupt file is reported once, in one line with the count and its name.
    reports = [line for line in (out + err).splitlines() if "cannot be decoded" in line]
    assert reports == [f"warning: 1 of the 29 pictures under {folder} cannot be decoded and "
                       "are skipped: nested/broken.jpg"]
    run = the_run(root, "images_sqvae_gaussian_1")
    with open(os.path.join(run, runs.DATASET_FILES)) as f:
        record = json.load(f)
    splits = record["splits"]
    assert record["dataset"] == "ImageFolder" and record["path_dataset"] == str(folder)
    assert sorted(n for s in splits.values() for n in s["files"]) == readable
    assert [n for s in splits.values() for n in s["skipped"]] == ["nested/broken.jpg"]
    assert all(splits[s]["files"] for s in ("train", "val", "test"))
    # The cache sits in the folder, hidden, and is not mistaken for a picture.
    assert os.path.isfile(folder / ".sqvae-cache" / "pictures_3x64.npy")

    assert main.run(["-c", "images_gauss_1.yaml", "-ts", run, "--encode", "test"]) == 0
    test = last_records(run)[-1]
    assert test["split"] == "test" and np.isfinite(test["mse"])
    codes = load_codes(os.path.join(run, "codes_test.npz"))
    assert codes["codes"].shape == (len(splits["test"]["files"]), 16, 16)

    capfd.readouterr()
    assert main.run(["-c", "images_gauss_1.yaml", "-ts", run, "--images", str(folder),
                     "--encode", "images"]) == 0
    assert last_records(run)[-1]["pictures"] == len(readable)
    codes = load_codes(os.path.join(run, "codes_images.npz"))
    assert codes["names"] == readable and len(codes["codes"]) == len(readable)
    # Each command reports the skipped file once, though it reads the folder twice.
    out, err = capfd.readouterr()
    assert (out + err).count("cannot be decoded") == 1


def test_grey_32_pixel_training_and_the_vqvae_baseline(tmp_path):
    folder, root = tmp_path / "pictures", tmp_path / "runs"
    write_mixed_folder(folder, seed=3)
    assert main.run(["-c", "images_vqvae.yaml", "--save", *TINY, "dataset.channels", "1",
                     "dataset.image_size", "32", "path", str(root),
                     "path_dataset", str(folder)]) == 0
    run = the_run(root, "images_vqvae")
    assert load_config(os.path.join(run, "config.yaml")).dataset.shape == (1, 32, 32)
    assert os.path.isfile(folder / ".sqvae-cache" / "pictures_1x32.npy")
    assert main.run(["-c", "images_vqvae.yaml", "-ts", run, "--report"]) == 0
    assert os.path.isfile(os.path.join(run, "report.png"))
    # The prior trains on the recorded splits' codes, and samples decode to grey 32 x 32.
    assert main.run(["-c", "images_vqvae.yaml", "-ts", run, "--prior", "--limit-batches", "1",
                     "prior.epoch_max", "1"]) == 0
    assert last_records(run, 1)[0]["split"] == "prior_test"
    assert main.run(["-c", "images_vqvae.yaml", "-ts", run, "--sample", "3"]) == 0
    with Image.open(os.path.join(run, "samples.png")) as samples:
        assert samples.size[1] >= 32


def test_the_cache_is_reused_and_rebuilt_when_a_picture_or_the_size_changes(tmp_path):
    readable = write_mixed_folder(tmp_path)
    cache_file = tmp_path / ".sqvae-cache" / "pictures_3x32.npy"

    def load(size=32):
        cfg = load_config("images_gauss_1", ["path_dataset", str(tmp_path), "dataset.image_size",
                                             str(size)])
        return data.build_picture_loader(cfg, str(tmp_path), batch_size=8)

    first = load()
    built = (os.stat(cache_file).st_ino, os.stat(cache_file).st_mtime_ns)
    assert first.names == readable and first.record["skipped"] == ["nested/broken.jpg"]
    again = load()  # another config, as in another command: only the file on disk is left
    assert (os.stat(cache_file).st_ino, os.stat(cache_file).st_mtime_ns) == built
    x_first, x_again = next(iter(first))[0], next(iter(again))[0]
    assert x_first.shape == (8, 3, 32, 32) and (x_first == x_again).all()
    # A picture replaced: rebuilt, and the new pixels are read.
    target = tmp_path / readable[0]
    Image.new("RGB", (50, 50), (255, 0, 0)).save(target, format="JPEG" if
                                                  target.suffix == ".jpg" else "PNG")
    red = load()
    assert (os.stat(cache_file).st_ino, os.stat(cache_file).st_mtime_ns) != built
    first_red = next(iter(red))[0][0]
    assert first_red[0].mean() > 0.95 and first_red[1].mean() < 0.05
    # Another size is another cache, beside it.
    assert load(28).array.shape[1:] == (3, 28, 28)
    assert (tmp_path / ".sqvae-cache" / "pictures_3x28.npy").is_file() and cache_file.is_file()


def test_images_of_a_label_map_run_are_refused(tmp_path):
    smooth(np.random.default_rng(0), 20, 20).save(tmp_path / "a.png")
    with pytest.raises(data.DatasetError, match="--images reads pictures, but a CelebAMask_HQ "
                       "run reconstructs labels"):
        data.build_picture_loader(load_config("celebamask_vmf"), str(tmp_path), batch_size=1)


# ----------------------------------------------------------------------------- splits

def names_hashing_to(split, count, prefix):
    lo, hi = {"train": (0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1)}[split]
    found, i = [], 0
    while len(found) < count:
        name = f"{prefix}{i:04d}.png"
        if lo <= image_folder.hash_position(name) < hi:
            found.append(name)
        i += 1
    return found


def test_files_added_after_training_leave_the_test_split_as_recorded(tmp_path, capsys):
    folder, root = tmp_path / "pictures", tmp_path / "runs"
    folder.mkdir()
    rng = np.random.default_rng(4)
    first = [f"a{i:03d}.png" for i in range(30)]
    for name in first:
        smooth(rng, 40, 30).save(folder / name)
    config = ["-c", "images_gauss_1.yaml", "dataset.image_size", "28"]
    assert main.run([*config, "--save", *TINY, "path", str(root),
                     "path_dataset", str(folder)]) == 0
    run = the_run(root, "images_sqvae_gaussian_1")
    recorded = runs.read_dataset_files(run)
    assert main.run([*config, "-ts", run]) == 0
    before = last_records(run)[-1]
    capsys.readouterr()

    # Three new pictures that a fresh hash split would put into test, and two more.
    added = names_hashing_to("test", 3, "b") + names_hashing_to("train", 2, "c")
    for name in added:
        smooth(rng, 30, 40).save(folder / name)
    fresh = image_folder.hash_splits(sorted(first + added))
    assert set(fresh["test"]) - set(recorded["test"]["files"])

    assert main.run([*config, "-ts", run]) == 0
    after = last_records(run)[-1]
    out = capsys.readouterr().out
    assert f"{folder}: 5 picture(s) added since the run recorded its splits are left out" in out
    assert out.count("added since") == 1
    for key in ("mse", "loss", "perplexity_split"):
        assert after[key] == before[key], key
    cfg = load_config(os.path.join(run, "config.yaml"))
    loader = data.build_loader(cfg, "test", batch_size=4, shuffle=False,
                               recorded=runs.read_dataset_files(run))
    assert loader.names == recorded["test"]["files"]
    # --resume reads the recorded splits too.
    assert main.run([*config, "--resume", run, "train.epoch_max", "2"]) == 0
    assert "added since" in capsys.readouterr().out

    # A recorded test picture gone is a one-line error (exit 2), naming it.
    os.remove(folder / recorded["test"]["files"][0])
    assert main.run([*config, "-ts", run]) == 2


def test_train_val_test_folders_are_the_splits(tmp_path):
    rng = np.random.default_rng(5)
    counts = {"train": 6, "val": 2, "test": 3}
    for split, n in counts.items():
        (tmp_path / split / "sub").mkdir(parents=True)
        for i in range(n):
            smooth(rng, 20, 20).save(tmp_path / split / "sub" / f"{i}.png")
    smooth(rng, 20, 20).save(tmp_path / "loose.png")
    cfg = load_config("images_gauss_1", ["path_dataset", str(tmp_path), "dataset.image_size",
                                         "28"])
    for split, n in counts.items():
        loader = data.build_loader(cfg, split, batch_size=2, shuffle=False)
        assert loader.names == [f"{split}/sub/{i}.png" for i in range(n)]
        assert loader.dataset_size == n
    # Two of the three folders is refused in one line.
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(data.DatasetError, match=r"has train/, test/ but no val/") as e:
        data.build_loader(cfg, "train", batch_size=2, shuffle=False)
    assert "\n" not in str(e.value)


def test_hash_split_is_stable_and_about_90_5_5():
    names = [f"img{i:05d}.jpg" for i in range(4000)]
    splits = image_folder.hash_splits(names)
    again = image_folder.hash_splits(list(reversed(names)))
    assert {s: set(v) for s, v in again.items()} == {s: set(v) for s, v in splits.items()}
    shares = {s: len(v) / len(names) for s, v in splits.items()}
    assert abs(shares["train"] - 0.90) < 0.02 and abs(shares["val"] - 0.05) < 0.01
    assert abs(shares["test"] - 0.05) < 0.01
    # A file's split depends on its own name only: adding others moves nothing.
    more = image_folder.hash_splits(names + [f"new{i}.png" for i in range(100)])
    for split in splits:
        assert set(splits[split]) <= set(more[split])
    # Too few to fill val and test by hash: the highest-hash training names fill them.
    small = image_folder.hash_splits(["a.png", "b.png", "c.png"])
    assert sorted(len(v) for v in small.values()) == [1, 1, 1]


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("case", ["empty", "all_broken", "first_broken", "no_folder",
                                  "bad_size"])
def test_a_folder_without_pictures_or_a_bad_size_stops_in_one_line(tmp_path, capfd, case):
    folder = tmp_path / "pictures"
    folder.mkdir()
    opts = []
    if case == "all_broken":
        for i in range(60):
            (folder / f"{i:02d}.png").write_bytes(b"not a png")
    elif case == "first_broken":  # the first 256 all fail: stop there, whatever follows
        for i in range(260):
            (folder / f"a{i:03d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        for i in range(3):
            smooth(np.random.default_rng(i), 20, 20).save(folder / f"z{i}.png")
    elif case == "no_folder":
        folder = tmp_path / "absent"
    elif case == "bad_size":
        opts = ["dataset.image_size", "48"]
    code = main.run(["-c", "images_gauss_1.yaml", "--save", "path", str(tmp_path / "runs"),
                     "path_dataset", str(folder), *opts])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    expected = {
        "empty": f"error: no picture under {folder} (looked recursively",
        "all_broken": f"error: {folder}: none of its 60 image files can be decoded (00.png, "
                      "01.png, 02.png, ...; first error: cannot read image",
        "first_broken": f"error: {folder}: none of the first 256 of its 263 image files can "
                        "be decoded (a000.jpg, a001.jpg, a002.jpg, ...; first error: cannot "
                        "read image",
        "no_folder": f"error: {folder} is not a folder; set path_dataset",
        "bad_size": "error: config key 'dataset.image_size' is 48; dataset ImageFolder takes "
                    "64, 32 or 28 (the sizes with networks)",
    }[case]
    assert line.startswith(expected), line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_images_of_a_label_map_run_or_with_other_jobs_are_refused(tmp_path, capfd):
    for argv, expected in (
            (["-c", "mnist_gauss_1.yaml", "--images", str(tmp_path)],
             "--images works on a saved run: add -ts RUN"),
            (["-c", "mnist_gauss_1.yaml", "-ts", "R", "--images", str(tmp_path), "--prior"],
             "--images evaluates and encodes pictures; --report, --prior and --sample"),
            (["-c", "mnist_gauss_1.yaml", "-ts", "R", "--images", str(tmp_path), "--encode",
              "test"], "--encode test encodes a split of the run's dataset; with --images"),
            (["-c", "mnist_gauss_1.yaml", "-ts", "R", "--encode", "images"],
             "--encode images encodes the pictures of --images DIR: add it")):
        assert main.run(argv) == 2
        assert expected in capfd.readouterr().err


# ----------------------------------------------------------------------------- one module

PRODUCT = ("main.py", "configs", "data", "networks", "trainer", "util", "third_party",
           "benchmarks")


def product_files():
    for top in PRODUCT:
        path = os.path.join(REPO, top)
        if os.path.isfile(path):
            yield top
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith((".py", ".yaml", ".yml", ".json", ".sh")):
                    yield os.path.relpath(os.path.join(folder, name), REPO)


def files_naming(pattern):
    found = set()
    for rel in product_files():
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            if re.search(pattern, f.read()):
                found.add(rel.replace(os.sep, "/"))
    return found


def test_the_image_folder_dataset_is_named_only_in_its_module_the_registry_and_its_files():
    assert files_naming(r"ImageFolder|image_folder") == {
        "data/sources/image_folder.py", "configs/registry.py", "configs/images_gauss_1.yaml",
        "configs/images_vqvae.yaml"}


@pytest.mark.parametrize("module, pattern", [
    ("mnist.py", r"\bMNIST\b"), ("cifar10.py", r"CIFAR"), ("celeba.py", r"CelebA\b"),
    ("celebamask_hq.py", r"CelebAMask")])
def test_each_dataset_is_named_in_data_only_by_its_module(module, pattern):
    """data/ names a dataset only in its module (Fashion-MNIST's reuses MNIST's reader); the
    CelebAMask-HQ preparation command is that dataset's own too."""
    in_data = {f for f in files_naming(pattern) if f.startswith("data/")}
    allowed = {f"data/sources/{module}", "data/sources/fashion_mnist.py",
               "data/prepare_celebamask_hq.py"}
    assert in_data <= allowed and f"data/sources/{module}" in in_data
