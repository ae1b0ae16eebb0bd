"""Batch loaders with a reproducible, resumable, shardable epoch order.

Every loader shares one contract (see ``Loader``): the order of an epoch is a pure
function of (seed, epoch), computed on a CPU generator so it is the same on any
device, and an epoch can be re-entered at any batch to resume a run exactly.
"""
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from configs import ConfigError
from util import distributed
from util.device import is_cuda

from . import cache, pictures, sources
from .errors import DatasetError
from .sources import SPLITS, Arrays, Decoded, Files

# Spreads seeds apart: two seeds could only share an epoch's order if a run went past
# a million epochs.
SEED_STRIDE = 1_000_003


def epoch_generator_seed(seed, epoch):
    return seed * SEED_STRIDE + epoch


def epoch_order(n, *, shuffle, seed, epoch, rank=0, world_size=1, pad=True):
    """Dataset indices (CPU int64) that ``rank`` visits in ``epoch``.

    With several ranks, rank r takes positions r, r + W, r + 2W, ... With ``pad`` the
    order is first padded from its own start to a multiple of world_size, as
    DistributedSampler does, so every rank gets the same count (training needs equal
    step counts for DDP); evaluation does without, so every sample counts once.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(epoch_generator_seed(seed, epoch))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    if world_size > 1:
        total = math.ceil(n / world_size) * world_size
        if pad and total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[:total - n]])
        order = order[rank::world_size]
    return order


class Loader:
    """One split of one dataset, yielding ``(x, y)`` batches on ``device``.

    ``len(loader)`` is the number of batches this rank yields per epoch and
    ``num_samples`` the number of samples it sees (padding included). Call
    ``set_epoch`` before each epoch; ``iter_from(k)`` resumes an epoch at batch k.
    A loader of pictures chosen at run time also has ``names`` (the file of each item,
    in dataset order) and ``record`` (what a run folder keeps of them); elsewhere None.
    """

    names = None
    record = None

    def __init__(self, *, name, split, n, batch_size, shuffle, seed, device, rank,
                 world_size, drop_last):
        self.name = name
        self.split = split
        self.dataset_size = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        # Training shards are padded to equal size; evaluation shards are not (see
        # epoch_order), so validation and test metrics count every sample exactly once.
        self.num_samples = math.ceil(n / world_size) if shuffle else len(range(rank, n,
                                                                               world_size))

    def __len__(self):
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def indices(self):
        """Dataset indices this rank visits in the current epoch, in batch order."""
        return epoch_order(self.dataset_size, shuffle=self.shuffle, seed=self.seed,
                           epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                           pad=self.shuffle)

    def _batches(self, start_batch):
        n_batches = len(self)
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{n_batches} "
                             f"({self.name} {self.split} has {n_batches} batches per epoch)")
        order = self.indices()[:n_batches * self.batch_size] if self.drop_last else self.indices()
        return list(order.split(self.batch_size))[start_batch:]

    def iter_from(self, start_batch=0):
        """Iterate the current epoch's batches from index ``start_batch`` on."""
        return self._iterate(self._batches(start_batch))

    def __iter__(self):
        return self.iter_from(0)

    def _iterate(self, batches):
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}({self.name} {self.split}: {self.dataset_size} samples, "
                f"batch {self.batch_size}, {len(self)} batches, rank {self.rank}/"
                f"{self.world_size}, shuffle={self.shuffle}, device={self.device})")


class InMemoryLoader(Loader):
    """Holds the split as one uint8 tensor on ``device`` and gathers batches by index.

    Small datasets are faster this way than through per-item decoding and worker
    processes, and on a GPU the data never crosses the bus again after loading.
    """

    def __init__(self, images, labels, **kw):
        super().__init__(n=len(images), **kw)
        # On CPU these share memory with the module-level array cache (no copy).
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)

    def _iterate(self, batches):
        if not batches:
            return
        # One host-to-device copy of the epoch's indices rather than one per batch.
        order = torch.cat(batches).to(self.device, non_blocking=True)
        for idx in order.split([len(b) for b in batches]):
            yield self.images[idx].float().div_(255), self.labels[idx]


class FileDataset(Dataset):
    """Decodes one file per item with ``decode`` (uint8 C x H x W)."""

    def __init__(self, paths, decode):
        self.paths = list(paths)
        self.decode = decode

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(self.decode(self.paths[i]))


