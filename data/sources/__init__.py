"""Finding, downloading and reading each dataset's files under the dataset root.

Nothing here builds tensors or loaders; it returns numpy arrays (in-memory datasets)
or file lists (file-backed datasets) split into train/val/test. One module per source
family, and one for what they share:

* ``layouts``: this project's folder layout and the authors' (sony/sqvae), downloads into
  ours, the validation split carved off an official training split, the array cache;
* ``mnist``: MNIST and Fashion-MNIST, parsed by torchvision;
* ``cifar10``: CIFAR10's batches, unpickled here with only numpy arrays and plain values
  allowed;
* ``celeba``: CelebA's JPEGs and CelebAMask-HQ's label maps, as file lists.
"""
from .celeba import (CELEBA_DIR, CELEBA_IMAGES, CELEBA_PARTITION, CELEBAMASK_DIR,
                     celeba_files, celebamask_files)
from .cifar10 import CIFAR10_DIR, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES, load_cifar10
from .layouts import (DOWNLOAD_TIMEOUT_S, LAYOUT_NAMES, MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL,
                      NO_DOWNLOAD_ENV, SPLITS, VAL_SIZE, download_disabled, split_sizes)
from .mnist import MNIST_FILES, load_mnist_like

__all__ = [
    "CELEBA_DIR", "CELEBA_IMAGES", "CELEBA_PARTITION", "CELEBAMASK_DIR", "CIFAR10_DIR",
    "CIFAR10_TEST_FILE", "CIFAR10_TRAIN_FILES", "DOWNLOAD_TIMEOUT_S", "LAYOUT_NAMES",
    "MIN_OFFICIAL_TRAIN_FOR_FIXED_VAL", "MNIST_FILES", "NO_DOWNLOAD_ENV", "SPLITS", "VAL_SIZE",
    "celeba_files", "celebamask_files", "download_disabled", "load_cifar10", "load_mnist_like",
    "split_sizes",
]
