"""data.cache: the decoded CelebA/CelebAMask-HQ cache and the loader that reads it.

The reference throughout is the decoding path (``cache_decoded False``): the cached
path must give bitwise the same batches, in the same order, for every split.
"""
import json
import multiprocessing
import os
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import configs
import data
from data import cache
from data.sources.celeba import decode_celeba
from tests import fixtures


EXPERIMENT = {"CelebA": "celeba_gauss_1", "CelebAMask_HQ": "celebamask_vmf"}
STEM = {"CelebA": "celeba", "CelebAMask_HQ": "celebamask"}


def make_cfg(name, root, cached):
    return configs.load_config(EXPERIMENT[name], ["path_dataset", str(root), "nworker", "0",
                                                  "cache_decoded", str(cached)])


def write(name, root, n_train=10, n_val=3, n_test=2):
    if name == "CelebA":
        return fixtures.write_celeba(root, n_train, n_val, n_test, seed=11)
    # 128x128 maps keep the 64x64 nearest resize in play at a fraction of 512's cost.
    return fixtures.write_celebamask(root, n_train, n_val, n_test, size=128, seed=12)


def npy(root, name, split):
    return os.path.join(str(root), "cache", f"{STEM[name]}_{split}_64.npy")


def loader(name, root, split, cached, **kw):
    kw.setdefault("shuffle", split == "train")
    return data.build_loader(make_cfg(name, root, cached), split, batch_size=2, seed=5, **kw)


def epoch(ld, start=0, at=3):
    ld.set_epoch(at)
    return list(ld.iter_from(start))


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def leftovers(root):
    folder = os.path.join(str(root), "cache")
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


@pytest.mark.parametrize("name", ["CelebA", "CelebAMask_HQ"])
def test_cached_batches_equal_decoded_batches(tmp_path, name):
    write(name, tmp_path)
    for split in data.SPLITS:
        decoded = loader(name, tmp_path, split, cached=False)
        assert type(decoded) is data.FileLoader
        reference = epoch(decoded)
        assert not os.path.exists(npy(tmp_path, name, split))  # decoding writes no cache
        cached = loader(name, tmp_path, split, cached=True)
        assert_same(epoch(cached), reference)
        assert isinstance(cached.array, np.memmap) and cached.array.filename == npy(
            tmp_path, name, split)
        for k in range(1, len(cached)):
            assert_same(epoch(cached, k), reference[k:])
        assert epoch(cached, len(cached)) == []
    # Another epoch, a rank of two with drop_last: order, striding and padding agree too.
    kw = dict(rank=1, world_size=2, drop_last=True)
    for at in (0, 7):
        a = epoch(loader(name, tmp_path, "train", cached=False, **kw), at=at)
        b = epoch(loader(name, tmp_path, "train", cached=True, **kw), at=at)
        assert_same(a, b)
    x, y = b[0]
    assert x.dtype == (torch.float32 if name == "CelebA" else torch.int64)
    assert y.dtype == torch.int64 and not y.any()


