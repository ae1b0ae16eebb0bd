"""Tiny datasets written in each dataset's exact on-disk format, for tests.

Each ``write_*`` function writes under ``root`` (the value of cfg.path_dataset) in the
layout data/ reads, with random content fixed by ``seed``, and returns what it wrote
so tests can compare loader output against the files.
"""
import gzip
import os
import pickle
import struct

import numpy as np
from PIL import Image


def _write_idx(path, array, gz=False):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(payload)
        return path + ".gz"
    with open(path, "wb") as f:
        f.write(payload)
    return path


def write_mnist(root, name="MNIST", n_train=60, n_test=20, seed=0, gz=False):
    """``<root>/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` if gz).

    Returns a dict with train_images (N x 28 x 28 uint8), train_labels, test_images,
    test_labels and paths (file base name -> written path).
    """
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    files = {"train-images-idx3-ubyte": out["train_images"],
             "train-labels-idx1-ubyte": out["train_labels"],
             "t10k-images-idx3-ubyte": out["test_images"],
             "t10k-labels-idx1-ubyte": out["test_labels"]}
    out["paths"] = {base: _write_idx(os.path.join(raw, base), arr, gz=gz)
                    for base, arr in files.items()}
    return out


def write_cifar10(root, n_per_batch=10, n_test=10, seed=0):
    """``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` pickles.

    Same keys and types as the official release (bytes keys, uint8 N x 3072 data,
    list of int labels). Returns train_images (5*n_per_batch x 3 x 32 x 32, batches
    concatenated in order), train_labels, test_images, test_labels and paths.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    paths, train_x, train_y = {}, [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)]}
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "wb") as f:
            pickle.dump(batch, f, protocol=2)
        if name == "test_batch":
            test = (data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64))
        else:
            train_x.append(data.reshape(-1, 3, 32, 32))
            train_y.append(np.array(labels, dtype=np.int64))
    return {"train_images": np.concatenate(train_x), "train_labels": np.concatenate(train_y),
            "test_images": test[0], "test_labels": test[1], "paths": paths}


def write_celeba(root, n_train, n_val, n_test, seed=0):
    """``<root>/celeba/img_align_celeba/NNNNNN.jpg`` (178x218) + ``list_eval_partition.txt``.

    Images are numbered from 000001.jpg; partitions 0, 1, 2 follow each other as in
    the official list. Returns {'train': [paths], 'val': [...], 'test': [...]}.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "celeba")
    image_dir = os.path.join(folder, "img_align_celeba")
    os.makedirs(image_dir, exist_ok=True)
    out, lines, number = {"train": [], "val": [], "test": []}, [], 1
    for partition, (split, count) in enumerate(
            (("train", n_train), ("val", n_val), ("test", n_test))):
        for _ in range(count):
            name = f"{number:06d}.jpg"
            number += 1
            # Smooth colour fields plus noise, so crop/resize have structure to act on.
            coarse = rng.integers(0, 256, (27, 22, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((178, 218), Image.BICUBIC)
            noisy = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (218, 178, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
                os.path.join(image_dir, name), quality=90)
            lines.append(f"{name} {partition}\n")
            out[split].append(os.path.join(image_dir, name))
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.writelines(lines)
    return out


def write_celebamask(root, n_train, n_val, n_test, size=512, seed=0, with_images=False,
                     label_64=False):
    """``<root>/CelebAMask-HQ/{train,val,test}_label/<n>.png``: size x size uint8 labels 0..18.

    Numbering restarts at 0 in each split. ``with_images`` also writes
    ``{split}_img/<n>.jpg``; ``label_64`` also writes ``{split}_label_64/<n>.png``
    made with PIL nearest resizing, as the preparation tool does. Returns
    {'train': [label paths], 'val': [...], 'test': [...]}.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "CelebAMask-HQ")
    out = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        label_dir = os.path.join(folder, f"{split}_label")
        os.makedirs(label_dir, exist_ok=True)
        out[split] = []
        for i in range(count):
            # Blocky regions like face parts, plus isolated pixels so that which
            # source pixel nearest-neighbour resizing picks is visible in the output.
            blocks = rng.integers(0, 19, (16, 16), dtype=np.uint8)
            label = np.asarray(Image.fromarray(blocks).resize((size, size), Image.NEAREST)).copy()
            specks = rng.random((size, size)) < 0.05
            label[specks] = rng.integers(0, 19, int(specks.sum()), dtype=np.uint8)
            path = os.path.join(label_dir, f"{i}.png")
            Image.fromarray(label).save(path)
            out[split].append(path)
            if label_64:
                small_dir = os.path.join(folder, f"{split}_label_64")
                os.makedirs(small_dir, exist_ok=True)
                Image.fromarray(label).resize((64, 64), Image.NEAREST).save(
                    os.path.join(small_dir, f"{i}.png"))
            if with_images:
                image_dir = os.path.join(folder, f"{split}_img")
                os.makedirs(image_dir, exist_ok=True)
                rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(rgb).save(os.path.join(image_dir, f"{i}.jpg"), quality=90)
    return out


# Where the authors' code (sony/sqvae) keeps each dataset, relative to the dataset root,
# next to where write_* puts it.
AUTHORS_LAYOUT = {
    "MNIST": ("MNIST/raw", "MNIST/MNIST/raw"),
    "FashionMNIST": ("FashionMNIST/raw", "FashionMNIST/FashionMNIST/raw"),
    "CIFAR10": ("cifar-10-batches-py", "CIFAR10/cifar-10-batches-py"),
    "CelebA": ("celeba", "CelebA/celeba"),
}


def move_to_authors_layout(root, name):
    """Move a dataset written by write_* into the authors' folder; returns that folder."""
    ours, theirs = (os.path.join(root, *p.split("/")) for p in AUTHORS_LAYOUT[name])
    os.makedirs(os.path.dirname(theirs), exist_ok=True)
    os.rename(ours, theirs)
    return theirs
