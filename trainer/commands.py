"""What main.py calls: `summary`, `train` (a run or ``--resume``, then its test with the best
weights), `test_run` (``-ts RUN``); one-line errors or Interrupted (docs/failures.md)."""
import contextlib
import os
import shlex
import sys

import torch

import data
from configs import ConfigError, config_to_yaml, get_key, is_sample_data
from networks import build_model, count_parameters
from util import distributed as dist
from util.io import check_writable
from util.device import free_memory, get_rng_state, seed_everything, set_rng_state

from . import loop, release_format, runs
from .logs import Display
from .loop import Trainer, TrainingError, interrupted_says
from .meters import evaluate

GIB, MIB = 2 ** 30, 2 ** 20


def summary(cfg):
    print(config_to_yaml(cfg), end="")
    counts = count_parameters(build_model(cfg))
    print(f"params total={counts['total']} encoder={counts['encoder']} decoder={counts['decoder']}")
    return 0


class Job:
    """A command's run folder, once there is one, and `line`: `PYTHON main.py -c CONFIG FLAG RUN
    ...` from any folder (absolute paths; our interpreter: `python` may lack our packages)."""

    def __init__(self, program, config_file, run_dir=None):
        self.program, self.config_file, self.run_dir = program, config_file, run_dir

    def line(self, flag, *more):
        config = self.config_file
        return shlex.join([sys.executable or "python", os.path.abspath(self.program), "-c",
                           os.path.abspath(config) if os.path.isfile(config) else config, flag,
                           os.path.abspath(self.run_dir), *more])

    def resumable(self):
        return self.run_dir is not None and os.path.isfile(os.path.join(self.run_dir, runs.CURRENT))


def train(cfg, device, *, program, config_file, opts=(), save=False, resume=None, seed=None,
          limit_batches=None, dbg=False):
    """Train (or resume) one run, then evaluate its best weights on the test split."""
    job, state, recorded = Job(program, config_file), None, None
    with contextlib.ExitStack() as held:
        if resume:
            job.run_dir = runs.resolve_run_dir(cfg, resume, "--resume")
            runs.check_links(job.run_dir)
            if dist.is_main():  # before reading current.pt: another writer would change it
                held.enter_context(runs.writer_lock(job.run_dir))
            cfg, state, recorded, seed, limit_batches = prepare_resume(
                job.run_dir, cfg, opts, config_file, seed, limit_batches)
            if state is None:
                return 0
        elif save and (problem := check_writable(cfg.path_checkpoint)):
            raise runs.RunError(f"{problem}; set a writable `path` (override or "
                                "SQVAE_CHECKPOINTS) before training")
        seed = 0 if seed is None else seed
        with errors_as_lines(cfg, device, job):
            model, loaders = prepare_training(cfg, device, seed, recorded)
            if save and job.run_dir is None:
                path, lock = (runs.create_run_dir(cfg, seed, files=data.recorded_files(loaders))
                              if dist.is_main() else (None, None))
                job.run_dir = dist.broadcast_object(path)
                held.enter_context(lock or contextlib.nullcontext())
            fit_and_test(cfg, device, job, model, loaders, state, dbg=dbg,
                         launch={"seed": seed, "limit_batches": limit_batches})
    return 0


# Keys that tell experiment files apart: a resume under another file is refused (sizes and
# path_specific may have been overridden at the start, and live in the run's config).
IDENTITY_KEYS = ("dataset.name", "model.name", "model.param_var_q", "network.name")


