"""data/: splits, transforms, epoch order, resuming, sharding and file errors.

Every dataset is written into tmp_path by tests/fixtures.py, except the shipped MNIST and
Fashion-MNIST subsets (conftest.small_data) and the full datasets of the full-data tier
(conftest.full_data). Downloads are disabled, except where a test makes the network fail.
"""
import gzip
import os
import pickle
import re
import socket
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

import configs
import data
from data import sources
from data.sources import mnist
from data.sources.celeba import decode_celeba
from data.sources.celebamask_hq import decode_celebamask_label
from tests import fixtures
from tests.conftest import SMALL_DATA


def make_cfg(experiment, root, nworker=0, cache=None):
    """A config for `root`; worker processes only exist on the decoding path, so asking for
    them turns the decoded cache off unless `cache` says otherwise."""
    cache = nworker == 0 if cache is None else cache
    return configs.load_config(experiment, ["path_dataset", str(root), "nworker", str(nworker),
                                            "cache_decoded", str(cache)])


def dataset_size(cfg, split):
    """Samples in a split, all ranks together."""
    return data.build_loader(cfg, split, batch_size=1, shuffle=False).dataset_size


def batches(loader, start=0):
    return list(loader.iter_from(start))


def cat(batch_list):
    return (torch.cat([x for x, _ in batch_list]), torch.cat([y for _, y in batch_list]))


def row_ids(x, reference):
    """Row index in ``reference`` (N x ...) of every sample of ``x``; samples are unique."""
    lookup = {r.tobytes(): i for i, r in enumerate(np.ascontiguousarray(reference))}
    return [lookup[r.tobytes()] for r in np.ascontiguousarray(x.numpy())]


def as_uint8(x):
    return (x * 255).round().to(torch.uint8)


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


@pytest.fixture
def mnist_root(tmp_path):
    written = fixtures.write_mnist(tmp_path, n_train=66, n_test=20, seed=1)  # 55 / 11 / 20
    return tmp_path, written


@pytest.fixture
def celebamask_root(tmp_path):
    # 12 training maps, so numeric order (9.png before 10.png) is exercised.
    return tmp_path, fixtures.write_celebamask(tmp_path, 12, 3, 2, seed=2)


def test_split_sizes_real_and_tiny():
    assert data.split_sizes("MNIST", 60_000) == (50_000, 10_000)
    assert data.split_sizes("FashionMNIST", 60_000) == (50_000, 10_000)
    assert data.split_sizes("CIFAR10", 50_000) == (40_000, 10_000)
    assert data.split_sizes("MNIST", 20_000) == (10_000, 10_000)
    assert data.split_sizes("MNIST", 60) == (50, 10)
    assert data.split_sizes("MNIST", 19_998) == (16_665, 3_333)
    assert data.split_sizes("CIFAR10", 50) == (40, 10)
    assert data.split_sizes("CIFAR10", 2) == (1, 1)
    with pytest.raises(data.DatasetError):
        data.split_sizes("MNIST", 1)
    with pytest.raises(ValueError):
        data.split_sizes("CelebA", 1000)


@pytest.mark.parametrize("name,experiment,gz", [
    ("MNIST", "mnist_gauss_1", False), ("MNIST", "mnist_gauss_1", True),
    ("FashionMNIST", "fashion-mnist_gauss_1", False)])
