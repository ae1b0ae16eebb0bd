"""``-ts RUN --prior``: a PixelCNN prior (networks/prior.py) fitted to the deterministic code
grids of the training split, early-stopped on the validation NLL, continued from
``prior_current.pt``; ``-ts RUN --sample N``. docs/usage.md, "A prior over the codes"."""
import contextlib
import math
import os
import time

import numpy as np
import torch

from configs import parse_overrides
from data.loader import epoch_order
from networks.prior import GatedPixelCNN, build_prior, code_nll
from util.codes import CodeUsage

from . import export, runs
from .logs import Display
from .loop import interrupted_says

PRIOR_BEST, PRIOR_CURRENT = "prior.pt", "prior_current.pt"
SAMPLES_IMAGE = "samples.png"  # the codes go to codes_samples.npz (export.write_codes)
# What each prior checkpoint must hold, key -> types (runs.load_checkpoint checks it).
BEST_KEYS = {"prior": dict, "epoch": int, "architecture": dict}
CURRENT_KEYS = {"prior": dict, "optimizer": dict, "epoch": int, "best_nll": runs.NUMBER,
                "best_epoch": int, "bad_epochs": int, "history": list, "done": bool,
                "seconds": runs.NUMBER, "seed": int}
# What shapes the weights or the trajectory: a continued prior keeps these (not epoch_max...).
FIXED_SETTINGS = ("channels", "layers", "kernel", "lr", "bs")
SAMPLE_CHUNK = 1024  # grids drawn at once by --sample (memory: chunk x K x H x W logits)


@torch.no_grad()
def mean_nll(prior, codes, batch_size, limit=None):
    """NLL in nats per position over `codes` (all batches, or the first `limit`)."""
    prior.eval()
    batches = [codes[i:i + batch_size] for i in range(0, len(codes), batch_size)[:limit]]
    nats = sum(float(code_nll(prior(batch), batch, reduction="sum")) for batch in batches)
    return nats / sum(batch.numel() for batch in batches)


