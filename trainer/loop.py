"""The training loop of docs/model.md §5 (docs/usage.md, "Training loop"): `Trainer.fit` ->
`run_epoch` -> `train_epoch` -> `train_step`. Metrics stay on the device, read back once per
``log.every_steps`` steps and once per epoch; `checkpoint`/`resume` are current.pt's state."""
import contextlib
import math
import os
import signal
import time
from itertools import islice

import torch

from configs import config_to_yaml
from util import distributed as dist
from util.cli import Stopped
from util.device import get_rng_state, is_cuda, set_rng_state
from util.signals import interrupt_status

from . import meters, runs
from .logs import Display
from .meters import CodeHistogram, MeanMeter, derived_metrics


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


class Interrupted(Stopped):
    """SIGINT/SIGTERM arrived: exit status `code` (130 or 143), a message saying how to go on."""


@contextlib.contextmanager
def interrupted_says(then):
    """Ctrl-C or SIGTERM inside: Interrupted, saying what stopped us, then `then` (or `then()`)."""
    try:
        yield
    except KeyboardInterrupt as e:
        code, what = interrupt_status(e)
        raise Interrupted(code, f"{what}; {then() if callable(then) else then}") from None


def build_optimizer(cfg, model, device):
    """Adam with its fused kernel (2.2x faster than foreach on a 2-core CPU, docs/speed.md),
    or foreach where the build has none for the device (PyTorch before 2.4 on the CPU)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=True)


def wrap(cfg, model, device):
    """(model, the model that trains, the model that evaluates): precision, SyncBatchNorm,
    compilation and DDP are the trainer's choice, not the model's."""
    model.amp = cfg.train.amp
    if dist.active() and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    evaluated = torch.compile(model) if cfg.train.compile else model
    if not dist.active():
        return model, evaluated, evaluated
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.device(device).index] if is_cuda(device) else None)
    return model, torch.compile(ddp) if cfg.train.compile else ddp, evaluated


class FiniteGuard:
    """The first non-finite training step and its terms, on the device until `check`."""

    def __init__(self, keys, device):
        self.keys = keys
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(keys), device=device)
        self.counter = torch.zeros((), dtype=torch.long, device=device)

    def track(self, values):
        self.counter += 1
        newly_bad = ~torch.isfinite(values).all() & (self.bad_step < 0)
        self.bad_step = torch.where(newly_bad, self.counter, self.bad_step)
        self.bad_terms = torch.where(newly_bad, values, self.bad_terms)

    def check(self, recorder):
        """TrainingError at the first non-finite step of any process, saying what is kept."""
        local = int(self.bad_step)
        step = int(dist.all_reduce_max(self.bad_step.clone()))
        if step < 0:
            return
        terms = (", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys, self.bad_terms.tolist()))
                 if local >= 0 else "on another process")
        kept = [name for name in (runs.CURRENT, runs.BEST) if recorder.run_dir is not None
                and os.path.isfile(os.path.join(recorder.run_dir, name))]
        where = (f"; {' and '.join(kept)} in {recorder.run_dir} (from before it) are kept"
                 if kept else "; no checkpoint was written before it")
        raise TrainingError(f"non-finite loss at step {step} ({terms}); try a lower "
                            f"train.lr or another seed{where}")


class StopSignals:
    """While `with`-ed, SIGINT and SIGTERM are noted: the loop stops after the step it is in
    (under torchrun the processes agree on which), with a checkpoint."""

    def __init__(self, device):
        self.device, self.signum, self.previous = device, None, {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.note)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def note(self, signum, frame):
        self.signum = signum

    def received(self, agree=True):
        """Whether to stop now; under torchrun only where `agree` (every process asks there)."""
        if not dist.active():
            return self.signum is not None
        if not agree:
            return False
        flag = torch.tensor([self.signum or 0], device=self.device)
        self.signum = int(dist.all_reduce_max(flag)) or None
        return self.signum is not None

    def interrupted(self, where):
        return Interrupted(128 + self.signum,
                           f"{signal.Signals(self.signum).name}: stopped at step {where}")


class Trainer:
    """Trains `model` on `loaders` ("train", "val") with Adam and ReduceLROnPlateau; with
    `run_dir`, its checkpoints and records go there (`recorder`)."""

    def __init__(self, cfg, model, loaders, device, run_dir=None, *, limit_batches=None,
                 display=None, resume_command=None, launch=None):
        self.cfg, self.loaders, self.device, self.limit = cfg, loaders, device, limit_batches
        self.run_dir, self.resume_command = run_dir, resume_command or f"--resume {run_dir}"
        self.display = display or Display(labels=model.OUTPUTS == "labels")
        self.launch = launch or {"seed": 0, "limit_batches": limit_batches}
        self.model, self.train_model, self.eval_model = wrap(cfg, model, device)
        self.optimizer = build_optimizer(cfg, self.model, device)
        # The release's factor and patience; its other settings are torch's defaults.
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=0.5,
                                                                    patience=3)
        self.recorder, self.keys = runs.RunRecorder(run_dir, dist.is_main()), model.TERMS
        self.guard, self.signals = FiniteGuard(self.keys, device), StopSignals(device)
        self.epoch, self.batch, self.step, self.best_loss, self.best_epoch = 1, 0, 0, math.inf, 0
        self.meter, self.interval = MeanMeter(self.keys), MeanMeter(self.keys)
        self.train_seconds = 0.0
        self.interval_codes = CodeHistogram(model.codebook.shape[0])
        self.step_figures = {}  # what the model's per-step hook returned for the last step

    @property
    def history(self):
        return self.recorder.history

    def fit(self):
        with self.signals:
            while self.epoch <= self.cfg.train.epoch_max:
                self.run_epoch()
                if self.signals.received():
                    self.stop()

    def run_epoch(self):
        """Train, validate, record, keep the best weights; then current.pt."""
        passes = [(self.train_epoch(), self.train_seconds), *self.evaluate_split("val")]
        self.display.records([self.record(split, *metrics_seconds) for split, metrics_seconds
                              in zip(("train", "val_stochastic", "val"), passes)])
        val = passes[2][0]
        self.scheduler.step(val["loss"])
        improved = val["loss"] <= self.best_loss
        if improved:
            self.best_loss, self.best_epoch = val["loss"], self.epoch
        self.display.epoch(self.epoch, self.cfg.train.epoch_max, self.step, passes,
                           saved=improved and self.run_dir is not None, best_epoch=self.best_epoch)
        if self.run_dir is not None:
            if improved:
                self.recorder.save(runs.BEST, {
                    "model": self.model.state_dict(), "epoch": self.epoch, "step": self.step,
                    "val_loss": val["loss"], "config": config_to_yaml(self.cfg)})
            names = ("best", "current") if improved else ("current",)
            self.recorder.save_grids(self.model, self.loaders["val"], names, self.display,
                                     self.step)
        self.epoch, self.batch = self.epoch + 1, 0
        self.meter, self.train_seconds = MeanMeter(self.keys), 0.0
        self.save_current()

    def train_epoch(self):
        loader = self.loaders["train"]
        n_batches = len(loader) if self.limit is None else min(len(loader), self.limit)
        every_log, every_ckpt = self.cfg.log.every_steps, self.cfg.train.ckpt_every_steps
        loader.set_epoch(self.epoch)
        if self.batch > n_batches:
            raise runs.RunError(f"the checkpoint stopped at batch {self.batch} of epoch "
                                f"{self.epoch}, but epochs now have {n_batches} batches; "
                                "resume with the run's own dataset and --limit-batches")
        self.model.train()
        start = time.perf_counter()
        bar = self.display.progress(n_batches * loader.batch_size, f"epoch {self.epoch}")
        bar.update(self.batch * loader.batch_size)
        for x, _ in islice(loader.iter_from(self.batch), n_batches - self.batch):
            self.train_step(x, n_batches)
            bar.update(x.shape[0])
            if self.step % every_log == 0:
                self.log_interval(bar)
            if self.signals.received(agree=self.step % every_log == 0):
                self.train_seconds += time.perf_counter() - start
                bar.close()
                self.stop()
            if every_ckpt and self.step % every_ckpt == 0 and self.batch < n_batches:
                self.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save_current()
        bar.close()
        self.guard.check(self.recorder)
        self.train_seconds += time.perf_counter() - start
        return derived_metrics(self.meter.means(), self.model.dim_x)

    def train_step(self, x, n_batches):
        self.step = (self.epoch - 1) * n_batches + self.batch + 1
        self.step_figures = self.model.before_train_step(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        _, terms = self.train_model(x, "train", codes=True)
        terms["loss"].backward()
        self.optimizer.step()
        values = self.meter.add(terms)
        self.interval.add_values(values)
        self.interval_codes.add(terms["codes"])
        self.guard.track(values)
        self.batch += 1

    def log_interval(self, bar):
        """Read the interval's means back (one sync), record and display them."""
        self.guard.check(self.recorder)
        means = derived_metrics(self.interval.means(), self.model.dim_x)
        means["codes_used"] = self.interval_codes.summary()["codes_used"]
        self.display.interval(self.record("train_step", means, None), bar)
        self.interval = MeanMeter(self.keys)
        self.interval_codes = CodeHistogram(self.interval_codes.size)

    def evaluate_split(self, split):
        return meters.evaluate_split(self.eval_model, self.loaders[split], split, self.limit,
                                     self.display)

    def record(self, split, metrics, seconds):
        return self.recorder.add({
            "epoch": self.epoch, "split": split, "step": self.step, **metrics,
            "lr": self.optimizer.param_groups[0]["lr"], **self.step_figures, "seconds": seconds})

    def stop(self):
        """Write current.pt (with a run folder) and raise Interrupted saying how to go on."""
        if self.run_dir is None:
            raise self.signals.interrupted(f"{self.step} (no run folder, nothing to resume; "
                                           "use --save to make runs resumable)")
        self.save_current()
        raise self.signals.interrupted(f"{self.step}, epoch {self.epoch}; resume with: "
                                       f"{self.resume_command}")

    def save_current(self):
        if self.run_dir is not None:
            self.guard.check(self.recorder)
            self.recorder.save(runs.CURRENT, checkpoint(self))  # a collective under torchrun


