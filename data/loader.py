"""Batch loaders whose epoch order is a pure function of (seed, epoch), drawn on a CPU generator
(the same on any device): reproducible, shardable, and resumable at any batch of an epoch."""
import functools
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from configs import ConfigError, registry
from util import distributed
from util.device import is_cuda

from . import cache, pictures, sources
from .errors import DatasetError
from .sources import SPLITS, Arrays, Decoded, Files, Reads

SEED_STRIDE = 1_000_003  # seeds apart: two share an epoch's order only past a million epochs
# A batch of uint8 items for the model, by registry's Dataset.items: floats in [0, 1], indices.
IMAGES = "images"
TO_MODEL = {IMAGES: lambda x: x.float().div_(255), "labels": lambda x: x.long()}


def epoch_order(n, *, shuffle, seed, epoch, rank=0, world_size=1):
    """Dataset indices (CPU int64) that ``rank`` visits in ``epoch``: positions r, r + W, ... of
    the epoch's order, a shuffled one first padded from its own start to a multiple of world_size
    as DistributedSampler does (DDP needs equal steps; evaluation counts each sample once)."""
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + epoch))
             if shuffle else torch.arange(n))
    total = math.ceil(n / world_size) * world_size
    if shuffle and total > n:
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[:total - n]])
    return order[rank::world_size]