class PriorTraining:
    """Fit, early-stop and checkpoint the prior of one run folder."""

    def __init__(self, cfg, run_dir, device, seed, display, limit_batches=None, grid=None):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.seed, self.display, self.limit = seed, display, limit_batches
        # Weights drawn from `seed` by a generator of their own, not the global RNG.
        self.prior = build_prior(cfg, grid, torch.Generator().manual_seed(seed)).to(device)
        self.optimizer = torch.optim.Adam(self.prior.parameters(), lr=cfg.prior.lr)
        self.epoch, self.best_nll, self.best_epoch, self.bad_epochs = 0, math.inf, 0, 0
        self.history, self.seconds = [], 0.0

    @property
    def done(self):
        # Computed, never loaded: a raised prior.epoch_max (or patience) continues a prior.
        return self.epoch >= self.cfg.prior.epoch_max or self.bad_epochs >= self.cfg.prior.patience

    def state_dict(self):
        return {"prior": self.prior.state_dict(), "optimizer": self.optimizer.state_dict(),
                **{key: getattr(self, key) for key in CURRENT_KEYS
                   if key not in ("prior", "optimizer")},
                "settings": dict(self.cfg.prior)}

    def load(self, state):
        """Continue from `state` (prior_current.pt)."""
        try:
            self.prior.load_state_dict(state["prior"])
        except RuntimeError:
            path = os.path.join(self.run_dir, PRIOR_CURRENT)
            raise runs.RunError(f"checkpoint {path} does not match the prior section of the "
                                "config; delete it (and prior.pt) to train again") from None
        self.optimizer.load_state_dict(state["optimizer"])
        for key in CURRENT_KEYS.keys() - {"prior", "optimizer", "done"}:
            setattr(self, key, state[key])

    def train_epoch(self, codes):
        self.prior.train()
        bs = self.cfg.prior.bs
        # The loaders' shuffle, a function of (seed, epoch): a continued prior trains as one run.
        order = epoch_order(len(codes), shuffle=True, seed=self.seed, epoch=self.epoch)
        order = order.to(self.device)
        starts = range(0, len(codes), bs)[:self.limit]
        total = torch.zeros((), device=self.device)  # read once per epoch: no per-step sync
        with self.display.progress(len(starts) * bs, f"prior epoch {self.epoch}") as bar:
            for start in starts:
                batch = codes[order[start:start + bs]]
                loss = self.prior.nll(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += loss.detach()
                bar.update(len(batch))
        return float(total) / len(starts)

    def fit(self, train_codes, val_codes):
        cfg = self.cfg.prior
        # The x-axis of TensorBoard's prior/ scalars: the prior's optimizer steps.
        steps_per_epoch = len(range(0, len(train_codes), cfg.bs)[:self.limit])
        while not self.done:
            self.epoch += 1
            start = time.perf_counter()
            train_nll = self.train_epoch(train_codes)
            val_nll = mean_nll(self.prior, val_codes, cfg.bs, self.limit)
            self.seconds += time.perf_counter() - start
            improved = val_nll < self.best_nll
            if improved:
                self.best_nll, self.best_epoch, self.bad_epochs = val_nll, self.epoch, 0
                # The layers as built (prior.layers 0 lets the grid choose): no config needed.
                runs.save_checkpoint(os.path.join(self.run_dir, PRIOR_BEST), {
                    "prior": self.prior.state_dict(), "epoch": self.epoch, "architecture": {
                        "channels": self.prior.channels, "layers": len(self.prior.layers),
                        "kernel": self.prior.kernel}})
            else:
                self.bad_epochs += 1
            entry = {"split": "prior", "epoch": self.epoch, "step": self.epoch * steps_per_epoch,
                     "train_nll": train_nll, "val_nll": val_nll}
            self.history.append(entry)
            self.display.records([entry])
            best = "" if improved else f" (best {self.best_nll:.4f}, epoch {self.best_epoch})"
            self.display.log(f"prior epoch {self.epoch}/{cfg.epoch_max}: train nll "
                             f"{train_nll:.4f}, val nll {val_nll:.4f} nats/position{best}")
            runs.save_checkpoint(os.path.join(self.run_dir, PRIOR_CURRENT), self.state_dict())


def load_prior(cfg, run_dir, device):
    """The prior with the weights of the run's prior.pt, in eval mode."""
    path = os.path.join(run_dir, PRIOR_BEST)
    if not os.path.exists(path):
        raise runs.RunError(f"{run_dir} has no {PRIOR_BEST}; train one first with -ts RUN --prior")
    state = runs.load_checkpoint(path, BEST_KEYS)
    try:
        prior = GatedPixelCNN(cfg.quantization.size_dict, **state["architecture"])
        prior.load_state_dict(state["prior"])
    except (TypeError, ValueError, RuntimeError):
        raise runs.RunError(f"checkpoint {path} is not a prior of this run; train it again "
                            "with --prior") from None
    return prior.to(device).eval()


def continued_settings(cfg, state, opts, path):
    """`cfg` with the prior section `state` (prior_current.pt) was trained with and the prior
    overrides of `opts` on top; a RunError names an override the prior cannot take."""
    saved = state.get("settings") if state is not None else None
    if not isinstance(saved, dict):
        return cfg  # no prior yet, or one saved before its settings were kept
    given = {key.split(".", 1)[1] for key, _ in parse_overrides(opts) if key.startswith("prior.")}
    for key in given.intersection(FIXED_SETTINGS, saved):
        if cfg.prior[key] != saved[key]:
            raise runs.RunError(
                f"{path} was trained with prior.{key} {saved[key]}, not {cfg.prior[key]}; "
                f"drop the prior.{key} override to continue it, or delete {PRIOR_CURRENT} "
                f"and {PRIOR_BEST} to train a new prior")
    merged = cfg.clone()
    merged.defrost()  # the saved settings, but for the prior overrides given
    merged.prior.update({k: v for k, v in saved.items() if k in cfg.prior and k not in given})
    merged.freeze()
    return merged


def train_prior(run_dir, cfg, model, device, *, seed, command, opts=(), limit_batches=None):
    """-ts RUN --prior: train (or continue) the prior, then append its prior_test record."""
    lock = runs.writer_lock(run_dir)  # checkpoints go into the run folder
    display = Display(tensorboard_dir=os.path.join(run_dir, runs.TENSORBOARD))
    with lock, contextlib.closing(display), interrupted_says(f"continue with: {command}"):
        runs.read_metrics(run_dir)  # a malformed metrics.jsonl stops us before any work
        path = os.path.join(run_dir, PRIOR_CURRENT)
        state = runs.load_checkpoint(path, CURRENT_KEYS) if os.path.exists(path) else None
        cfg = continued_settings(cfg, state, opts, path)
        training = PriorTraining(cfg, run_dir, device, seed, display, limit_batches,
                                 grid=model.latent_shape)
        if state is not None:
            training.load(state)
            display.log(f"prior: continuing {PRIOR_CURRENT} after epoch {training.epoch}"
                        + (" (finished: evaluating only)" if training.done else ""))
        recorded = runs.read_dataset_files(run_dir)
        codes = {split: export.encode_split(model, export.whole_split(cfg, split, device, recorded))
                 for split in ("train", "val", "test")}  # the deterministic grids of whole splits
        codes = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in codes.items()}
        training.fit(codes["train"], codes["val"])
        prior = load_prior(cfg, run_dir, device)
        size, positions = cfg.quantization.size_dict, math.prod(codes["test"].shape[1:])
        nats = {"nll": mean_nll(prior, codes["test"], cfg.prior.bs, limit_batches),
                "unigram": CodeUsage.from_codes(codes["train"].cpu().numpy(), size).entropy,
                "uniform": math.log(size)}
        record = {"split": "prior_test", "epoch": training.best_epoch, **nats,
                  **{f"{k}_bpd": v * positions / (cfg.dataset.dim_x * math.log(2))
                     for k, v in nats.items()},
                  "prior_epochs": training.epoch, "seconds": training.seconds}
        runs.append_metrics(run_dir, [record])
        display.log(f"prior test (epoch {training.best_epoch}): nll {nats['nll']:.4f}, unigram "
                    f"{nats['unigram']:.4f}, uniform {nats['uniform']:.4f} nats/position; "
                    f"{record['nll_bpd']:.4f} bits/dim; trained {training.seconds:.1f}s")
        return record


def write_samples(run_dir, cfg, model, n, device, *, seed, display=None):
    """-ts RUN --sample N: N grids from the prior, decoded; writes and returns the two paths."""
    prior = load_prior(cfg, run_dir, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    with (display or Display()).progress(n, "sampling") as bar:
        for start in range(0, n, SAMPLE_CHUNK):
            size = min(SAMPLE_CHUNK, n - start)
            chunks.append(prior.sample(size, *model.latent_shape, temperature=cfg.prior.temperature,
                                       generator=generator).cpu())
            bar.update(size)
    codes = torch.cat(chunks).numpy()
    decoded = export.decode_indices(model, codes, device)
    shown = export.displayable(decoded, model.OUTPUTS == "labels")
    image_path = os.path.join(run_dir, SAMPLES_IMAGE)
    export.write_png(shown, [image_path], nrow=math.ceil(math.sqrt(n)))  # via make_grid
    return image_path, export.write_codes(run_dir, cfg, "samples", codes.astype(np.uint16), model)
