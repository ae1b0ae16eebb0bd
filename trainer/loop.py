"""The training loop of docs/model.md §5, readable top to bottom.

Each epoch: train over the training loader (the model's per-step hook, the SQ-VAE's
temperature, before every iteration),
then validate twice (stochastic, then deterministic; the deterministic result is the one
recorded, stepped into ReduceLROnPlateau and compared for "best"). With a run folder:
``best.pt`` when the validation loss is at most the best so far, ``current.pt`` after
every epoch and every ``train.ckpt_every_steps`` steps. After training, the caller
evaluates the test split with the best weights (``Trainer.test``).

Metrics stay on the device and are read back once per ``log.every_steps`` steps (a
``train_step`` record, also when a non-finite loss is caught) and once per epoch.
Records go to ``metrics.jsonl`` when ``current.pt`` is written, right after it: the file
only ever holds records of steps that a resume will not redo, and it is only appended to.
"""
import math
import os
import signal
import time
from itertools import islice

import torch

from configs import config_to_yaml
from networks import upgrade_state_dict
from util import distributed as dist
from util.cli import Stopped
from util.device import is_cuda
from util.rng import get_rng_state, set_rng_state

from . import runs
from .images import save_reconstructions
from .logs import Display
from .meters import CodeHistogram, MeanMeter, derived_metrics, eval_pass

# Records a training run writes (the others, test and -ts records, are appended by callers).
TRAINING_SPLITS = ("train_step", "train", "val_stochastic", "val")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


class Interrupted(Stopped):
    """SIGINT/SIGTERM arrived; a resumable checkpoint has been written. `code` is the
    exit status (130 or 143); the message says how to continue."""