class Loader:
    """One split of one dataset, yielding ``(x, y)`` batches on ``device``; ``set_epoch`` before
    each epoch, ``iter_from(k)`` resumes one at batch k; num_samples counts the padding."""

    names = record = None  # pictures chosen at run time: each item's file, what a run keeps

    def __init__(self, *, name, split, n, batch_size, to_model, shuffle=False, seed=0,
                 device="cpu", rank=0, world_size=1, drop_last=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} "
                             f"(world_size {world_size})")
        self.name, self.split, self.dataset_size, self.to_model = name, split, n, to_model
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.device = torch.device(device)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        # Training shards are padded to equal size, evaluation shards are not (epoch_order).
        self.num_samples = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))

    def __len__(self):
        return (self.num_samples // self.batch_size if self.drop_last
                else math.ceil(self.num_samples / self.batch_size))

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def iter_from(self, start_batch=0):
        """The epoch's batches from index ``start_batch`` to len(self) (drop_last: whole ones)."""
        n_batches = len(self)
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{n_batches} "
                             f"({self.name} {self.split} has {n_batches} batches per epoch)")
        order = epoch_order(self.dataset_size, shuffle=self.shuffle, seed=self.seed,
                            epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        return self._iterate(list(order.split(self.batch_size))[start_batch:n_batches])

    __iter__ = iter_from

    def __repr__(self):
        return (f"{type(self).__name__}({self.name} {self.split}: {self.dataset_size} samples, "
                f"batch {self.batch_size}, {len(self)} batches, rank {self.rank}/"
                f"{self.world_size}, shuffle={self.shuffle}, device={self.device})")


class InMemoryLoader(Loader):
    """The split as one uint8 tensor on ``device``, batches gathered by index (never re-sent)."""

    def __init__(self, images, labels, **kw):
        super().__init__(n=len(images), **kw)
        # On the CPU these share memory with the arrays read (no copy).
        self.images, self.labels = (torch.from_numpy(a).to(self.device) for a in (images, labels))

    def _iterate(self, batches):
        if not batches:
            return
        # One host-to-device copy of the epoch's indices rather than one per batch.
        order = torch.cat(batches).to(self.device, non_blocking=True)
        for idx in order.split([len(b) for b in batches]):
            yield self.to_model(self.images[idx]), self.labels[idx]


class FileDataset(Dataset):
    """Files a batch at a time, decoded by ``decode``. A DatasetError comes back as its message:
    raised in a worker, DataLoader would re-raise it with the worker's traceback and stall 5 s."""

    def __init__(self, paths, decode):
        self.paths, self.decode = list(paths), decode

    def __getitem__(self, batch):
        try:
            return torch.from_numpy(np.stack([self.decode(self.paths[i]) for i in batch]))
        except DatasetError as e:
            return str(e)


class FileLoader(Loader):
    """One file per item: rows of a decoded array (``decoded`` pictures, or the cache, on disk,
    ``open_cache`` opens or builds on the first pass), else decoded by workers every pass."""

    def __init__(self, *, dataset=None, num_workers=0, open_cache=None, decoded=None, **kw):
        super().__init__(n=len(dataset.paths if decoded is None else decoded.rows), **kw)
        self.dataset, self.num_workers, self.open_cache = dataset, num_workers, open_cache
        self.array = self.rows = None
        if decoded is not None:
            self.array, self.rows = decoded.array, np.asarray(decoded.rows, dtype=np.int64)
            self.names, self.record = list(decoded.names), decoded.record

    def _iterate(self, batches):
        if self.open_cache is not None:  # now: an undecodable file fails at access, cached or not
            found, self.open_cache = self.open_cache(), None
            self.array = None if found is None else found[0]
        for block in self._decode(batches) if self.array is None else self._gather(batches):
            x = self.to_model(block.to(self.device, non_blocking=True))
            yield x, torch.zeros(len(x), dtype=torch.int64, device=self.device)

    def _gather(self, batches):
        for batch in batches:
            idx = batch.numpy() if self.rows is None else self.rows[batch.numpy()]
            order = np.argsort(idx, kind="stable")  # rows in file order: read-ahead helps
            block = batch_buffer((len(idx), *self.array.shape[1:]), self.device)
            block.numpy()[order] = self.array[idx[order]]
            yield block

    def _decode(self, batches):
        # A fresh DataLoader per pass: its batches are this (resumed) pass's; its workers exit.
        for block in DataLoader(self.dataset, sampler=[b.tolist() for b in batches],
                                batch_size=None, num_workers=self.num_workers,
                                pin_memory=is_cuda(self.device)):
            if isinstance(block, str):
                raise DatasetError(block)
            yield block


def batch_buffer(shape, device):
    """An empty uint8 host tensor for a batch bound for `device`, pinned for CUDA: only that lets
    a non_blocking copy overlap the step (one per batch: the pinned cache reuses copied blocks)."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=is_cuda(device))


def build_loader(cfg, split, *, batch_size, shuffle, seed=0, device="cpu", rank=0,
                 world_size=1, drop_last=False, recorded=None):
    """The loader of ``split`` of cfg's dataset, ``batch_size`` per rank. ``recorded``: the
    ``record`` of each split's loader a run folder kept (files chosen at run time)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if shuffle and split != "train":
        raise ValueError(f"the {split} loader keeps file order; build it with shuffle=False")
    name, shape = cfg.dataset.name, tuple(cfg.dataset.shape)
    where = os.path.abspath(cfg.path_dataset)
    common = dict(name=name, split=split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                  device=device, rank=rank, world_size=world_size, drop_last=drop_last,
                  to_model=TO_MODEL[registry.DATASETS[name].items])
    got = sources.source(name).read(cfg, split, recorded)
    if not isinstance(got, (Arrays, Decoded, Files)):
        raise TypeError(f"the reader of {name} returned a {type(got).__name__}, not one of "
                        "sources.Arrays, Files, Decoded")
    if not isinstance(got, Files) and tuple(got[0].shape[1:]) != shape:  # images, or array
        raise DatasetError(f"{name} files hold {tuple(got[0].shape[1:])} samples but the "
                           f"config's dataset.shape is {shape}")
    if not isinstance(got, Decoded) and len(got[0]) == 0:  # images, or paths
        raise DatasetError(f"{name} {split} split under {where} is empty")
    if isinstance(got, Arrays):
        return InMemoryLoader(got.images, got.labels, **common)
    if isinstance(got, Decoded):
        return FileLoader(decoded=got, **common)
    open_cache = functools.partial(
        cache.open_or_build, os.path.join(where, cache.CACHE_DIR, f"{got.cache}.npy"),
        root=where, paths=list(got.paths), decode=got.decode, shape=shape,
        what=f"{name} {split}") if cfg.cache_decoded else None
    return FileLoader(dataset=FileDataset(got.paths, got.decode), num_workers=cfg.nworker,
                      open_cache=open_cache, **common)


def build_picture_loader(cfg, folder, *, batch_size, device="cpu", rank=0, world_size=1):
    """A loader over every picture under `folder` in sorted file order, at cfg's dataset.shape
    (``-ts RUN --images DIR``); ``names`` relative to the folder, ``record`` with the skipped."""
    name, items = cfg.dataset.name, registry.DATASETS[cfg.dataset.name].items
    if items != IMAGES:
        raise DatasetError(f"--images reads pictures, but a {name} run reconstructs "
                           f"{items}; give a run of a dataset of images")
    names = pictures.list_pictures(folder := os.path.abspath(folder))
    found = pictures.decoded(folder, names, tuple(cfg.dataset.shape), cached=cfg.cache_decoded,
                             reads=Reads.of(cfg), wanted=names, where=f"under {folder}")
    return FileLoader(decoded=found, to_model=TO_MODEL[items], name=name, split="images",
                      batch_size=batch_size, device=device, rank=rank, world_size=world_size)


def per_rank_batch(cfg, world_size):
    """Training batch per process: train.bs is the global batch, split over processes as the
    release's DataParallel split it; train.bs_per_rank sets the per-process batch instead."""
    if cfg.train.bs_per_rank:
        return cfg.train.bs_per_rank
    if cfg.train.bs % world_size:
        raise ConfigError(f"train.bs {cfg.train.bs} does not split over {world_size} processes; "
                          "set train.bs to a multiple or use train.bs_per_rank")
    return cfg.train.bs // world_size


def build_loaders(cfg, device, seed, splits=SPLITS, recorded=None):
    """{split: loader} of this process: train shuffled by (seed, epoch) and sharded."""
    rank, world = distributed.rank(), distributed.world_size()
    return {split: build_loader(
        cfg, split, batch_size=per_rank_batch(cfg, world) if split == "train" else cfg.test.bs,
        shuffle=split == "train", seed=seed, device=device, rank=rank, world_size=world,
        drop_last=split == "train" and cfg.train.drop_last, recorded=recorded)
        for split in splits}


def recorded_files(loaders):
    """{split: loader.record}, what a run folder keeps of its files; None where they are fixed."""
    return {split: loader.record for split, loader in loaders.items()
            if loader.record is not None} or None
