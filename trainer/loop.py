"""The training loop of SPEC 5, readable top to bottom.

Logging: every ``log.every_steps`` steps the running means of the loss terms and
the self-annealing diagnostics (sigma_q^2 or kappa_q, decoder variance, entropy
of the code distribution, codes in use) are read back once, appended to
``metrics.jsonl`` as a ``train_step`` line, written to TensorBoard
(``<run>/tensorboard``) and shown on the progress bar (a terminal only).

Each epoch: train over the training loader (temperature set before every
iteration), then validate twice (stochastic, then deterministic; the
deterministic result is the one recorded, stepped into ReduceLROnPlateau and
compared for "best"). With a run folder: ``best.pt`` when the validation loss
is at most the best so far, ``current.pt`` after every epoch and every
``train.ckpt_every_steps`` steps, one ``metrics.jsonl`` line per epoch and
split. After training, the test split is evaluated with the best weights.

Metrics stay on the device during an epoch and are read back once per
``log.every_steps`` steps, which is also when a non-finite loss is caught.
"""
import math
import os
import signal
import sys
import time
from itertools import islice

import torch
from tqdm import tqdm

from configs import config_to_yaml
from util import distributed as dist
from util.device import is_cuda
from util.io import read_jsonl, write_jsonl
from util.rng import get_rng_state, set_rng_state

from . import runs
from .images import save_reconstructions

class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a resumable checkpoint has been written. `code` is the
    exit status (130 or 143)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def temperature_at(cfg, step):
    """tau(step) = max(init * exp(-decay * step), min), or init when annealing is off."""
    t = cfg.quantization.temperature
    if not cfg.flags.decay:
        return t.init
    return max(t.init * math.exp(-t.decay * step), t.min)


def build_optimizer(cfg, model, device):
    fused = is_cuda(device)
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                            **({"fused": True} if fused else {"foreach": True}))


def build_scheduler(optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=3, threshold=1e-4, threshold_mode="rel",
        cooldown=0, min_lr=0, eps=1e-8)


class MeanMeter:
    """Means over batches of per-batch scalars, accumulated on the device (no host sync)."""

    def __init__(self, keys):
        self.keys = tuple(keys)
        self.sum = None
        self.count = 0

    def add(self, terms):
        values = torch.stack([terms[k].detach().float() for k in self.keys])
        self.add_values(values)
        return values

    def add_values(self, values):
        self.sum = values if self.sum is None else self.sum + values
        self.count += 1

    def means(self):
        """Means over every batch of every process (one all-reduce under torchrun)."""
        if self.count == 0:
            return {}
        totals = torch.cat([self.sum, self.sum.new_tensor([self.count])])
        totals = dist.all_reduce_sum(totals.clone())
        return dict(zip(self.keys, (totals[:-1] / totals[-1]).tolist()))

    def state_dict(self):
        return {"keys": list(self.keys), "count": self.count,
                "sum": None if self.sum is None else self.sum.cpu()}

    def load_state_dict(self, state, device):
        self.keys, self.count = tuple(state["keys"]), state["count"]
        self.sum = None if state["sum"] is None else state["sum"].to(device)


class CodeHistogram:
    """How often each code is chosen over a whole split (on the device, no host sync)."""

    def __init__(self, size):
        self.size = size
        self.counts = None

    def add(self, codes):
        codes = codes.reshape(-1)
        if self.counts is None:
            self.counts = torch.zeros(self.size, dtype=torch.long, device=codes.device)
        self.counts.index_add_(0, codes, torch.ones_like(codes))

    def state_dict(self):
        return {"size": self.size, "counts": None if self.counts is None else self.counts.cpu()}

    def load_state_dict(self, state, device):
        self.size = state["size"]
        self.counts = None if state["counts"] is None else state["counts"].to(device)

    def summary(self):
        """Split-level perplexity exp(H(q)) of the code frequencies q, and codes in use."""
        if self.counts is None:
            return {}
        counts = dist.all_reduce_sum(self.counts.clone())
        q = counts.double() / counts.sum().clamp(min=1)
        entropy = -(q * torch.log(q.clamp(min=1e-300))).sum()
        return {"perplexity_split": float(torch.exp(entropy)),
                "codes_used": int((counts > 0).sum())}


def derived_metrics(means, dim_x):
    """Per-pixel MSE and PSNR next to the reference's per-image summed MSE."""
    out = dict(means)
    if "mse" in out:
        out["mse_pixel"] = out["mse"] / dim_x
        out["psnr"] = -10 * math.log10(out["mse_pixel"]) if out["mse_pixel"] > 0 else math.inf
    return out