def build_optimizer(cfg, model, device):
    """Adam with its fused kernel (one pass over every tensor: 2.2x faster than foreach on this
    2-core CPU, docs/speed.md), or foreach where the build has no fused kernel for the
    device (PyTorch before 2.4 on the CPU)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=True)


def optimizer_state_by_name(model, state):
    """The checkpoint's optimizer state with its parameters matched to `model`'s by name:
    checkpoints written before the quantizer became a layer list them in another order."""
    names = [name for name, _ in model.named_parameters()]
    known = set(names)
    saved = [name for name in upgrade_state_dict(state["model"]) if name in known]
    optimizer = state["optimizer"]
    if saved == names or sorted(saved) != sorted(names):
        return optimizer  # already in order, or a mismatch load_state_dict reports
    (group,) = optimizer["param_groups"]
    ids = dict(zip(saved, group["params"]))
    return {**optimizer, "param_groups": [{**group, "params": [ids[n] for n in names]}]}


def build_scheduler(optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=3, threshold=1e-4, threshold_mode="rel",
        cooldown=0, min_lr=0, eps=1e-8)


def segmentation_meter(model):
    """A factory of split-level pixel-accuracy/mIoU meters for label-map models, else None."""
    if model.OUTPUTS != "labels":
        return None
    from networks import label_channels
    from third_party.segmentation import SegmentationMeter
    return lambda: SegmentationMeter(model.num_classes, label_channels(model.num_classes))


def record_key(record):
    return record.get("split"), record.get("epoch"), record.get("step")


class Trainer:
    """Owns the model, optimizer, scheduler, loaders and (optionally) a run folder."""

    def __init__(self, cfg, model, loaders, device, run_dir=None, *, limit_batches=None,
                 display=None, resume_command=None, launch=None):
        self.cfg, self.loaders, self.device = cfg, loaders, device
        self.run_dir, self.limit = run_dir, limit_batches
        self.is_main = dist.is_main()  # every process computes; only the main one writes
        self.display = display or Display(labels=model.OUTPUTS == "labels")
        self.segmentation = segmentation_meter(model)
        self.resume_command = resume_command
        self.launch = launch or {"seed": 0, "limit_batches": limit_batches}
        # Precision and compilation are the trainer's choice, not the model's.
        model.amp = cfg.train.amp
        if dist.active() and cfg.train.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.eval_model = torch.compile(model) if cfg.train.compile else model
        self.train_model = self.eval_model
        if dist.active():
            from torch.nn.parallel import DistributedDataParallel
            ids = [torch.device(device).index] if is_cuda(device) else None
            ddp = DistributedDataParallel(model, device_ids=ids)
            self.train_model = torch.compile(ddp) if cfg.train.compile else ddp
        self.optimizer = build_optimizer(cfg, model, device)
        self.scheduler = build_scheduler(self.optimizer)
        self.keys = model.TERMS
        self.epoch, self.batch, self.step = 1, 0, 0
        self.best_loss, self.best_epoch = math.inf, 0
        self.history = []   # every training record so far (kept in current.pt)
        self.unwritten = []  # those not yet appended to metrics.jsonl
        self.meter = MeanMeter(self.keys)
        self.interval = MeanMeter(self.keys)
        self.interval_codes = CodeHistogram(model.codebook.shape[0])
        self.train_seconds = 0.0
        self.step_figures = {}  # what the model's per-step hook returned for the last step
        self._signal = None
        # The first non-finite step and its terms, kept on the device until the next check.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_terms = torch.zeros(len(self.keys), device=device)
        self._step_counter = torch.zeros((), dtype=torch.long, device=device)

    # ---- sizes -------------------------------------------------------------------------
    def batches(self, split):
        n = len(self.loaders[split])
        return n if self.limit is None else min(n, self.limit)

    # ---- checkpoints and records -------------------------------------------------------
    def path(self, name):
        return os.path.join(self.run_dir, name)

    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "best_loss": self.best_loss, "best_epoch": self.best_epoch,
            "history": self.history,
            "train_meter": self.meter.state_dict(),
            "interval_meter": self.interval.state_dict(),
            "interval_codes": self.interval_codes.state_dict(),
            "train_seconds": self.train_seconds,
            "rng": get_rng_state(),
            # Under torchrun every process draws its own Gumbel noise: keep all their states.
            "rng_ranks": dist.gather_objects(get_rng_state()),
            "config": config_to_yaml(self.cfg),
            "launch": self.launch,
        }

    def load_state_dict(self, state, path):
        runs.load_model_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(optimizer_state_by_name(self.model, state))
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best_loss, self.best_epoch = state["best_loss"], state["best_epoch"]
        self.history = list(state["history"])
        self.meter.load_state_dict(state["train_meter"], self.device)
        self.interval.load_state_dict(state["interval_meter"], self.device)
        self.interval_codes.load_state_dict(state["interval_codes"], self.device)
        self.train_seconds = state["train_seconds"]
        self._step_counter.fill_(self.step)
        self.step_figures = self.model.before_train_step(self.step) if self.step else {}
        ranks = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else state["rng"])
        # A kill between writing current.pt and appending its records leaves them out of
        # metrics.jsonl: append exactly those.
        if self.run_dir is not None and self.is_main:
            written = {record_key(r) for r in runs.read_metrics(self.run_dir)
                       if r.get("split") in TRAINING_SPLITS}
            self.unwritten = [r for r in self.history if record_key(r) not in written]
            self.write_records()

    def write_records(self):
        if self.run_dir is not None and self.is_main and self.unwritten:
            runs.append_metrics(self.run_dir, self.unwritten)
        self.unwritten = []

    def save_current(self):
        if self.run_dir is None:
            return
        self.check_finite()
        state = self.state_dict()  # a collective under torchrun: every process takes part
        if self.is_main:
            runs.save_checkpoint(self.path(runs.CURRENT), state)
            self.write_records()

    def save_best(self, val_loss):
        if not self.is_main:
            return
        runs.save_checkpoint(self.path(runs.BEST), {
            "model": self.model.state_dict(), "epoch": self.epoch, "step": self.step,
            "val_loss": val_loss, "config": config_to_yaml(self.cfg)})

    def record(self, split, metrics, seconds, **extra):
        entry = {"epoch": self.epoch, "split": split, "step": self.step, **metrics,
                 "lr": self.optimizer.param_groups[0]["lr"],
                 **self.step_figures,
                 "seconds": seconds, **extra}
        self.history.append(entry)
        self.unwritten.append(entry)
        return entry

    # ---- failure handling --------------------------------------------------------------
    def track_finite(self, values):
        self._step_counter += 1
        newly_bad = ~torch.isfinite(values).all() & (self._bad_step < 0)
        self._bad_step = torch.where(newly_bad, self._step_counter, self._bad_step)
        self._bad_terms = torch.where(newly_bad, values, self._bad_terms)

    def check_finite(self):
        local = int(self._bad_step)
        step = int(dist.all_reduce_max(self._bad_step.clone()))
        if step < 0:
            return
        terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys, self._bad_terms.tolist())) \
            if local >= 0 else "on another process"
        kept = [name for name in (runs.CURRENT, runs.BEST)
                if self.run_dir is not None and os.path.isfile(self.path(name))]
        where = (f"; {' and '.join(kept)} in {self.run_dir} (from before it) are kept"
                 if kept else "; no checkpoint was written before it")
        raise TrainingError(f"non-finite loss at step {step} ({terms}); try a lower "
                            f"train.lr or another seed{where}")

    def _on_signal(self, signum, frame):
        self._signal = signum

    def signal_received(self, now=False):
        """Whether to stop now. Under torchrun the processes agree (at logging steps, or
        `now`), so they all stop after the same step."""
        if not dist.active():
            return self._signal is not None
        if not now and self.step % self.cfg.log.every_steps:
            return False
        flag = torch.tensor([self._signal or 0], device=self.device)
        self._signal = int(dist.all_reduce_max(flag)) or None
        return self._signal is not None

    def _interrupt(self):
        code = 128 + self._signal
        name = signal.Signals(self._signal).name
        if self.run_dir is None:
            raise Interrupted(code, f"{name}: stopped at step {self.step} (no run folder, "
                                    "nothing to resume; use --save to make runs resumable)")
        self.save_current()
        command = self.resume_command or f"--resume {self.run_dir}"
        raise Interrupted(code, f"{name}: stopped at step {self.step}, epoch {self.epoch}; "
                                f"resume with: {command}")

    # ---- the loop ----------------------------------------------------------------------
    def train_epoch(self):
        cfg, model = self.cfg, self.model
        loader = self.loaders["train"]
        loader.set_epoch(self.epoch)
        n_batches = self.batches("train")
        if self.batch > n_batches:
            raise runs.RunError(f"the checkpoint stopped at batch {self.batch} of epoch "
                                f"{self.epoch}, but epochs now have {n_batches} batches; "
                                "resume with the run's own dataset and --limit-batches")
        every_ckpt, every_log = cfg.train.ckpt_every_steps, cfg.log.every_steps
        model.train()
        start = time.perf_counter()
        bar = self.display.progress(n_batches * loader.batch_size, f"epoch {self.epoch}")
        bar.update(self.batch * loader.batch_size)
        for x, _ in islice(loader.iter_from(self.batch), n_batches - self.batch):
            self.step = (self.epoch - 1) * n_batches + self.batch + 1
            self.step_figures = model.before_train_step(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            _, terms = self.train_model(x, "train", codes=True)
            terms["loss"].backward()
            self.optimizer.step()
            values = self.meter.add(terms)
            self.interval.add_values(values)
            self.interval_codes.add(terms["codes"])
            self.track_finite(values)
            self.batch += 1
            bar.update(x.shape[0])
            if self.step % every_log == 0:
                self.log_interval(bar)
            if self.signal_received():
                self.train_seconds += time.perf_counter() - start
                bar.close()
                self._interrupt()
            if every_ckpt and self.step % every_ckpt == 0 and self.batch < n_batches:
                self.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save_current()
        bar.close()
        self.check_finite()
        self.train_seconds += time.perf_counter() - start
        return derived_metrics(self.meter.means(), model.dim_x)

    def log_interval(self, bar):
        """Read the interval's running means back (one sync), record and display them."""
        self.check_finite()
        means = derived_metrics(self.interval.means(), self.model.dim_x)
        means["codes_used"] = self.interval_codes.summary()["codes_used"]
        self.display.interval(self.record("train_step", means, None), bar)
        self.interval = MeanMeter(self.keys)
        self.interval_codes = CodeHistogram(self.interval_codes.size)

    def evaluate_split(self, split):
        """Stochastic, then deterministic pass over `split`: two (metrics, seconds) pairs."""
        loader, limit = self.loaders[split], self.batches(split)
        passes = []
        for mode in ("stochastic", "deterministic"):
            start = time.perf_counter()
            with self.display.progress(limit * loader.batch_size, f"{split} {mode}") as bar:
                metrics = eval_pass(self.eval_model, loader, mode, limit, self.segmentation, bar)
            passes.append((metrics, time.perf_counter() - start))
        return passes

    def fit(self):
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch <= self.cfg.train.epoch_max:
                train = self.train_epoch()
                (val_s, val_s_seconds), (val, val_seconds) = self.evaluate_split("val")
                self.display.records([
                    self.record("train", train, self.train_seconds),
                    self.record("val_stochastic", val_s, val_s_seconds),
                    self.record("val", val, val_seconds)])
                self.scheduler.step(val["loss"])
                improved = val["loss"] <= self.best_loss
                if improved:
                    self.best_loss, self.best_epoch = val["loss"], self.epoch
                self.display.epoch(self.epoch, self.cfg.train.epoch_max, self.step,
                                   [(train, self.train_seconds), (val_s, val_s_seconds),
                                    (val, val_seconds)],
                                   saved=improved and self.run_dir is not None,
                                   best_epoch=self.best_epoch)
                if self.run_dir is not None:
                    if improved:
                        self.save_best(val["loss"])
                    self.save_grids(("best", "current") if improved else ("current",))
                self.epoch, self.batch = self.epoch + 1, 0
                self.meter = MeanMeter(self.keys)
                self.train_seconds = 0.0
                self.save_current()
                if self.signal_received(now=True):
                    self._interrupt()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def test(self, epoch, split="test", step=None, **extra):
        """Evaluate the test split (or the loader `split`, e.g. the pictures of -ts --images):
        stochastic, then the recorded deterministic pass; returns the two metrics records,
        "<split>_stochastic" and "<split>" (the caller appends them to metrics.jsonl).
        TensorBoard gets them at `step`, the step of the weights tested (default: the last)."""
        stochastic, deterministic = self.evaluate_split(split)
        self.display.test(epoch, stochastic, deterministic, name=split)
        records = [{"epoch": epoch, "split": name, **metrics, "seconds": seconds, **extra}
                   for name, (metrics, seconds) in ((f"{split}_stochastic", stochastic),
                                                    (split, deterministic))]
        self.display.records(records, step=self.step if step is None else step)
        return records

    # ---- output ------------------------------------------------------------------------
    def save_grids(self, names):
        """One reconstruction grid of the first validation batch, saved under each name."""
        if not self.is_main:
            return
        x, _ = next(iter(self.loaders["val"]))
        grid = save_reconstructions(
            self.model, x, [self.path(f"reconstructions_{name}.png") for name in names])
        for name in names:
            self.display.images(f"reconstructions/{name}", grid, self.step)