def test_mnist_like_splits_values_and_file_order(tmp_path, name, experiment, gz):
    w = fixtures.write_mnist(tmp_path, name=name, n_train=66, n_test=20, seed=3, gz=gz)
    cfg = make_cfg(experiment, tmp_path)
    assert [dataset_size(cfg, s) for s in data.SPLITS] == [55, 11, 20]
    expected = {"train": slice(0, 55), "val": slice(55, 66)}
    for split in data.SPLITS:
        loader = data.build_loader(cfg, split, batch_size=8, shuffle=False)
        got = batches(loader)
        assert len(loader) == len(got) == -(-loader.num_samples // 8)
        assert all(x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 for x, _ in got)
        assert all(y.dtype == torch.int64 for _, y in got)
        x, y = cat(got)
        if split == "test":
            images, labels = w["test_images"], w["test_labels"]
        else:
            images = w["train_images"][expected[split]]
            labels = w["train_labels"][expected[split]]
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert torch.equal(x, torch.from_numpy(images).float().div(255)[:, None])
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_cifar10_splits_and_channel_layout(tmp_path):
    w = fixtures.write_cifar10(tmp_path, n_per_batch=12, n_test=7, seed=4)  # 48 / 12 / 7
    cfg = make_cfg("cifar10_gauss_1", tmp_path)
    assert [dataset_size(cfg, s) for s in data.SPLITS] == [48, 12, 7]
    val_x, val_y = cat(batches(data.build_loader(cfg, "val", batch_size=5, shuffle=False)))
    assert val_x.shape == (12, 3, 32, 32) and val_x.dtype == torch.float32
    # Val = the last 12 of the concatenated batches, i.e. all of data_batch_5 here.
    with open(w["paths"]["data_batch_5"], "rb") as f:
        last = pickle.load(f, encoding="bytes")
    row = last[b"data"][3]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major.
    for c, h, wd in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert as_uint8(val_x[3, c, h, wd]) == row[c * 1024 + h * 32 + wd]
    assert val_y[3].item() == last[b"labels"][3]
    assert torch.equal(val_x, torch.from_numpy(w["train_images"][48:]).float().div(255))
    test_x, test_y = cat(batches(data.build_loader(cfg, "test", batch_size=5, shuffle=False)))
    assert torch.equal(test_x, torch.from_numpy(w["test_images"]).float().div(255))
    assert torch.equal(test_y, torch.from_numpy(w["test_labels"]))
    assert set(test_y.tolist()) <= set(range(10))


def test_train_order_is_a_pure_function_of_seed_and_epoch(mnist_root):
    root, w = mnist_root
    cfg = make_cfg("mnist_gauss_1", root)
    reference = w["train_images"][:55][:, None]
    a = data.build_loader(cfg, "train", batch_size=8, shuffle=True, seed=3)
    b = data.build_loader(cfg, "train", batch_size=8, shuffle=True, seed=3)
    other_seed = data.build_loader(cfg, "train", batch_size=8, shuffle=True, seed=4)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        order = row_ids(as_uint8(cat(batches(a))[0]), reference)
        assert sorted(order) == list(range(55))  # every training sample once per epoch
        gen = torch.Generator().manual_seed(3 * 1_000_003 + epoch)
        assert order == torch.randperm(55, generator=gen).tolist()
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    a.set_epoch(1)
    b.set_epoch(1)
    other_seed.set_epoch(1)
    assert same_batches(batches(a), batches(b))
    assert not same_batches(batches(a), batches(other_seed))


def test_val_and_test_never_shuffle(mnist_root):
    root, _ = mnist_root
    cfg = make_cfg("mnist_gauss_1", root)
    loader = data.build_loader(cfg, "val", batch_size=4, shuffle=False)
    first = batches(loader)
    loader.set_epoch(5)
    assert same_batches(first, batches(loader))
    with pytest.raises(ValueError, match="shuffle=False"):
        data.build_loader(cfg, "test", batch_size=4, shuffle=True)


def test_iter_from_resumes_in_memory_and_file_loaders(mnist_root, tmp_path):
    root, _ = mnist_root
    fixtures.write_celebamask(tmp_path, 9, 2, 2, size=64, seed=5)
    loaders = [
        data.build_loader(make_cfg("mnist_gauss_1", root), "train", batch_size=8,
                          shuffle=True, seed=7),
        data.build_loader(make_cfg("celebamask_vmf", tmp_path, cache=False), "train",
                          batch_size=2, shuffle=True, seed=7),
    ]
    for loader in loaders:
        loader.set_epoch(2)
        full = batches(loader)
        assert len(full) == len(loader)
        for k in (0, 1, 3, len(loader) - 1, len(loader)):
            assert same_batches(batches(loader, k), full[k:])
        with pytest.raises(ValueError):
            loader.iter_from(len(loader) + 1)


@pytest.mark.parametrize("split,shuffle", [("train", True), ("val", False)])
def test_rank_strided_sharding_covers_each_sample_once(mnist_root, split, shuffle):
    root, w = mnist_root
    cfg = make_cfg("mnist_gauss_1", root)
    n = dataset_size(cfg, split)  # 55 train / 11 val: odd
    reference = (w["train_images"][:55] if split == "train" else w["train_images"][55:])[:, None]
    single = data.build_loader(cfg, split, batch_size=3, shuffle=shuffle, seed=9)
    single.set_epoch(4)
    full_order = row_ids(as_uint8(cat(batches(single))[0]), reference)
    seen = []
    shards = [data.build_loader(cfg, split, batch_size=3, shuffle=shuffle, seed=9, rank=r,
                                world_size=2) for r in range(2)]
    for rank, shard in enumerate(shards):
        shard.set_epoch(4)
        got = batches(shard)
        # Training shards are padded to equal size (DDP needs equal step counts);
        # evaluation shards are not, so every sample is counted exactly once.
        assert shard.num_samples == ((n + 1) // 2 if shuffle else len(range(rank, n, 2)))
        assert len(shard) == len(got) == -(-shard.num_samples // 3)
        ids = row_ids(as_uint8(cat(got)[0]), reference)
        # Rank r takes positions r, r + 2, ... of the single-process order (padded from its
        # start when training).
        pad = shard.num_samples * 2 - n if shuffle else 0
        padded = full_order + full_order[:pad]
        assert ids == padded[rank::2]
        seen += ids
    assert pad == (1 if shuffle else 0)
    assert sorted(set(seen)) == list(range(n)) and len(seen) == n + (1 if shuffle else 0)


def test_sharding_file_loader_and_drop_last(celebamask_root):
    root, written = celebamask_root
    cfg = make_cfg("celebamask_vmf", root)
    reference = np.stack([np.asarray(Image.open(p).resize((64, 64), Image.NEAREST))[None]
                          for p in written["train"]]).astype(np.int64)
    seen = []
    for rank in range(2):
        shard = data.build_loader(cfg, "train", batch_size=4, shuffle=True, seed=1, rank=rank,
                                  world_size=2, drop_last=True)
        assert shard.num_samples == 6 and len(shard) == 1
        got = batches(shard)
        assert len(got) == 1 and got[0][0].shape == (4, 1, 64, 64)
        seen += row_ids(cat(got)[0], reference)
    assert len(set(seen)) == 8  # 2 ranks x 1 full batch, disjoint


def test_parsed_arrays_are_read_once_per_config(mnist_root, monkeypatch):
    root, w = mnist_root
    parsed = []
    real_read = torchvision.datasets.mnist.read_image_file

    def counting_read(path):
        parsed.append(os.path.basename(path))
        return real_read(path)

    monkeypatch.setattr(torchvision.datasets.mnist, "read_image_file", counting_read)
    cfg = make_cfg("mnist_gauss_1", root)
    train = data.build_loader(cfg, "train", batch_size=8, shuffle=True)
    val = data.build_loader(cfg, "val", batch_size=8, shuffle=False)
    data.build_loader(cfg, "test", batch_size=8, shuffle=False)
    # The training and the test images, each parsed once for the loaders of one config.
    assert parsed == ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]
    # One uint8 tensor per split, gathered by index.
    assert train.images.dtype == torch.uint8 and train.images.shape == (55, 1, 28, 28)
    assert val.images.shape == (11, 1, 28, 28)
    # A file replaced on disk is read afresh.
    new = fixtures.write_mnist(root, n_train=66, n_test=20, seed=2)
    again = data.build_loader(cfg, "train", batch_size=8, shuffle=False)
    assert len(parsed) == 4
    # Another config (another command) reads the files afresh.
    data.build_loader(make_cfg("mnist_gauss_1", root), "test", batch_size=8, shuffle=False)
    assert len(parsed) == 6
    assert torch.equal(again.images[:, 0], torch.from_numpy(new["train_images"][:55]))


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_real_mnist_splits_are_50000_10000_10000(name, full_data):
    cfg = make_cfg({"MNIST": "mnist_gauss_1", "FashionMNIST": "fashion-mnist_gauss_1"}[name],
                   full_data)
    assert [dataset_size(cfg, s) for s in data.SPLITS] == [50_000, 10_000, 10_000]
    raw = os.path.join(full_data, name, "raw")
    images = np.fromfile(os.path.join(raw, "train-images-idx3-ubyte"), dtype=np.uint8)[16:]
    labels = np.fromfile(os.path.join(raw, "train-labels-idx1-ubyte"), dtype=np.uint8)[8:]
    test_images = np.fromfile(os.path.join(raw, "t10k-images-idx3-ubyte"), dtype=np.uint8)[16:]
    images, test_images = images.reshape(-1, 28, 28), test_images.reshape(-1, 28, 28)

    val = data.build_loader(cfg, "val", batch_size=2500, shuffle=False)
    assert len(val) == 4
    got = batches(val)
    # Val is images 50000..59999 of the file, in order.
    assert torch.equal(got[0][0][:, 0], torch.from_numpy(images[50_000:52_500]).float() / 255)
    assert torch.equal(got[-1][0][-1, 0], torch.from_numpy(images[59_999]).float() / 255)
    assert torch.equal(got[1][1], torch.from_numpy(labels[52_500:55_000].astype(np.int64)))
    train = data.build_loader(cfg, "train", batch_size=1000, shuffle=False)
    x, _ = next(iter(train.iter_from(49)))
    assert len(train) == 50 and torch.equal(x[-1, 0], torch.from_numpy(images[49_999]) / 255)
    test = data.build_loader(cfg, "test", batch_size=4000, shuffle=False)
    x, _ = batches(test)[-1]
    assert x.shape == (2000, 1, 28, 28)
    assert torch.equal(x[123, 0], torch.from_numpy(test_images[8_123]).float() / 255)


def test_celeba_partitions_and_transform_match_torchvision(tmp_path):
    written = fixtures.write_celeba(tmp_path, 5, 3, 2, seed=6)
    cfg = make_cfg("celeba_gauss_1", tmp_path)
    assert [dataset_size(cfg, s) for s in data.SPLITS] == [5, 3, 2]
    reference = T.Compose([T.CenterCrop(140), T.Resize(64), T.ToTensor()])
    for split in ("val", "test"):
        x, y = cat(batches(data.build_loader(cfg, split, batch_size=2, shuffle=False)))
        assert x.dtype == torch.float32 and x.shape == (len(written[split]), 3, 64, 64)
        assert y.dtype == torch.int64 and not y.any()
        expected = torch.stack([reference(Image.open(p)) for p in written[split]])
        assert torch.equal(x, expected)
    path = written["train"][0]
    decoded = decode_celeba(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 64, 64)
    assert torch.equal(torch.from_numpy(decoded).float() / 255, reference(Image.open(path)))
    train = data.build_loader(cfg, "train", batch_size=2, shuffle=True, seed=1)
    x, _ = cat(batches(train))
    expected = torch.stack([reference(Image.open(p)) for p in written["train"]])
    order = torch.randperm(5, generator=torch.Generator().manual_seed(1_000_003)).tolist()
    assert torch.equal(x, expected[order])
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_celebamask_labels_equal_pil_nearest_resize(celebamask_root):
    root, written = celebamask_root
    cfg = make_cfg("celebamask_vmf", root, nworker=1)  # one worker process: the DataLoader path
    assert [dataset_size(cfg, s) for s in data.SPLITS] == [12, 3, 2]
    for split in data.SPLITS:
        x, y = cat(batches(data.build_loader(cfg, split, batch_size=5, shuffle=False)))
        expected = np.stack([np.asarray(Image.open(p).resize((64, 64), Image.NEAREST))
                             for p in written[split]])[:, None]
        assert x.dtype == torch.int64 and x.shape == (len(written[split]), 1, 64, 64)
        assert torch.equal(x, torch.from_numpy(expected.astype(np.int64)))  # numeric file order
        assert 0 <= x.min() and x.max() <= 18 and len(x.unique()) == 19
        assert y.dtype == torch.int64 and not y.any()
    decoded = decode_celebamask_label(written["train"][10])
    assert decoded.dtype == np.uint8 and decoded.shape == (1, 64, 64)


def test_celebamask_prefers_complete_label_64_folders(tmp_path):
    written = fixtures.write_celebamask(tmp_path, 3, 2, 2, seed=8, label_64=True)
    folder = tmp_path / "CelebAMask-HQ"
    cfg = make_cfg("celebamask_vmf", tmp_path)
    # Mark the prepared maps so reading them is distinguishable from resizing.
    for i in range(2):
        Image.fromarray(np.full((64, 64), 7, np.uint8)).save(folder / "val_label_64" / f"{i}.png")
    x, _ = cat(batches(data.build_loader(cfg, "val", batch_size=2, shuffle=False)))
    assert (x == 7).all()
    # An incomplete prepared folder is ignored: back to resizing the 512x512 maps.
    os.remove(folder / "test_label_64" / "1.png")
    x, _ = cat(batches(data.build_loader(cfg, "test", batch_size=2, shuffle=False)))
    expected = np.stack([np.asarray(Image.open(p).resize((64, 64), Image.NEAREST))
                         for p in written["test"]])[:, None]
    assert torch.equal(x, torch.from_numpy(expected.astype(np.int64)))


@pytest.mark.parametrize("experiment,folder,names", [
    ("mnist_gauss_1", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                    "MNIST/MNIST/raw/, the authors' layout"]),
    ("fashion-mnist_gauss_1", "FashionMNIST/raw", [
        "train-labels-idx1-ubyte", "FashionMNIST/FashionMNIST/raw/, the authors' layout"]),
    ("cifar10_gauss_1", "cifar-10-batches-py", [
        "data_batch_1", "data_batch_5", "test_batch",
        "CIFAR10/cifar-10-batches-py/, the authors' layout"]),
    ("celeba_gauss_1", "celeba", ["img_align_celeba", "list_eval_partition.txt",
                                  "CelebA/celeba/, the authors' layout"]),
    ("celebamask_vmf", "CelebAMask-HQ", ["train_label", "val_label", "test_label",
                                         "python -m data.prepare_celebamask_hq --src"]),
])
def test_missing_dataset_error_is_one_line_naming_folder_and_files(tmp_path, experiment,
                                                                    folder, names):
    cfg = make_cfg(experiment, tmp_path)
    with pytest.raises(data.DatasetError) as err:
        data.build_loader(cfg, "train", batch_size=4, shuffle=True)
    message = str(err.value)
    assert "\n" not in message
    ours = message.index(os.path.join(str(tmp_path), *folder.split("/")) + os.sep)
    for name in names:
        assert name.replace("/", os.sep) in message
    if "the authors' layout" in message:
        # Ours is the folder to fill; the authors' is mentioned as accepted too.
        assert ours < message.index("the authors' layout")
        assert message.endswith("download skipped: SQVAE_NO_DOWNLOAD=1)")
    with pytest.raises(data.DatasetError):
        dataset_size(cfg, "test")


def test_missing_file_error_lists_only_what_is_missing(mnist_root):
    root, w = mnist_root
    os.remove(w["paths"]["t10k-labels-idx1-ubyte"])
    with pytest.raises(data.DatasetError, match=r"put t10k-labels-idx1-ubyte \(or"):
        data.build_loader(make_cfg("mnist_gauss_1", root), "test", batch_size=4, shuffle=False)


def test_download_is_tried_with_a_timeout_unless_disabled(tmp_path, monkeypatch):
    calls = []

    def offline_mnist(root, train=True, download=False, **kw):
        calls.append((root, download, socket.getdefaulttimeout()))
        raise OSError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline_mnist)
    cfg = make_cfg("mnist_gauss_1", tmp_path)
    with pytest.raises(data.DatasetError, match="SQVAE_NO_DOWNLOAD=1"):
        data.build_loader(cfg, "train", batch_size=4, shuffle=True)
    assert calls == []

    monkeypatch.delenv("SQVAE_NO_DOWNLOAD")
    before = socket.getdefaulttimeout()
    with pytest.raises(data.DatasetError, match="download failed: OSError: no route to host"):
        data.build_loader(cfg, "train", batch_size=4, shuffle=True)
    assert calls == [(str(tmp_path), True, sources.DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _overwrite(path, offset, payload):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)


@pytest.mark.parametrize("name,damage", [
    ("train-images-idx3-ubyte", lambda p: _truncate(p, os.path.getsize(p) - 100)),
    ("train-labels-idx1-ubyte", lambda p: _truncate(p, os.path.getsize(p) - 1)),
    ("t10k-images-idx3-ubyte", lambda p: _truncate(p, 3)),  # shorter than the header
    ("t10k-labels-idx1-ubyte", lambda p: _truncate(p, 0)),
    ("train-images-idx3-ubyte", lambda p: _overwrite(p, 0, b"\x00\x00\x09\x03")),  # int8
    ("train-images-idx3-ubyte", lambda p: _overwrite(p, 0, b"\xff\xff\xff\xff")),
    ("t10k-labels-idx1-ubyte", lambda p: _overwrite(p, os.path.getsize(p), b"extra")),
])
def test_truncated_or_corrupt_mnist_file_is_one_line_naming_it(mnist_root, name, damage):
    root, w = mnist_root
    path = w["paths"][name]
    damage(path)
    split = "train" if name.startswith("train") else "test"
    with pytest.raises(data.DatasetError) as err:
        data.build_loader(make_cfg("mnist_gauss_1", root), split, batch_size=4, shuffle=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(path + " is truncated or corrupt (")
    assert message.endswith("download it again")
    others = [p for p in w["paths"].values() if p != path]
    assert not any(p in message for p in others)  # the damaged file, not its partner


def test_truncated_gz_idx_names_the_file(tmp_path):
    w = fixtures.write_mnist(tmp_path, n_train=12, n_test=6, gz=True)
    path = w["paths"]["t10k-images-idx3-ubyte"]
    _truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(data.DatasetError, match="^cannot decompress " + re.escape(path) +
                       ".*download it again") as err:
        data.build_loader(make_cfg("mnist_gauss_1", tmp_path), "test", batch_size=4,
                          shuffle=False)
    assert "\n" not in str(err.value)
    # Nothing half-extracted was left beside it.
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(
        [os.path.basename(p) for p in w["paths"].values()] +
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])


def test_corrupt_extracted_file_says_it_can_be_extracted_again(tmp_path):
    w = fixtures.write_mnist(tmp_path, n_train=12, n_test=6, gz=True)
    cfg = make_cfg("mnist_gauss_1", tmp_path)
    data.build_loader(cfg, "train", batch_size=4, shuffle=False)
    extracted = w["paths"]["train-labels-idx1-ubyte"][:-len(".gz")]
    _truncate(extracted, 9)
    with pytest.raises(data.DatasetError, match=re.escape(extracted) + " is truncated.*"
                       "delete it to extract train-labels-idx1-ubyte.gz again"):
        data.build_loader(cfg, "train", batch_size=4, shuffle=False)
    os.remove(extracted)
    assert dataset_size(cfg, "train") == 10


def test_truncated_cifar_pickle_names_the_file(tmp_path):
    w = fixtures.write_cifar10(tmp_path, n_per_batch=6, n_test=4)
    path = w["paths"]["data_batch_3"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(data.DatasetError, match="cannot read CIFAR10 batch " + re.escape(path)):
        data.build_loader(make_cfg("cifar10_gauss_1", tmp_path), "val", batch_size=4,
                          shuffle=False)


def test_unreadable_image_files_fail_at_access_naming_the_file(tmp_path):
    celeba = fixtures.write_celeba(tmp_path, 2, 1, 1)
    masks = fixtures.write_celebamask(tmp_path, 2, 1, 1, size=64)
    jpeg, png = celeba["val"][0], masks["test"][0]
    with open(jpeg, "r+b") as f:
        f.truncate(os.path.getsize(jpeg) // 3)
    with open(png, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    loader = data.build_loader(make_cfg("celeba_gauss_1", tmp_path), "val", batch_size=1,
                               shuffle=False)
    with pytest.raises(data.DatasetError, match="cannot read CelebA image " + re.escape(jpeg)):
        batches(loader)
    # From a worker process too, the error comes back as its own one line.
    loader = data.build_loader(make_cfg("celebamask_vmf", tmp_path, nworker=1), "test",
                               batch_size=1, shuffle=False)
    with pytest.raises(data.DatasetError,
                       match="^cannot read CelebAMask-HQ label map " + re.escape(png)) as err:
        batches(loader)
    assert "\n" not in str(err.value)


def test_celeba_partition_listing_missing_images(tmp_path):
    written = fixtures.write_celeba(tmp_path, 2, 1, 1)
    os.remove(written["test"][0])
    with pytest.raises(data.DatasetError, match="1 of the 4 images listed .* missing.*000004.jpg"):
        data.build_loader(make_cfg("celeba_gauss_1", tmp_path), "train", batch_size=1,
                          shuffle=True)


def tree(root):
    """Every folder and file under root, relative, so two snapshots can be compared."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        found += [os.path.join(rel, d) + os.sep for d in dirs] + [os.path.join(rel, f)
                                                                 for f in files]
    return sorted(found)


def test_default_dataset_root_is_outside_the_source_packages(monkeypatch):
    monkeypatch.delenv("SQVAE_DATA", raising=False)
    # ./data would be the data/ package itself: a first download would land among its
    # source files.
    assert configs.get_defaults().path_dataset == "./datasets"


def test_gz_only_and_uncompressed_files_give_identical_arrays(tmp_path):
    gz_root, raw_root = tmp_path / "gz", tmp_path / "raw"
    written = fixtures.write_mnist(gz_root, n_train=30, n_test=8, seed=5, gz=True)
    fixtures.write_mnist(raw_root, n_train=30, n_test=8, seed=5)
    for split in data.SPLITS:
        a, b = (data.build_loader(make_cfg("mnist_gauss_1", root), split, batch_size=8,
                                  shuffle=False) for root in (gz_root, raw_root))
        assert a.dataset_size == b.dataset_size > 0
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # torchvision reads uncompressed files: each was extracted beside its .gz, byte for
    # byte, and no temporary file was left behind.
    raw = gz_root / "MNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(mnist.MNIST_FILES + tuple(
        n + ".gz" for n in mnist.MNIST_FILES))
    for name, gz_path in written["paths"].items():
        with gzip.open(gz_path) as f:
            assert (raw / name).read_bytes() == f.read()


@pytest.mark.parametrize("name,experiment,sizes", [
    ("MNIST", "mnist_gauss_1", [1_667, 333, 10_000]),
    ("FashionMNIST", "fashion-mnist_gauss_1", [834, 166, 500])])
def test_shipped_subsets_split_as_documented_and_match_their_bytes(small_data, name,
                                                                   experiment, sizes):
    cfg = make_cfg(experiment, small_data)
    assert [dataset_size(cfg, s) for s in data.SPLITS] == sizes
    shipped = os.path.join(SMALL_DATA, name, "raw")  # the originals, not the copy read

    def idx_bytes(base):
        with gzip.open(os.path.join(shipped, base + ".gz")) as f:
            return np.frombuffer(f.read(), dtype=np.uint8)

    n_train, n_val, _ = sizes
    first_in_file = {"train": 0, "val": n_train, "test": 0}
    for split in data.SPLITS:
        prefix = "t10k" if split == "test" else "train"
        images, labels = idx_bytes(f"{prefix}-images-idx3-ubyte"), idx_bytes(
            f"{prefix}-labels-idx1-ubyte")
        loader = data.build_loader(cfg, split, batch_size=500, shuffle=False)
        for i in (0, loader.dataset_size - 1):
            at = first_in_file[split] + i
            expected = images[16 + 784 * at:16 + 784 * (at + 1)].reshape(1, 28, 28)
            assert torch.equal(loader.images[i], torch.from_numpy(expected.copy()))
            assert loader.labels[i].item() == labels[8 + at]
        if split != "test":
            assert first_in_file[split] + loader.dataset_size <= n_train + n_val


WRITERS = {
    "MNIST": lambda root: fixtures.write_mnist(root, n_train=24, n_test=6, seed=11),
    "FashionMNIST": lambda root: fixtures.write_mnist(root, name="FashionMNIST", n_train=24,
                                                      n_test=6, seed=11),
    "CIFAR10": lambda root: fixtures.write_cifar10(root, n_per_batch=4, n_test=3, seed=11),
    "CelebA": lambda root: fixtures.write_celeba(root, 3, 2, 2, seed=11),
}
EXPERIMENTS = {"MNIST": "mnist_gauss_1", "FashionMNIST": "fashion-mnist_gauss_1",
               "CIFAR10": "cifar10_gauss_1", "CelebA": "celeba_gauss_1"}


def every_split(cfg):
    loaders = data.build_loaders(cfg, "cpu", 0)
    return {split: cat(batches(loader)) for split, loader in loaders.items()}


@pytest.mark.parametrize("name", list(WRITERS))
def test_authors_layout_loads_the_same_data_and_says_so_once(tmp_path, capsys, name):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    WRITERS[name](ours)
    WRITERS[name](theirs)
    folder = fixtures.move_to_authors_layout(theirs, name)
    expected = every_split(make_cfg(EXPERIMENTS[name], ours))
    got = every_split(make_cfg(EXPERIMENTS[name], theirs))
    for split in data.SPLITS:
        assert len(got[split][0]) > 0
        assert torch.equal(got[split][0], expected[split][0])
        assert torch.equal(got[split][1], expected[split][1])
    out = capsys.readouterr().out
    ours_folder = os.path.join(ours, *fixtures.AUTHORS_LAYOUT[name][0].split("/"))
    # Three loaders asked for each root; each layout is named once.
    assert out.count(f"{name}: using {folder} (the authors' layout)\n") == 1
    assert out.count(f"{name}: using {ours_folder} (this project's layout)\n") == 1
    assert len([line for line in out.splitlines() if " using " in line]) == 2
    if name == "CelebA":
        # The decoded cache sits under the dataset root whatever the layout.
        assert os.path.isfile(os.path.join(theirs, "cache", "celeba_train_64.npy"))


def test_our_layout_wins_over_the_authors(tmp_path, capsys):
    ours = fixtures.write_mnist(tmp_path, n_train=12, n_test=6, seed=1)
    fixtures.write_mnist(tmp_path / "MNIST", n_train=12, n_test=6, seed=2)  # authors' layout
    loader = data.build_loader(make_cfg("mnist_gauss_1", tmp_path), "test", batch_size=6,
                               shuffle=False)
    assert torch.equal(loader.images[:, 0], torch.from_numpy(ours["test_images"]))
    assert capsys.readouterr().out == (
        f"MNIST: using {tmp_path / 'MNIST' / 'raw'} (this project's layout)\n")


class _Payload:
    """Unpickling this runs code, which creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_cifar_batch_holding_code_is_refused_before_it_runs(tmp_path):
    w = fixtures.write_cifar10(tmp_path, n_per_batch=4, n_test=3)
    path, marker = w["paths"]["data_batch_2"], tmp_path / "marker"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"batch_label"] = _Payload(str(marker))  # official contents otherwise
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(data.DatasetError) as err:
        data.build_loader(make_cfg("cifar10_gauss_1", tmp_path), "train", batch_size=4,
                          shuffle=True)
    assert str(err.value) == (
        f"CIFAR10 batch {path} holds a pickled builtins.exec, which is refused: only numpy "
        "arrays, lists, bytes, str and int are allowed; download the official files again")
    assert not marker.exists()
    # The file is a live one: a plain unpickler (torchvision's CIFAR10 uses one) runs it.
    with open(path, "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()


def test_cifar_batches_as_numpy_1_wrote_them_load(tmp_path):
    w = fixtures.write_cifar10(tmp_path, n_per_batch=4, n_test=3, seed=12)
    for path in w["paths"].values():
        with open(path, "rb") as f:
            payload = f.read()
        # Protocol 2 names globals as text lines, so the module path can be swapped.
        with open(path, "wb") as f:
            f.write(payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 warns on importing numpy.core itself
        x, y = every_split(make_cfg("cifar10_gauss_1", tmp_path))["test"]
    assert torch.equal(as_uint8(x), torch.from_numpy(w["test_images"]))
    assert torch.equal(y, torch.from_numpy(w["test_labels"]))


@pytest.mark.parametrize("experiment,existing", [
    ("mnist_gauss_1", False), ("fashion-mnist_gauss_1", True), ("cifar10_gauss_1", False)])
def test_failed_download_leaves_the_dataset_root_as_it_was(tmp_path, monkeypatch, experiment,
                                                           existing):
    monkeypatch.delenv("SQVAE_NO_DOWNLOAD")
    lookups = []

    def no_network(host, *args, **kw):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    root = tmp_path / "datasets"
    if existing:
        (root / "empty").mkdir(parents=True)  # empty but not made by the download
        (root / "notes.txt").write_text("kept")
    before = tree(tmp_path)
    with pytest.raises(data.DatasetError, match=r"download failed: no network\)$"):
        data.build_loader(make_cfg(experiment, root), "train", batch_size=4, shuffle=True)
    assert lookups  # torchvision really tried
    assert tree(tmp_path) == before


def test_loader_argument_checks(mnist_root):
    root, _ = mnist_root
    cfg = make_cfg("mnist_gauss_1", root)
    with pytest.raises(ValueError):
        data.build_loader(cfg, "valid", batch_size=4, shuffle=False)
    with pytest.raises(ValueError):
        data.build_loader(cfg, "train", batch_size=4, shuffle=True, rank=2, world_size=2)
    with pytest.raises(ValueError):
        data.build_loader(cfg, "train", batch_size=0, shuffle=True)
    loader = data.build_loader(cfg, "train", batch_size=8, shuffle=True, drop_last=True)
    assert len(loader) == 6 and all(len(x) == 8 for x, _ in loader)


def test_shipped_test_data_stays_small():
    # A fresh clone carries this data: at most 4 MB in all, no file over 2 MB, only the
    # gzip'ed idx files. torchvision unpacks them next to themselves (tests use a copy, but
    # the README's first run, mnist_sample.yaml, reads tests/data in place): those copies
    # are ignored by git (.gitignore) and not counted.
    here = os.path.dirname(os.path.abspath(__file__))
    sizes = {}
    for folder in ("data", "release"):
        for root, _, files in os.walk(os.path.join(here, folder)):
            for name in files:
                if name.endswith("-ubyte") and name + ".gz" in files:
                    continue
                sizes[os.path.join(root, name)] = os.path.getsize(os.path.join(root, name))
    assert sum(sizes.values()) <= 4_000_000
    assert max(sizes.values()) <= 2_000_000
    assert not [p for p in sizes if p.endswith("-ubyte")]
