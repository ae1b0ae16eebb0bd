"""One function per mode of the command line: what main.py calls once it has parsed flags.

* ``summary``: the resolved config and the parameter counts.
* ``train``: a new run, or ``--resume`` of one, then the test split with its best weights.
* ``test_run``: ``-ts RUN`` (a run folder of this tool or of the authors' release), with
  ``--report`` and ``--encode``.

Everything here raises the project's one-line errors (ConfigError, DatasetError,
RunError, DeviceError: input the user can fix; TrainingError: the run cannot go on) or
Interrupted (Ctrl-C or SIGTERM, with the resume command where there is one).
"""
import os
import shlex
import sys

import torch

import data
from configs import ConfigError, config_to_yaml, is_sample_data
from networks import build_model, count_parameters
from util import distributed as dist
from util.io import check_writable
from util.rng import seed_everything
from util.signals import interrupt_status

from . import release_format, runs
from .budget import check_batch
from .logs import Display
from .loop import Interrupted, Trainer, TrainingError


def summary(cfg):
    print(config_to_yaml(cfg), end="")
    counts = count_parameters(build_model(cfg))
    print(f"params total={counts['total']} encoder={counts['encoder']} "
          f"decoder={counts['decoder']}")
    return 0


def run_command(program, config_file, flag, run_dir, *more):
    """`PYTHON main.py -c CONFIG FLAG RUN ...` with absolute paths, and the interpreter that
    runs us (a bare `python` may be another one, without our packages): runnable from any
    folder."""
    config = os.path.abspath(config_file) if os.path.isfile(config_file) else config_file
    return shlex.join([sys.executable or "python", os.path.abspath(program), "-c", config,
                       flag, os.path.abspath(run_dir), *more])


def resume_command(program, config_file, run_dir):
    return run_command(program, config_file, "--resume", run_dir)


def sample_note(loaders):
    """What a run on the shipped MNIST sample says once, before it trains."""
    sizes = ", ".join(f"{loaders[s].dataset_size:,} {s}" for s in ("train", "val", "test")
                      if s in loaders)
    return ("data: the MNIST sample shipped in tests/data/MNIST (" + sizes + " images): a "
            "first run, not the paper's setting. For that, train -c mnist_gauss_1.yaml on the "
            "full MNIST (50,000 train, 10,000 val, 10,000 test), downloaded into "
            "./datasets/MNIST/raw/ on first use (or put its four files there)")


def check_training_batches(cfg, loader, limit):
    """Refuse, before any run folder exists, an epoch without a single training step."""
    if len(loader) == 0 or limit == 0:
        raise ConfigError(
            f"no training batch: {loader.num_samples} training images on this process make "
            f"no batch of {loader.batch_size} with train.drop_last True; lower train.bs or "
            "set train.drop_last False")