def prepare_resume(run_dir, cfg, opts, config_file, seed, limit_batches):
    """(run config, current.pt or None if finished, its splits' files, seed, epoch length)."""
    run_cfg = runs.load_run_config(run_dir, opts)
    for k in IDENTITY_KEYS:
        if get_key(run_cfg, k) != get_key(cfg, k):
            raise runs.RunError(
                f"--resume {run_dir}: that run was trained with a different experiment "
                f"({k} = {get_key(run_cfg, k)!r}, but {config_file} has {get_key(cfg, k)!r}); "
                "pass the experiment file the run was started with")
    state = runs.load_checkpoint(os.path.join(run_dir, runs.CURRENT))
    recorded = runs.read_dataset_files(run_dir)
    records = runs.read_metrics(run_dir)  # a malformed metrics.jsonl stops us before any work
    # The seed and epoch length are part of the run: an exact resume needs the same.
    launch = state.get("launch", {"seed": 0, "limit_batches": None})
    if seed is not None and seed != launch["seed"]:
        raise runs.RunError(f"--resume: this run was started with --seed {launch['seed']}; "
                            "drop --seed (a resume always uses the run's own seed)")
    was = launch["limit_batches"]
    if limit_batches is not None and limit_batches != was:
        raise runs.RunError(f"--resume: this run was started with "
                            f"{f'--limit-batches {was}' if was else 'full epochs'}; drop "
                            "--limit-batches (a resume keeps the run's epoch length)")
    # Finished: the training's own test (a "test" record without "source") follows the "val"
    # record of its last epoch.
    last_epoch = state["epoch"] - 1
    last_val = [i for i, r in enumerate(records)
                if r.get("split") == "val" and r.get("epoch") == last_epoch]
    if last_epoch >= run_cfg.train.epoch_max and last_val and any(
            r.get("split") == "test" and "source" not in r for r in records[last_val[0]:]):
        if dist.is_main():
            epochs = f"{last_epoch} epoch" + "s" * (last_epoch != 1)
            print(f"{run_dir} is finished: trained {epochs} (train.epoch_max "
                  f"{run_cfg.train.epoch_max}) and tested; nothing to do (to train further, "
                  "resume with a larger train.epoch_max)")
        state = None
    return run_cfg, state, recorded, launch["seed"], was


def prepare_training(cfg, device, seed, recorded):
    """The seeded model and loaders; a batch that cannot work refused before any run folder."""
    seed_everything(seed)
    model = build_model(cfg).to(device)
    if dist.world_size() > 1:
        # Same initial weights everywhere, but each process draws its own Gumbel noise.
        torch.manual_seed(seed + dist.rank())
    loaders = data.build_loaders(cfg, device, seed, recorded=recorded)
    if is_sample_data(cfg) and dist.is_main():
        sizes = ", ".join(f"{loader.dataset_size:,} {split}" for split, loader in loaders.items())
        print("data: the MNIST sample shipped in tests/data/MNIST (" + sizes + " images): a "
              "first run, not the paper's setting. For that, train -c mnist_gauss_1.yaml on "
              "the full MNIST (50,000 train, 10,000 val, 10,000 test), downloaded into "
              "./datasets/MNIST/raw/ on first use (or put its four files there)", flush=True)
    train = loaders["train"]
    batch, images = train.batch_size, train.num_samples
    if len(train) == 0:
        raise ConfigError(f"no training batch: {images} training images on this process make "
                          f"no batch of {batch} with train.drop_last True; lower train.bs or "
                          "set train.drop_last False")
    if batch > images:
        raise ConfigError(f"train.bs {cfg.train.bs} makes batches of {batch} images, more than "
                          f"the {images} training images of this process; set train.bs to "
                          f"at most {images}")
    available = free_memory(device)
    per_image = None if available is None else activation_bytes_per_image(cfg, model, device)
    if per_image is not None and per_image * batch > available:
        raise ConfigError(
            f"train.bs {cfg.train.bs}: a batch of {batch} images needs at least "
            f"{per_image * batch / GIB:.1f} GiB for its activations ({per_image / MIB:.2f} MiB "
            f"per image), but {torch.device(device).type} has {available / GIB:.1f} GiB free; "
            f"set train.bs to at most {max(1, available // per_image)}")
    return model, loaders