@torch.no_grad()
def evaluate(model, loader, mode, limit=None, segmentation=None, bar=None):
    """One pass over `loader` in eval mode: means over batches (the reference's figures), the
    split-level code perplexity, and split-level pixel accuracy and mIoU for label maps."""
    model.eval()
    meter = MeanMeter(model.TERMS)
    histogram = CodeHistogram(model.codebook.shape[0])
    seg = segmentation() if segmentation is not None else None
    for x, _ in islice(loader, limit):
        x_hat, terms = model(x, mode, codes=True)
        meter.add(terms)
        histogram.add(terms["codes"])
        if seg is not None:
            seg.update_from_logits(x_hat, x)
        if bar is not None:
            bar.update(x.shape[0])
    result = derived_metrics(meter.means(), model.dim_x)
    result.update(histogram.summary())
    if seg is not None and seg.confusion is not None:
        dist.all_reduce_sum(seg.confusion)
        scores = seg.compute()
        result["pixel_acc"], result["miou"] = scores["pixel_acc"], scores["miou"]
    return result


class Trainer:
    """Owns the model, optimizer, scheduler, loaders and (optionally) a run folder."""

    def __init__(self, cfg, model, loaders, device, run_dir=None, *, limit_batches=None,
                 dbg=False, log=print, segmentation=None, resume_command=None, launch=None):
        self.cfg, self.loaders, self.device = cfg, loaders, device
        self.run_dir, self.limit, self.dbg = run_dir, limit_batches, dbg
        # Every process computes; only the main one writes files and prints.
        self.is_main = dist.is_main()
        self.log = log if self.is_main else (lambda *_: None)
        self.segmentation = segmentation
        self.resume_command = resume_command
        self.launch = launch or {"seed": 0, "limit_batches": limit_batches}
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
        self.history = []
        self.meter = MeanMeter(self.keys)
        self.interval = MeanMeter(self.keys)
        self.interval_codes = CodeHistogram(model.codebook.shape[0])
        self.train_seconds = 0.0
        self._signal = None
        self.show_progress = self.is_main and sys.stderr.isatty()
        self._tensorboard = None
        # The first non-finite step and its terms, kept on the device until the next check.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_terms = torch.zeros(len(self.keys), device=device)
        self._step_counter = torch.zeros((), dtype=torch.long, device=device)

    # ---- sizes -------------------------------------------------------------------------
    def batches(self, split):
        n = len(self.loaders[split])
        return n if self.limit is None else min(n, self.limit)

    # ---- checkpoints -------------------------------------------------------------------
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
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best_loss, self.best_epoch = state["best_loss"], state["best_epoch"]
        self.history = list(state["history"])
        self.meter.load_state_dict(state["train_meter"], self.device)
        self.interval.load_state_dict(state["interval_meter"], self.device)
        self.interval_codes.load_state_dict(state["interval_codes"], self.device)
        self.train_seconds = state["train_seconds"]
        self._step_counter.fill_(self.step)
        ranks = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else state["rng"])

    def save_current(self):
        if self.run_dir is None:
            return
        self.check_finite()
        state = self.state_dict()  # a collective under torchrun: every process takes part
        if self.is_main:
            runs.save_checkpoint(self.path(runs.CURRENT), state)
            # metrics.jsonl always mirrors the history in current.pt; a resume rewrites it.
            write_jsonl(self.path(runs.METRICS_FILE), self.history)

    def save_best(self, val_loss):
        if not self.is_main:
            return
        runs.save_checkpoint(self.path(runs.BEST), {
            "model": self.model.state_dict(), "epoch": self.epoch, "step": self.step,
            "val_loss": val_loss, "config": config_to_yaml(self.cfg)})

    # ---- failure handling --------------------------------------------------------------
    def track_finite(self, values):
        self._step_counter += 1
        newly_bad = ~torch.isfinite(values).all() & (self._bad_step < 0)
        self._bad_step = torch.where(newly_bad, self._step_counter, self._bad_step)
        self._bad_terms = torch.where(newly_bad, values, self._bad_terms)

    def check_finite(self):
        local = int(self._bad_step)
        step = int(dist.all_reduce_max(self._bad_step.clone()))
        if step >= 0:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys, self._bad_terms.tolist())) \
                if local >= 0 else "on another process"
            kept = (f"; the last good checkpoints in {self.run_dir} are kept"
                    if self.run_dir else "")
            raise TrainingError(f"non-finite loss at step {step} ({terms}); try a lower "
                                f"train.lr or another seed{kept}")

    def _on_signal(self, signum, frame):
        self._signal = signum

    def signal_received(self, now=False):
        """Whether to stop now. Under torchrun the processes agree (at logging steps, or
        `now`), so they all stop after the same step."""
        if not dist.active():
            return self._signal is not None
        if not now and self.step % max(1, self.cfg.log.every_steps):
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
        every_ckpt = cfg.train.ckpt_every_steps
        every_log = max(1, cfg.log.every_steps)
        model.train()
        start = time.perf_counter()
        bar = self.progress(n_batches * loader.batch_size, f"epoch {self.epoch}")
        bar.update(self.batch * loader.batch_size)
        for x, _ in islice(loader.iter_from(self.batch), n_batches - self.batch):
            self.step = (self.epoch - 1) * n_batches + self.batch + 1
            model.set_temperature(temperature_at(cfg, self.step))
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
        entry = self.record("train_step", means, None)
        self.interval = MeanMeter(self.keys)
        self.interval_codes = CodeHistogram(self.interval_codes.size)
        tb = self.tensorboard()
        if tb is not None:
            for key, value in entry.items():
                if key not in ("epoch", "split", "step", "seconds"):
                    tb.add_scalar(f"step/{key}", value, self.step)
        quality = ("acc", means["acc"]) if "acc" in means else ("mse", means["mse"])
        bar.set_postfix({"loss": f"{means['loss']:.1f}", quality[0]: f"{quality[1]:.4g}",
                         "ppl": f"{means['perplexity']:.1f}",
                         "tau": f"{entry['temperature']:.3g}"}, refresh=False)

    def progress(self, total, desc):
        """A tqdm bar in images (rate in img/s, ETA) on a terminal; silent otherwise."""
        return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False,
                    dynamic_ncols=True, disable=not self.show_progress, file=sys.stderr)

    def tensorboard(self):
        """The run's TensorBoard writer (main process with a run folder only)."""
        if self._tensorboard is None and self.run_dir is not None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(log_dir=self.path("tensorboard"))
        return self._tensorboard

    def log_epoch(self, entries):
        """Per-epoch metrics of each split to TensorBoard."""
        tb = self.tensorboard()
        if tb is None:
            return
        for entry in entries:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    tb.add_scalar(f"{entry['split']}/{key}", value, entry["epoch"])
        tb.flush()

    def validate(self, split="val"):
        loader, limit = self.loaders[split], self.batches(split)
        start = time.perf_counter()
        results = []
        for mode in ("stochastic", "deterministic"):
            with self.progress(limit * loader.batch_size, f"{split} {mode}") as bar:
                results.append(evaluate(self.eval_model, loader, mode, limit,
                                        self.segmentation, bar))
        return results[0], results[1], time.perf_counter() - start

    def record(self, split, metrics, seconds, **extra):
        entry = {"epoch": self.epoch, "split": split, "step": self.step, **metrics,
                 "lr": self.optimizer.param_groups[0]["lr"],
                 "temperature": temperature_at(self.cfg, self.step), "seconds": seconds, **extra}
        self.history.append(entry)
        return entry

    def fit(self):
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch <= self.cfg.train.epoch_max:
                train = self.train_epoch()
                val_s, val, val_seconds = self.validate("val")
                self.log_epoch([self.record("train", train, self.train_seconds),
                                self.record("val_stochastic", val_s, val_seconds),
                                self.record("val", val, val_seconds)])
                self.scheduler.step(val["loss"])
                self.print_epoch(train, val, val_seconds)
                improved = val["loss"] <= self.best_loss
                if improved:
                    self.best_loss, self.best_epoch = val["loss"], self.epoch
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
            if self._tensorboard is not None:
                self._tensorboard.flush()

    def test(self, epoch, **extra):
        """Evaluate the test split (stochastic, then the recorded deterministic pass); returns
        the two metrics records."""
        stochastic, deterministic, seconds = self.validate("test")
        self.print_line("Test", deterministic, seconds)
        records = [{"epoch": epoch, "split": "test_stochastic", **stochastic,
                    "seconds": seconds, **extra},
                   {"epoch": epoch, "split": "test", **deterministic, "seconds": seconds, **extra}]
        self.log_epoch(records)
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        return records

    # ---- output ------------------------------------------------------------------------
    def save_grids(self, names):
        """One reconstruction grid of the first validation batch, saved under each name."""
        if not self.is_main:
            return
        x, _ = next(iter(self.loaders["val"]))
        grid = save_reconstructions(
            self.model, x, [self.path(f"reconstructions_{name}.png") for name in names])
        tb = self.tensorboard()
        if tb is not None:
            for name in names:
                tb.add_image(f"reconstructions/{name}", grid, self.epoch)

    def print_line(self, name, m, seconds):
        quality = f"ACC: {m['acc']:.4f}" if "acc" in m else f"MSE: {m['mse']:.4f}"
        extra = f", mIoU: {m['miou']:.4f}" if "miou" in m else ""
        self.log(f"{name} Loss: {m['loss']:.4f}, {quality}{extra}, "
                 f"Perplexity: {m['perplexity']:.4f}, Time: {seconds:.3f}s")

    def print_epoch(self, train, val, val_seconds):
        if self.dbg:
            self.log(f"Epoch {self.epoch}/{self.cfg.train.epoch_max}")
            self.print_line("Train", train, self.train_seconds)
            self.print_line("Validation", val, val_seconds)
        else:
            quality = f"acc {val['acc']:.4f}" if "acc" in val else \
                f"mse/pixel {val['mse_pixel']:.5f}"
            self.log(f"epoch {self.epoch}/{self.cfg.train.epoch_max} step {self.step}: "
                     f"train loss {train['loss']:.2f}, val loss {val['loss']:.2f}, {quality}, "
                     f"perplexity {val['perplexity']:.1f}, "
                     f"{self.train_seconds:.1f}s + {val_seconds:.1f}s")


def append_test_records(run_dir, records):
    """Append test metrics to a run's metrics.jsonl (rewritten atomically)."""
    path = os.path.join(run_dir, runs.METRICS_FILE)
    write_jsonl(path, read_jsonl(path) + records)