class _ErrorsAsValues(Dataset):
    """Returns a DatasetError's message instead of raising it.

    Raised inside a worker, DataLoader would re-raise it with the worker's whole
    traceback as the message, and tearing down the errored worker stalls for 5 s;
    passed back as data, the loader raises it cleanly in the main process.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except DatasetError as e:
            return str(e)


def _collate(items):
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else default_collate(items)


class FileLoader(Loader):
    """Decodes files in DataLoader workers; batches follow the shared epoch order."""

    def __init__(self, dataset, *, num_workers, to_model, **kw):
        super().__init__(n=len(dataset), **kw)
        self.dataset = dataset
        self.num_workers = num_workers
        self.to_model = to_model

    def _iterate(self, batches):
        # A fresh DataLoader per pass: its batch list is this epoch's (possibly
        # resumed) slice, and non-persistent workers exit when the pass ends.
        loader = DataLoader(_ErrorsAsValues(self.dataset),
                            batch_sampler=[b.tolist() for b in batches],
                            num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=is_cuda(self.device))
        for x in loader:
            if isinstance(x, str):
                raise DatasetError(x)
            x = self.to_model(x.to(self.device, non_blocking=True))
            yield x, torch.zeros(len(x), dtype=torch.int64, device=self.device)


class CachedLoader(FileLoader):
    """Gathers batches from the split's decoded cache (``data.cache``) in this process.

    The cache is opened, or built once, on the first pass, so a file that cannot be
    decoded fails at access as it does on the decoding path. Unlike InMemoryLoader the
    array stays on disk (a 2 GB cache need not fit anywhere) and only each batch is
    copied to ``device`` (on CUDA from pinned memory, see ``batch_buffer``). Where the
    cache cannot be written, every pass decodes the files as FileLoader does.
    """

    def __init__(self, dataset, *, cache_path, root, shape, build_workers, **kw):
        super().__init__(dataset, **kw)
        self.cache_path = cache_path
        self.root = root
        self.shape = tuple(shape)
        self.build_workers = build_workers
        self.array = None
        self._cache_checked = False

    def _open_cache(self):
        if not self._cache_checked:
            self.array = cache.open_or_build(
                self.cache_path, root=self.root, paths=self.dataset.paths,
                decode=self.dataset.decode, shape=self.shape,
                what=f"{self.name} {self.split}", workers=self.build_workers)
            self._cache_checked = True
        return self.array

    def _iterate(self, batches):
        array = self._open_cache()
        if array is None:
            yield from super()._iterate(batches)
            return
        yield from gather_batches(array, None, batches, self.device, self.to_model)


class DecodedLoader(Loader):
    """Gathers batches from rows of an array that is already decoded (``sources.Decoded``:
    a folder of pictures), memory-mapped or in memory, as CachedLoader does from its cache."""

    def __init__(self, decoded, *, to_model, **kw):
        super().__init__(n=len(decoded.rows), **kw)
        self.array, self.rows = decoded.array, np.asarray(decoded.rows, dtype=np.int64)
        self.names, self.record = list(decoded.names), decoded.record
        self.to_model = to_model

    def _iterate(self, batches):
        yield from gather_batches(self.array, self.rows, batches, self.device, self.to_model)


def gather_batches(array, rows, batches, device, to_model):
    """The batches (dataset indices) from `array` (its rows `rows` in dataset order, or all
    of them), each as (items on `device` for the model, zero labels)."""
    for batch in batches:
        idx = batch.numpy() if rows is None else rows[batch.numpy()]
        # Rows read in file order sweep the file forwards (page cache read-ahead),
        # then go back to the epoch's order.
        order = np.argsort(idx, kind="stable")
        block = batch_buffer((len(idx), *array.shape[1:]), device)
        block.numpy()[order] = array[idx[order]]
        x = to_model(block.to(device, non_blocking=True))
        yield x, torch.zeros(len(x), dtype=torch.int64, device=device)


def batch_buffer(shape, device):
    """An empty uint8 host tensor for a batch bound for `device`.

    Page-locked (pinned) for a CUDA device: only from pinned memory does a non_blocking
    copy run asynchronously, overlapping the step that runs meanwhile; from pageable memory
    it is staged and waited for. A fresh buffer per batch is safe and cheap: PyTorch's
    pinned-memory cache hands a block out again only after the copies that read it have
    finished. Elsewhere the buffer is ordinary memory (on the CPU the batch is used in
    place)."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=is_cuda(device))


def _image_to_model(x):
    return x.float().div_(255)


def _label_to_model(x):
    return x.long()


# How a batch of uint8 items reaches the model, by what the dataset holds
# (sources.Source.items): images as floats in [0, 1], label maps as class indices.
TO_MODEL = {"images": _image_to_model, "labels": _label_to_model}


def _check_split(split):
    if split not in sources.SPLITS:
        raise ValueError(f"split must be one of {', '.join(sources.SPLITS)}, got {split!r}")