def fit_and_test(cfg, device, job, model, loaders, state, *, dbg, launch):
    """Train, then the test split with the best weights (the final ones without a folder)."""
    run_dir = job.run_dir
    display = Display(dbg=dbg, labels=model.OUTPUTS == "labels",
                      tensorboard_dir=run_dir and os.path.join(run_dir, runs.TENSORBOARD))
    trainer = Trainer(cfg, model, loaders, device, run_dir, display=display, launch=launch,
                      limit_batches=launch["limit_batches"],
                      resume_command=run_dir and job.line("--resume"))
    display.start(cfg.model.name, run_dir)
    if state is not None:
        loop.resume(trainer, state, os.path.join(run_dir, runs.CURRENT))
        display.log(f"resuming {run_dir} at epoch {trainer.epoch}, step {trainer.step}")
    trainer.fit()
    dist.barrier()  # best.pt is written by the main process; the others read it next
    epoch, step = trainer.epoch - 1, trainer.step
    if run_dir is not None:
        best = runs.load_checkpoint(os.path.join(run_dir, runs.BEST))
        runs.load_model_weights(model, best["model"], os.path.join(run_dir, runs.BEST))
        epoch, step = best["epoch"], best.get("step", step)
    model.to(device)
    display.best_loaded(run_dir)
    records = evaluate(trainer.eval_model, loaders["test"], "test", epoch, step=step,
                       limit=launch["limit_batches"], display=display)
    if run_dir is not None and dist.is_main():
        runs.append_metrics(run_dir, records)
    display.close()


@torch.no_grad()
def activation_bytes_per_image(cfg, model, device):
    """Bytes of the outputs of the model's leaf modules (and the input) for one image."""
    x = torch.zeros(1, *cfg.dataset.shape, device=device,
                    dtype=torch.long if model.OUTPUTS == "labels" else torch.float32)
    total = [x.numel() * x.element_size()]

    def count(module, inputs, output):
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total.append(out.numel() * out.element_size())
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    was_training, rng = model.training, get_rng_state()
    try:
        model.eval()  # no batch-norm statistics or EMA codebook updates
        model(x, "deterministic")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        set_rng_state(rng)
    # bf16 autocast halves the convolutions' outputs at most.
    return sum(total) // 2 if cfg.train.amp else sum(total)


@contextlib.contextmanager
def errors_as_lines(cfg, device, job):
    """What stops a training, as the one line that says whether and how it resumes."""
    try:
        # Ctrl-C outside the training loop (start-up, the final test): current.pt is intact.
        with interrupted_says(lambda: f"resume with: {job.line('--resume')}" if job.resumable()
                              else "no checkpoint was written, nothing to resume"):
            yield
    except (MemoryError, RuntimeError) as e:  # the CPU allocator's, CUDA's, Python's
        if not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)
                or type(e).__name__ == "OutOfMemoryError"):
            raise
        where = (f"; the run resumes from its last checkpoint: {job.line('--resume')}"
                 if job.resumable() else "")
        raise TrainingError(f"out of memory on {torch.device(device).type} (train.bs "
                            f"{cfg.train.bs}): lower train.bs or free memory{where}") from None
    except OSError as e:
        # main.py's line for a full disk says "then resume", which needs a current.pt.
        if not job.resumable():
            e.hint = ("; free space or fix the folder's permissions, then run the command "
                      "again (no checkpoint was written, nothing to resume)")
        raise