def train(cfg, device, *, program, config_file, opts=(), save=False, resume=None, seed=None,
          limit_batches=None, dbg=False):
    """Train (or resume) one run, then evaluate its best weights on the test split."""
    run_dir, lock, resume_state, recorded = None, None, None, None
    if resume:
        run_dir = runs.resolve_run_dir(cfg, resume, "--resume")
        runs.check_links(run_dir)
        if dist.is_main():
            # Before reading current.pt: another writer would change it under our feet.
            lock = runs.writer_lock(run_dir)
        try:
            run_cfg = runs.load_run_config(run_dir, opts)
            runs.check_same_experiment(run_cfg, cfg, run_dir, config_file)
            cfg = run_cfg
            resume_state = runs.load_checkpoint(os.path.join(run_dir, runs.CURRENT))
            recorded = runs.read_dataset_files(run_dir)
            # A malformed metrics.jsonl stops us before any work.
            records = runs.read_metrics(run_dir)
            # The seed and epoch length are part of the run: an exact resume needs the same.
            seed, limit_batches = runs.resume_launch(resume_state, seed, limit_batches)
            last_epoch = resume_state["epoch"] - 1
            if last_epoch >= cfg.train.epoch_max and runs.final_test_recorded(records,
                                                                              last_epoch):
                if dist.is_main():
                    epochs = f"{last_epoch} epoch" + "s" * (last_epoch != 1)
                    print(f"{run_dir} is finished: trained {epochs} (train.epoch_max "
                          f"{cfg.train.epoch_max}) and tested; nothing to do (to train "
                          "further, resume with a larger train.epoch_max)")
                if lock is not None:
                    lock.release()
                return 0
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    elif save:
        problem = check_writable(cfg.path_checkpoint)
        if problem:
            raise runs.RunError(f"{problem}; set a writable `path` (override or "
                                "SQVAE_CHECKPOINTS) before training")
    seed = 0 if seed is None else seed
    try:
        seed_everything(seed)
        model = build_model(cfg).to(device)
        if dist.world_size() > 1:
            # Same initial weights everywhere, but each process draws its own Gumbel noise.
            torch.manual_seed(seed + dist.rank())
        loaders = data.build_loaders(cfg, device, seed, recorded=recorded)
        if is_sample_data(cfg) and dist.is_main():
            print(sample_note(loaders), flush=True)
        check_training_batches(cfg, loaders["train"], limit_batches)
        check_batch(cfg, model, loaders["train"], device)
        if save and run_dir is None:
            created = (runs.create_run_dir(cfg, seed, files=data.recorded_files(loaders))
                       if dist.is_main() else (None, None))
            run_dir, lock = dist.broadcast_object(created[0]), created[1]
        command = resume_command(program, config_file, run_dir) if run_dir else None
        display = Display(dbg=dbg, labels=model.OUTPUTS == "labels",
                          tensorboard_dir=run_dir and os.path.join(run_dir, "tensorboard"))
        trainer = Trainer(cfg, model, loaders, device, run_dir, limit_batches=limit_batches,
                          display=display, resume_command=command,
                          launch={"seed": seed, "limit_batches": limit_batches})
        display.start(cfg.model.name, run_dir)
        if resume_state is not None:
            trainer.load_state_dict(resume_state, os.path.join(run_dir, runs.CURRENT))
            display.log(f"resuming {run_dir} at epoch {trainer.epoch}, step {trainer.step}")
        trainer.fit()
        dist.barrier()  # best.pt is written by the main process; the others read it next

        epoch, step = trainer.epoch - 1, trainer.step  # no run folder: the final weights
        if run_dir is not None:
            best = runs.load_checkpoint(os.path.join(run_dir, runs.BEST))
            runs.load_model_weights(model, best["model"], os.path.join(run_dir, runs.BEST))
            epoch, step = best["epoch"], best.get("step", step)
        model.to(device)
        display.best_loaded(run_dir)
        records = trainer.test(epoch, step=step)
        if run_dir is not None and dist.is_main():
            runs.append_metrics(run_dir, records)
        display.close()
    except (MemoryError, RuntimeError) as e:
        # An allocation the machine refused (the CPU allocator raises a RuntimeError, CUDA
        # an OutOfMemoryError, Python a MemoryError): the machine's limit, one line.
        if not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)
                or type(e).__name__ == "OutOfMemoryError"):
            raise
        where = (f"; the run resumes from its last checkpoint: "
                 f"{resume_command(program, config_file, run_dir)}"
                 if run_dir is not None and os.path.isfile(os.path.join(run_dir, runs.CURRENT))
                 else "")
        raise TrainingError(f"out of memory on {torch.device(device).type} (train.bs "
                            f"{cfg.train.bs}): lower train.bs or free memory{where}") from None
    except OSError as e:
        # A full disk or a read-only folder: main.py's line says "then resume", which only
        # holds once a current.pt exists.
        if run_dir is None or not os.path.isfile(os.path.join(run_dir, runs.CURRENT)):
            e.hint = ("; free space or fix the folder's permissions, then run the command "
                      "again (no checkpoint was written, nothing to resume)")
        raise
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM outside the training loop (start-up, the final test): the last
        # current.pt is intact, so the run resumes from it.
        code, what = interrupt_status(e)
        resumable = run_dir is not None and os.path.isfile(os.path.join(run_dir, runs.CURRENT))
        raise Interrupted(code, f"{what}; " + (
            f"resume with: {resume_command(program, config_file, run_dir)}" if resumable
            else "no checkpoint was written, nothing to resume")) from None
    finally:
        if lock is not None:
            lock.release()
    return 0


def test_run(cfg, device, *, run, opts=(), seed=None, limit_batches=None, dbg=False,
             report=False, encode=None, prior=False, sample=None, images=None, program=None,
             config_file=None):
    """-ts RUN: the run's best.pt on the test split, with the run's own saved config; the
    records are appended to its metrics.jsonl (not in a run folder of the authors' release,
    which stays byte for byte as it was: there --report and --encode are refused).
    With --images DIR, on every picture under DIR instead (records "split": "images").
    With --prior and/or --sample N, the prior's jobs instead (trainer/prior.py)."""
    run_dir = runs.resolve_run_dir(cfg, run, "-ts")
    runs.check_links(run_dir)
    if prior or sample:
        # The same command again continues an interrupted prior (the prior's settings are
        # also kept in its checkpoint, so a plain -ts RUN --prior does as well).
        again = ["--prior", *(["--seed", str(seed)] if seed is not None else []),
                 *(["--limit-batches", str(limit_batches)] if limit_batches else []), *opts]
        return prior_and_samples(run_dir, device, opts=opts, seed=seed, train=prior,
                                 sample=sample, limit_batches=limit_batches,
                                 command=run_command(program, config_file, "-ts", run_dir,
                                                     *again))
    if (report or encode) and release_format.is_release_run(run_dir):
        raise runs.RunError(release_writes(run_dir, "--report" if report else "--encode"))
    try:
        run_cfg, model, best = runs.load_run_model(run_dir, opts, device)
        runs.read_metrics(run_dir)  # a malformed metrics.jsonl stops us before any work
        recorded = runs.read_dataset_files(run_dir)
        if images:
            return test_images(run_dir, run_cfg, model, best, device, folder=images, dbg=dbg,
                               limit_batches=limit_batches, encode=encode)
        loaders = data.build_loaders(run_cfg, device, seed or 0, splits=("test",),
                                     recorded=recorded)
        display = Display(dbg=dbg, labels=model.OUTPUTS == "labels")
        trainer = Trainer(run_cfg, model, loaders, device, None, limit_batches=limit_batches,
                          display=display)
        records = trainer.test(best["epoch"], source="-ts")
        if not dist.is_main():
            return 0
        record_unless_release(run_dir, records)
        if encode or report:
            write_outputs(run_dir, run_cfg, model, device, report=report, encode=encode,
                          recorded=recorded)
    except KeyboardInterrupt as e:
        code, what = interrupt_status(e)
        raise Interrupted(code, f"{what}; the evaluation's records were not written, "
                                "run -ts again") from None
    return 0