def _check_loader_args(batch_size, rank, world_size):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")


def build_loader(cfg, split, *, batch_size, shuffle, seed=0, device="cpu", rank=0,
                 world_size=1, drop_last=False, recorded=None):
    """The loader for ``split`` ("train", "val" or "test") of cfg's dataset.

    ``batch_size`` is per rank. Validation and test loaders keep file order. ``recorded``
    is what a run folder recorded of the files its splits used (their loaders' ``record``,
    by split), for a dataset whose files are chosen at run time; others ignore it.
    """
    _check_split(split)
    if shuffle and split != "train":
        raise ValueError(f"the {split} loader keeps file order; build it with shuffle=False")
    _check_loader_args(batch_size, rank, world_size)
    name = cfg.dataset.name
    source = sources.source(name)
    common = dict(name=name, split=split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                  device=device, rank=rank, world_size=world_size, drop_last=drop_last)
    got = source.read(cfg, split, recorded)
    where = os.path.abspath(cfg.path_dataset)
    if isinstance(got, Arrays):
        _check_shape(cfg, name, got.images.shape[1:])
        if len(got.images) == 0:
            raise DatasetError(f"{name} {split} split under {where} is empty")
        return InMemoryLoader(got.images, got.labels, **common)
    if isinstance(got, Decoded):
        _check_shape(cfg, name, got.array.shape[1:])
        return DecodedLoader(got, to_model=TO_MODEL[source.items], **common)
    if not isinstance(got, Files):
        raise TypeError(f"the reader of {name} returned a {type(got).__name__}, not one of "
                        "sources.Arrays, Files, Decoded")
    if not got.paths:
        raise DatasetError(f"{name} {split} split under {where} is empty")
    dataset = FileDataset(got.paths, got.decode)
    files = dict(num_workers=cfg.nworker, to_model=TO_MODEL[source.items], **common)
    if not cfg.cache_decoded:
        return FileLoader(dataset, **files)
    return CachedLoader(dataset, cache_path=cache.cache_path(where, got.cache), root=where,
                        shape=cfg.dataset.shape, build_workers=cache.build_workers(), **files)


def build_picture_loader(cfg, folder, *, batch_size, device="cpu", rank=0, world_size=1):
    """A loader over every picture under `folder` (data.pictures), in sorted file order,
    decoded at cfg's dataset.shape: what ``-ts RUN --images DIR`` evaluates and encodes.
    Its ``names`` are the pictures' names relative to the folder; ``record`` says which
    were skipped."""
    _check_loader_args(batch_size, rank, world_size)
    name = cfg.dataset.name
    source = sources.source(name)
    if source.items != "images":
        raise DatasetError(f"--images reads pictures, but a {name} run reconstructs "
                           f"{source.items}; give a run of a dataset of images")
    folder = os.path.abspath(folder)
    names = pictures.list_pictures(folder)
    decoded = pictures.decoded(folder, names, tuple(cfg.dataset.shape),
                               cached=cfg.cache_decoded, said_for=cfg)
    rows, kept = decoded.rows(names)
    if not rows:
        raise DatasetError(f"none of the {len(names)} pictures under {folder} can be decoded")
    return DecodedLoader(Decoded(decoded.array, rows, kept,
                                 {"files": kept, "skipped": sorted(decoded.skipped)}),
                         to_model=TO_MODEL[source.items], name=name, split="images",
                         batch_size=batch_size, shuffle=False, seed=0, device=device,
                         rank=rank, world_size=world_size, drop_last=False)


def _check_shape(cfg, name, shape):
    if tuple(shape) != tuple(cfg.dataset.shape):
        raise DatasetError(f"{name} files hold {tuple(shape)} samples but the config's "
                           f"dataset.shape is {tuple(cfg.dataset.shape)}")


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
    """{split: loader} for this process: the training split shuffled by (seed, epoch) and
    sharded over the torchrun processes, the others in file order. ``recorded``: see
    build_loader."""
    rank, world = distributed.rank(), distributed.world_size()
    loaders = {}
    for split in splits:
        train = split == "train"
        loaders[split] = build_loader(
            cfg, split, batch_size=per_rank_batch(cfg, world) if train else cfg.test.bs,
            shuffle=train, seed=seed, device=device, rank=rank, world_size=world,
            drop_last=train and cfg.train.drop_last, recorded=recorded)
    return loaders


def recorded_files(loaders):
    """What a run folder records of the files its loaders read ({split: loader.record}), or
    None when its dataset's files are fixed."""
    records = {split: loader.record for split, loader in loaders.items()
               if loader.record is not None}
    return records or None