def test_run(cfg, device, *, run, opts=(), seed=None, limit_batches=None, dbg=False,
             report=False, encode=None, prior=False, sample=None, images=None, program=None,
             config_file=None):
    """-ts RUN: best.pt on the test split (or --images DIR), recorded unless a release folder."""
    run_dir = runs.resolve_run_dir(cfg, run, "-ts")
    runs.check_links(run_dir)
    release = release_format.is_release_run(run_dir)
    writes = [flag for flag, given in (("--prior", prior), ("--sample", sample),
                                       ("--report", report), ("--encode", encode)) if given]
    if writes and release:
        raise runs.RunError(f"{writes[0]} writes into the run folder, and {run_dir} is a run "
                            "folder of the authors' release, which is left untouched; make it "
                            "a run of ours first with python -m trainer.release import RUN "
                            "--to DIR, then use DIR")
    if prior or sample:
        return prior_and_samples(Job(program, config_file, run_dir), device, opts=opts, seed=seed,
                                 train=prior, sample=sample, limit_batches=limit_batches)
    with interrupted_says("the evaluation's records were not written, run -ts again"):
        run_cfg, model, best = runs.load_run_model(run_dir, opts, device)
        model.amp = run_cfg.train.amp  # evaluated in the precision it trained in
        runs.read_metrics(run_dir)  # a malformed metrics.jsonl stops us before any work
        recorded = runs.read_dataset_files(run_dir)
        split, extra = "test", {}
        if images:
            images = os.path.abspath(images)
            loader = data.build_picture_loader(run_cfg, images, batch_size=run_cfg.test.bs,
                device=device, rank=dist.rank(), world_size=dist.world_size())
            split, extra = "images", {"folder": images, "pictures": loader.dataset_size}
        else:
            loader = data.build_loaders(run_cfg, device, seed or 0, splits=("test",),
                                        recorded=recorded)["test"]
        records = evaluate(model, loader, split, best["epoch"], limit=limit_batches,
                           display=Display(dbg=dbg, labels=model.OUTPUTS == "labels"),
                           source="-ts", **extra)
        if dist.is_main():
            if release:
                print(f"not recorded: {run_dir} is a run folder of the authors' release, which "
                      "is left untouched (python -m trainer.release import makes it a run of "
                      "ours, whose -ts records go to its metrics.jsonl)")
            else:
                runs.append_metrics(run_dir, records)
            write_outputs(run_dir, run_cfg, model, device, report=report, encode=encode,
                          recorded=recorded, images=images)
    return 0


def write_outputs(run_dir, cfg, model, device, *, report, encode, recorded, images):
    """--encode SPLIT (images: the --images pictures, with their names) and --report, whole."""
    from . import export, report as reports
    codes, pictures = None, encode == "images"
    if encode:
        whole = (data.build_picture_loader(cfg, images, batch_size=cfg.test.bs, device=device)
                 if pictures else export.whole_split(cfg, encode, device, recorded))
        codes = export.encode_split(model, whole)
        path = export.write_codes(run_dir, cfg, encode, codes, model,
                                  names=whole.names if pictures else None)
        what = f"{len(whole.names)} pictures under {images}" if pictures else f"{encode} split"
        print(f"codes of the {what} {codes.shape}: {path}")
    if report:
        print("report:", reports.write_report(run_dir, cfg, model, export.whole_split(
            cfg, "test", device, recorded), codes if encode == "test" else None)["report"]["path"])


def prior_and_samples(job, device, *, opts, seed, train, sample, limit_batches):
    from . import prior as priors
    if dist.world_size() > 1:
        raise ConfigError("--prior and --sample run in one process; start them without torchrun")
    run_cfg, model, _ = runs.load_run_model(job.run_dir, opts, device)
    if train:
        # The same command again continues an interrupted prior.
        again = [*(["--seed", str(seed)] if seed is not None else []),
                 *(["--limit-batches", str(limit_batches)] if limit_batches else []), *opts]
        priors.train_prior(job.run_dir, run_cfg, model, device, seed=seed or 0, opts=opts,
                           command=job.line("-ts", "--prior", *again), limit_batches=limit_batches)
    if sample:
        with interrupted_says("no samples were written (the files of an earlier --sample are "
                              "as they were), run it again"):
            paths = priors.write_samples(job.run_dir, run_cfg, model, sample, device,
                                         seed=seed or 0, display=Display())
        print(f"{sample} samples: {paths[0]} (codes: {paths[1]})")
    return 0