def test_images(run_dir, cfg, model, best, device, *, folder, dbg, limit_batches, encode):
    """-ts RUN --images DIR: the run's best.pt on every picture under DIR (sorted file
    order, the run's image shape); its records ("split": "images", with the folder) are
    appended to the run's metrics.jsonl, except in a release run folder, which is left
    untouched. With --encode images, codes_images.npz holds one row of codes per picture
    and the pictures' names."""
    loader = data.build_picture_loader(cfg, folder, batch_size=cfg.test.bs, device=device,
                                       rank=dist.rank(), world_size=dist.world_size())
    display = Display(dbg=dbg, labels=model.OUTPUTS == "labels")
    trainer = Trainer(cfg, model, {"images": loader}, device, None, limit_batches=limit_batches,
                      display=display)
    folder = os.path.abspath(folder)
    records = trainer.test(best["epoch"], split="images", source="-ts", folder=folder,
                           pictures=loader.dataset_size)
    if not dist.is_main():
        return 0
    record_unless_release(run_dir, records)
    if encode:
        from . import export
        # Every picture (whatever --limit-batches or torchrun say), in file order.
        whole = data.build_picture_loader(cfg, folder, batch_size=cfg.test.bs, device=device)
        codes = export.encode_split(model, whole)
        path = export.write_codes(run_dir, cfg, "images", codes, model, names=whole.names)
        print(f"codes of the {len(whole.names)} pictures under {folder} {codes.shape}: {path}")
    return 0


def record_unless_release(run_dir, records):
    """-ts records go to the run's metrics.jsonl; a run folder of the authors' release is
    left untouched, and the line says so."""
    if release_format.is_release_run(run_dir):
        print(f"not recorded: {run_dir} is a run folder of the authors' release, which "
              "is left untouched (python -m trainer.release import makes it a run of "
              "ours, whose -ts records go to its metrics.jsonl)")
    else:
        runs.append_metrics(run_dir, records)


def release_writes(run_dir, flag):
    """Why `flag`, which writes files into the run folder, refuses a release run folder."""
    return (f"{flag} writes into the run folder, and {run_dir} is a run folder of the "
            "authors' release, which is left untouched; make it a run of ours first with "
            "python -m trainer.release import RUN --to DIR, then use DIR")


def prior_and_samples(run_dir, device, *, opts, seed, train, sample, limit_batches, command):
    from . import prior as priors
    if release_format.is_release_run(run_dir):
        raise runs.RunError(release_writes(run_dir, "--prior" if train else "--sample"))
    if dist.world_size() > 1:
        raise ConfigError("--prior and --sample run in one process; start them without "
                          "torchrun")
    run_cfg, model, _ = runs.load_run_model(run_dir, opts, device)
    seed = 0 if seed is None else seed
    if train:
        priors.train_prior(run_dir, run_cfg, model, device, seed=seed, opts=opts,
                           command=command, limit_batches=limit_batches)
    if sample:
        try:
            paths = priors.write_samples(run_dir, run_cfg, model, sample, device, seed=seed,
                                         display=Display())
        except KeyboardInterrupt as e:
            code, what = interrupt_status(e)
            raise Interrupted(code, f"{what}; no samples were written (the files of an "
                                    "earlier --sample are as they were), run it again") from None
        print(f"{sample} samples: {paths[0]} (codes: {paths[1]})")
    return 0


def write_outputs(run_dir, cfg, model, device, *, report=False, encode=None, recorded=None):
    """--encode SPLIT and --report, on whole splits in dataset order (whatever
    --limit-batches or torchrun say); `recorded`: the files the run's splits read."""
    from . import export
    from . import report as reports

    test_codes = None
    if encode:
        codes = export.encode_split(model, export.whole_split(cfg, encode, device, recorded))
        path = export.write_codes(run_dir, cfg, encode, codes, model)
        print(f"codes of the {encode} split {codes.shape}: {path}")
        test_codes = codes if encode == "test" else None
    if report:
        written = reports.write_report(run_dir, cfg, model,
                                      export.whole_split(cfg, "test", device, recorded),
                                      test_codes)
        print(f"report: {written['report']['path']}", file=sys.stdout)
