"""Run folders (docs/usage.md, "Run folders"): config, metrics.jsonl (append-only), writer lock,
`RunRecorder`; names never links (`check_links`); the release's read through `release_format`."""
import contextlib
import json
import os
import sys
import time

from configs import ConfigError, config_to_yaml, load_config
from util.io import (FileLock, JsonlError, LockHeld, append_jsonl, atomic_write_text,
                     read_jsonl, refuse_links, remove_stale_temps)

from . import release_format
from .checkpoints import (BEST, CURRENT, NUMBER, RunError, load_checkpoint,  # noqa: F401
                          load_model_weights, read_checkpoint, save_checkpoint)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATASET_FILES = "dataset_files.json"
LOCK_FILE = ".writer.lock"
TENSORBOARD = "tensorboard"
# Every name any command writes in a run folder (fnmatch patterns); none may be a link.
WRITTEN_NAMES = (CONFIG_FILE, DATASET_FILES, METRICS_FILE, f".{METRICS_FILE}.lock", LOCK_FILE,
                 TENSORBOARD, "*.pt", "*.png", "*.npz")
# The files only the writer lock's holder writes: a killed writer's temporaries are removed.
LOCKED_WRITES = (CONFIG_FILE, DATASET_FILES, BEST, CURRENT, "prior.pt", "prior_current.pt",
                 "reconstructions_best.png", "reconstructions_current.png")
# Records a training run writes (test and -ts records are appended by their callers).
TRAINING_SPLITS = ("train_step", "train", "val_stochastic", "val")


def write_config(run_dir, cfg):
    atomic_write_text(os.path.join(run_dir, CONFIG_FILE), config_to_yaml(cfg))


def check_links(run_dir):
    """UnsafeLink where a name we write in `run_dir` (or its tensorboard/) is a link."""
    refuse_links(run_dir, WRITTEN_NAMES, subfolders=(TENSORBOARD,))


def writer_lock(run_dir):
    """The folder's writer lock, held (stale temporaries removed); a RunError names its holder."""
    try:
        lock = FileLock(os.path.join(run_dir, LOCK_FILE), blocking=False).acquire()
    except LockHeld as e:
        raise RunError(f"{run_dir} is being written by process {e.pid or '(unknown)'} (a "
                       "training or --resume); wait for it to end or stop it") from None
    with contextlib.ExitStack() as on_error:
        on_error.enter_context(lock)
        remove_stale_temps(run_dir, LOCKED_WRITES)
        on_error.pop_all()  # no error: the caller holds it
    return lock


def create_run_dir(cfg, seed, now=None, files=None):
    """Claim a fresh run folder, lock it and write the config (and `files`, the files each
    split reads, where the dataset chooses them); returns (path, lock)."""
    root = cfg.path_checkpoint
    os.makedirs(root, exist_ok=True)
    stamp = time.strftime("%m%d_%H%M", time.localtime(now))
    base = f"{cfg.network.name}_seed{seed}_{stamp}"
    for n in range(10_000):
        path = os.path.join(root, base if n == 0 else f"{base}_{n}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        lock = writer_lock(path)
        write_config(path, cfg)
        if files:  # {split: {"files": [names], "skipped": [names]}}, under path_dataset
            record = {"dataset": cfg.dataset.name, "path_dataset": cfg.path_dataset,
                      "splits": files}
            atomic_write_text(os.path.join(path, DATASET_FILES),
                              json.dumps(record, indent=1) + "\n")
        return path, lock
    raise RunError(f"too many runs named {base}* in {root}")


def read_dataset_files(run_dir):
    """The files each split of the run read (data.build_loaders' `recorded`), or None."""
    path = os.path.join(run_dir, DATASET_FILES)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}); it lists the files of "
                       "the run's splits: restore it from a copy of the run folder") from None
    splits = record.get("splits") if isinstance(record, dict) else None
    if not isinstance(splits, dict) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k, []), list) and all(
                isinstance(n, str) for n in r.get(k, [])) for k in ("files", "skipped"))
            for r in splits.values()):
        raise RunError(f"{path} is not a record of this tool (expected splits of file "
                       "names); restore it from a copy of the run folder")
    return splits