def test_cache_is_built_once_then_reused(tmp_path, monkeypatch, capsys):
    write("CelebA", tmp_path)
    first = epoch(loader("CelebA", tmp_path, "train", cached=True))
    path = npy(tmp_path, "CelebA", "train")
    before = identity(path)
    with open(os.path.splitext(path)[0] + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["shape"] == [10, 3, 64, 64]
    assert sidecar["decode"]["function"] == "data.sources.celeba.decode_celeba"
    assert sidecar["decode"]["params"]["crop"] == 140

    def no_rebuild(*args, **kw):
        raise AssertionError("an up-to-date cache was rebuilt")

    monkeypatch.setattr(cache, "_build", no_rebuild)
    again = loader("CelebA", tmp_path, "train", cached=True)
    assert_same(epoch(again), first)
    assert identity(path) == before and leftovers(tmp_path) == []
    # stderr is not a terminal here, so the build printed no progress bar.
    assert capsys.readouterr().err == ""


def test_changed_sources_or_decoding_rebuild_the_cache(tmp_path, monkeypatch):
    written = write("CelebAMask_HQ", tmp_path)
    path = npy(tmp_path, "CelebAMask_HQ", "train")

    def check(n):
        cached = loader("CelebAMask_HQ", tmp_path, "train", cached=True)
        assert_same(epoch(cached), epoch(loader("CelebAMask_HQ", tmp_path, "train",
                                                cached=False)))
        assert cached.dataset_size == n
        return identity(path)

    built = check(10)
    label_dir = os.path.dirname(written["train"][0])
    Image.fromarray(np.full((128, 128), 18, np.uint8)).save(os.path.join(label_dir, "10.png"))
    added = check(11)
    assert added != built
    target = written["train"][4]
    st = os.stat(target)
    Image.fromarray(np.full((128, 128), 3, np.uint8)).save(target)
    # Filesystem clocks tick coarsely; a later mtime makes "modified" certain.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    modified = check(11)
    assert modified != added
    # Same bytes, new mtime: the cache cannot know the content is unchanged, so it rebuilds.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    touched = check(11)
    assert touched != modified
    os.remove(written["train"][0])
    removed = check(10)
    assert removed != touched
    # Another Pillow may decode or resize differently: the decoding is part of the key.
    monkeypatch.setattr(cache.PIL, "__version__", "0.0.0")
    assert check(10) != removed


def test_added_celeba_image_rebuilds_the_cache(tmp_path):
    written = write("CelebA", tmp_path, n_train=4, n_val=2, n_test=1)
    epoch(loader("CelebA", tmp_path, "test", cached=True))
    before = identity(npy(tmp_path, "CelebA", "test"))
    new = os.path.join(os.path.dirname(written["test"][0]), "000008.jpg")
    Image.open(written["train"][0]).save(new, quality=90)
    with open(tmp_path / "celeba" / "list_eval_partition.txt", "a") as f:
        f.write("000008.jpg 2\n")
    cached = loader("CelebA", tmp_path, "test", cached=True)
    assert_same(epoch(cached), epoch(loader("CelebA", tmp_path, "test", cached=False)))
    assert cached.dataset_size == 2 and identity(npy(tmp_path, "CelebA", "test")) != before


def _killed_build(root):
    # Runs in a forked child: kill the process outright in the middle of its build.
    cache.CHUNK = 2
    calls = []
    real = cache._decode_many

    def decode_then_die(decode, paths):
        calls.append(paths)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(decode, paths)

    cache._decode_many = decode_then_die
    epoch(loader("CelebA", root, "train", cached=True))


def test_killed_build_leaves_no_cache_and_its_leftovers_are_cleaned(tmp_path):
    write("CelebA", tmp_path)
    child = multiprocessing.get_context("fork").Process(target=_killed_build, args=(tmp_path,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    path = npy(tmp_path, "CelebA", "train")
    assert leftovers(tmp_path) == [f"celeba_train_64.npy.{child.pid}.tmp"]
    assert not os.path.exists(path) and not os.path.exists(os.path.splitext(path)[0] + ".json")
    cached = loader("CelebA", tmp_path, "train", cached=True)
    assert_same(epoch(cached), epoch(loader("CelebA", tmp_path, "train", cached=False)))
    assert os.path.exists(path) and leftovers(tmp_path) == []


def test_failed_build_leaves_nothing_behind(tmp_path):
    written = write("CelebA", tmp_path)
    bad = written["val"][1]
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 3)
    cached = loader("CelebA", tmp_path, "val", cached=True)
    with pytest.raises(data.DatasetError, match="cannot read CelebA image " + re.escape(bad)):
        epoch(cached)
    assert leftovers(tmp_path) == [] and not os.path.exists(npy(tmp_path, "CelebA", "val"))


def test_parallel_build_equals_decoding_each_file(tmp_path, monkeypatch):
    written = write("CelebA", tmp_path)
    pools = []
    real_context = cache.pool_context
    monkeypatch.setattr(cache, "pool_context", lambda: pools.append(1) or real_context())
    monkeypatch.setattr(cache, "MIN_PARALLEL", 1)
    monkeypatch.setattr(cache, "CHUNK", 3)  # 10 files: four chunks, the last one short
    monkeypatch.setattr(cache, "build_workers", lambda: 2)
    cached = loader("CelebA", tmp_path, "train", cached=True, shuffle=False)
    x = torch.cat([x for x, _ in epoch(cached)])
    assert pools == [1]
    expected = np.stack([decode_celeba(p) for p in written["train"]])
    assert np.array_equal(np.asarray(cached.array), expected)
    assert torch.equal(x, torch.from_numpy(expected).float().div(255))


def test_unwritable_cache_folder_falls_back_to_decoding(tmp_path, capsys):
    write("CelebAMask_HQ", tmp_path)
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    cached = loader("CelebAMask_HQ", tmp_path, "train", cached=True)
    reference = epoch(loader("CelebAMask_HQ", tmp_path, "train", cached=False))
    assert_same(epoch(cached), reference)
    assert_same(epoch(cached, 1), reference[1:])  # warned once per loader, not per pass
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: cannot write the decoded cache")
    assert "decoding the CelebAMask_HQ train files every epoch instead" in err
    assert cached.array is None and (tmp_path / "cache").is_file()
