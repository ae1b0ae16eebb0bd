"""data/: splits, transforms, epoch order, resuming, sharding and file errors.

Every dataset except the real MNIST/FashionMNIST in /work/shared/data is written
into tmp_path by tests/fixtures.py; downloads are disabled throughout.
"""
import os
import pickle
import re
import socket

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

import configs
import data
from data import sources
from tests import fixtures

REAL_DATA = "/work/shared/data"


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    monkeypatch.setenv("SQVAE_NO_DOWNLOAD", "1")


def make_cfg(experiment, root, nworker=0, cache=None):
    """A config for `root`; worker processes only exist on the decoding path, so asking for
    them turns the decoded cache off unless `cache` says otherwise."""
    cache = nworker == 0 if cache is None else cache
    return configs.load_config(experiment, ["path_dataset", str(root), "nworker", str(nworker),
                                            "cache_decoded", str(cache)])


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


def test_registry_matches_config_names():
    assert set(data.DATASETS) == set(configs.DATASETS)


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
    assert [data.dataset_size(cfg, s) for s in data.SPLITS] == [55, 11, 20]
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
    assert [data.dataset_size(cfg, s) for s in data.SPLITS] == [48, 12, 7]
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
    n = data.dataset_size(cfg, split)  # 55 train / 11 val: odd
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
        padded = full_order + full_order[:shard.num_padded]
        assert ids == padded[rank::2]
        seen += ids
    assert shards[0].num_padded == (1 if shuffle else 0)
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


def test_parsed_arrays_are_read_once_per_process(mnist_root, monkeypatch):
    root, _ = mnist_root
    calls = []
    real_read = sources.read_idx
    monkeypatch.setattr(sources, "read_idx", lambda path, ndim: calls.append(path) or
                        real_read(path, ndim))
    sources.clear_cache()
    cfg = make_cfg("mnist_gauss_1", root)
    train = data.build_loader(cfg, "train", batch_size=8, shuffle=True)
    val = data.build_loader(cfg, "val", batch_size=8, shuffle=False)
    data.build_loader(cfg, "test", batch_size=8, shuffle=False)
    assert len(calls) == 4  # four idx files, each parsed once
    # One uint8 tensor per split, gathered by index.
    assert train.images.dtype == torch.uint8 and train.images.shape == (55, 1, 28, 28)
    assert val.images.shape == (11, 1, 28, 28)


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_real_mnist_splits_are_50000_10000_10000(name):
    cfg = make_cfg({"MNIST": "mnist_gauss_1", "FashionMNIST": "fashion-mnist_gauss_1"}[name],
                   REAL_DATA)
    assert [data.dataset_size(cfg, s) for s in data.SPLITS] == [50_000, 10_000, 10_000]
    raw = os.path.join(REAL_DATA, name, "raw")
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
    assert [data.dataset_size(cfg, s) for s in data.SPLITS] == [5, 3, 2]
    reference = T.Compose([T.CenterCrop(140), T.Resize(64), T.ToTensor()])
    for split in ("val", "test"):
        x, y = cat(batches(data.build_loader(cfg, split, batch_size=2, shuffle=False)))
        assert x.dtype == torch.float32 and x.shape == (len(written[split]), 3, 64, 64)
        assert y.dtype == torch.int64 and not y.any()
        expected = torch.stack([reference(Image.open(p)) for p in written[split]])
        assert torch.equal(x, expected)
    path = written["train"][0]
    decoded = data.decode_celeba(path)
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
    assert [data.dataset_size(cfg, s) for s in data.SPLITS] == [12, 3, 2]
    for split in data.SPLITS:
        x, y = cat(batches(data.build_loader(cfg, split, batch_size=5, shuffle=False)))
        expected = np.stack([np.asarray(Image.open(p).resize((64, 64), Image.NEAREST))
                             for p in written[split]])[:, None]
        assert x.dtype == torch.int64 and x.shape == (len(written[split]), 1, 64, 64)
        assert torch.equal(x, torch.from_numpy(expected.astype(np.int64)))  # numeric file order
        assert 0 <= x.min() and x.max() <= 18 and len(x.unique()) == 19
        assert y.dtype == torch.int64 and not y.any()
    decoded = data.decode_celebamask_label(written["train"][10])
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
    ("mnist_gauss_1", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("fashion-mnist_gauss_1", "FashionMNIST/raw", ["train-labels-idx1-ubyte"]),
    ("cifar10_gauss_1", "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch"]),
    ("celeba_gauss_1", "celeba", ["img_align_celeba", "list_eval_partition.txt"]),
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
    assert os.path.join(str(tmp_path), folder) in message
    for name in names:
        assert name in message
    with pytest.raises(data.DatasetError):
        data.dataset_size(cfg, "test")


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


def test_truncated_or_corrupt_mnist_idx_names_the_file(mnist_root):
    root, w = mnist_root
    cfg = make_cfg("mnist_gauss_1", root)
    path = w["paths"]["train-images-idx3-ubyte"]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    expected = re.escape(path) + f" is truncated.*needs {size} bytes, the file has {size - 100}"
    with pytest.raises(data.DatasetError, match=expected):
        data.build_loader(cfg, "train", batch_size=4, shuffle=True)
    with open(path, "r+b") as f:
        f.write(b"\x00\x00\x09\x03")
    with pytest.raises(data.DatasetError, match=re.escape(path) + " is not an idx3-ubyte file"):
        data.build_loader(cfg, "train", batch_size=4, shuffle=True)


def test_truncated_gz_idx_names_the_file(tmp_path):
    w = fixtures.write_mnist(tmp_path, n_train=12, n_test=6, gz=True)
    path = w["paths"]["t10k-images-idx3-ubyte"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(data.DatasetError, match="cannot decompress " + re.escape(path)):
        data.build_loader(make_cfg("mnist_gauss_1", tmp_path), "test", batch_size=4,
                          shuffle=False)


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