def read_metrics(run_dir):
    """metrics.jsonl's records: a torn last line skipped (warned once), a bad one a RunError."""
    path = os.path.join(run_dir, METRICS_FILE)

    def warn(text):
        if os.path.abspath(path) not in _WARNED:
            _WARNED.add(os.path.abspath(path))
            print(text, file=sys.stderr)
    try:
        return read_jsonl(path, warn=warn)
    except JsonlError as e:
        raise RunError(str(e)) from None


_WARNED = set()  # metrics files whose torn last line was reported


def append_metrics(run_dir, records):
    append_jsonl(os.path.join(run_dir, METRICS_FILE), records)


def resolve_run_dir(cfg, name, flag="-ts"):
    """A run folder from a name under path/path_specific, or from a path."""
    for path in (os.path.join(cfg.path_checkpoint, name), name):  # an absolute name: itself
        if os.path.isdir(path):
            return os.path.abspath(path)
    raise RunError(f"{flag} {name}: no such run folder (looked in {cfg.path_checkpoint}); "
                   "give a folder name from there or a path")


def load_run_config(run_dir, opts=None):
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} holds no {CONFIG_FILE}: not a run folder of this tool")
    try:
        return load_config(path, opts)
    except ConfigError as e:
        raise RunError(str(e) if path in str(e) else f"{path}: {e}") from None


def read_run_config(run_dir, opts=None):
    """The config of a run folder of this tool or of the authors' release."""
    if release_format.is_release_run(run_dir):
        return release_format.read_release_config(run_dir, opts)
    return load_run_config(run_dir, opts)


def load_run_model(run_dir, opts=None, device="cpu"):
    """(config, model with the best.pt weights in eval mode on `device`, best.pt state) of a
    run folder of ours or of the release: the one way a saved run's model is loaded."""
    from networks import build_model
    cfg = read_run_config(run_dir, opts)
    if release_format.is_release_run(run_dir):
        state = {"model": release_format.load_release_weights(run_dir), "epoch": None}
    else:
        state = load_checkpoint(os.path.join(run_dir, BEST))
    model = build_model(cfg)
    load_model_weights(model, state["model"], os.path.join(run_dir, BEST))
    return cfg, model.to(device).eval(), state


def record_key(record):
    return record.get("split"), record.get("epoch"), record.get("step")


class RunRecorder:
    """A training's records and, with a run folder, its files, written by the main process.
    Records go to metrics.jsonl right after current.pt: none of a step a resume redoes."""

    def __init__(self, run_dir, is_main):
        self.run_dir, self.is_main = run_dir, is_main
        self.history = []  # every training record so far (kept in current.pt)
        self.unwritten = []  # those not yet appended to metrics.jsonl

    def add(self, record):
        self.history.append(record)
        self.unwritten.append(record)
        return record

    def resume(self, history):
        """Go on from current.pt's `history` (records a kill kept from metrics.jsonl appended)."""
        self.history = list(history)
        if self.run_dir is not None and self.is_main:
            written = {record_key(r) for r in read_metrics(self.run_dir)
                       if r.get("split") in TRAINING_SPLITS}
            self.unwritten = [r for r in self.history if record_key(r) not in written]
            self.write_records()

    def write_records(self):
        if self.run_dir is not None and self.is_main and self.unwritten:
            append_metrics(self.run_dir, self.unwritten)
        self.unwritten = []

    def save(self, name, state):
        """best.pt or current.pt, the latter followed by the records up to it."""
        if self.is_main:
            save_checkpoint(os.path.join(self.run_dir, name), state)
            if name == CURRENT:
                self.write_records()

    def save_grids(self, model, loader, names, display, step):
        """The grid of `loader`'s first batch, saved under each of `names`."""
        if not self.is_main:
            return
        from .export import save_reconstructions  # torchvision: not for the companions
        x, _ = next(iter(loader))
        grid = save_reconstructions(model, x, [
            os.path.join(self.run_dir, f"reconstructions_{name}.png") for name in names])
        for name in names:
            display.images(f"reconstructions/{name}", grid, step)