# What current.pt holds of a Trainer besides the model, optimizer and scheduler.
COUNTERS = ("epoch", "batch", "step", "best_loss", "best_epoch", "train_seconds")
METERS = {"train_meter": "meter", "interval_meter": "interval", "interval_codes": "interval_codes"}


def checkpoint(trainer):
    """current.pt's state: everything an exact resume needs."""
    return {
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        **{name: getattr(trainer, name) for name in COUNTERS},
        **{key: getattr(trainer, name).state_dict() for key, name in METERS.items()},
        "history": trainer.recorder.history, "rng": get_rng_state(),
        # Under torchrun every process draws its own Gumbel noise: keep all their states.
        "rng_ranks": dist.gather_objects(get_rng_state()),
        "config": config_to_yaml(trainer.cfg), "launch": trainer.launch}


def resume(trainer, state, path):
    """Put current.pt's `state` (read from `path`) back into `trainer`."""
    runs.load_model_weights(trainer.model, state["model"], path)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    for name in COUNTERS:
        setattr(trainer, name, state[name])
    for key, name in METERS.items():
        getattr(trainer, name).load_state_dict(state[key], trainer.device)
    trainer.guard.counter.fill_(trainer.step)
    trainer.step_figures = trainer.model.before_train_step(trainer.step) if trainer.step else {}
    ranks = state.get("rng_ranks") or [state["rng"]]
    set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else state["rng"])
    trainer.recorder.resume(state["history"])
