"""Run every GPU path of this project once and print one table; exit 1 if any failed.

    python benchmarks/gpu_check.py                 # all settings, about 2-5 minutes
    python benchmarks/gpu_check.py --only prior    # one setting (and what it needs)

Each setting is one short job of main.py (torchrun for the last one) in its own process,
on synthetic data written to a temporary folder in the real on-disk formats (1,200 MNIST
images, 160 CelebAMask-HQ label maps), so nothing is downloaded:

  default           one MNIST epoch (train.epoch_max 1), the release's cuDNN settings
  deterministic     the same with --deterministic
  cudnn-benchmark   the same with --cudnn-benchmark
  amp               the same with train.amp True (bf16 convolutions)
  compile           the same with train.compile True
  evaluate          -ts on the default run, with --encode test and --report
  prior             -ts --prior --deterministic, one prior epoch over its codes
  sample            -ts --sample 16 from that prior
  vmf               one celebamask_vmf epoch (vMF model, Bessel function, cached loader)
  torchrun          one MNIST epoch under torchrun on every visible GPU (nccl)
  celeba-copy       CelebA-sized uint8 batches copied to the GPU as the cached loader
                    does, from pinned memory (pinned) and, for comparison, pageable memory

Columns: setting | ok or failed | img/s | peak MB. img/s: training images per second of
the training loop (for compile, compilation included), test images per second of the two
test passes (evaluate), code grids per second of prior training (prior), samples per second
of the whole command (sample), batches' images per second (celeba-copy). peak MB:
torch.cuda.max_memory_allocated of the job's process (of the largest rank under torchrun).
The last lines of a failed job's stderr follow the table. A job gets what is left of a
7.5-minute budget (--budget), at most 4 minutes, so the whole stays under 8 minutes.

Without a CUDA GPU it prints one line and exits 0; --device cpu runs the same jobs on the
CPU instead (slow; torchrun then uses gloo), to try the script itself.
"""
import argparse
import glob
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
THIS = os.path.abspath(__file__)

MNIST_TRAIN, MNIST_TEST = 1200, 200  # official train (val is carved from it) and test
LABEL_MAPS = {"train": 96, "val": 32, "test": 32}
SAMPLES = 16
JOB_LIMIT_S = 240
TABLE_HEAD = "| setting | result | img/s | peak MB |\n|---|---|---|---|"


# ---------------------------------------------------------------- synthetic datasets

def _write_idx(path, array, code):
    # MNIST's idx format: zero, zero, the element type (8: unsigned byte), the rank, then
    # each dimension as a big-endian int32, then the bytes.
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_datasets(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    for prefix, n in (("train", MNIST_TRAIN), ("t10k", MNIST_TEST)):
        _write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"),
                   rng.integers(0, 256, (n, 28, 28)), 8)
        _write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, n), 8)
    for split, n in LABEL_MAPS.items():
        folder = os.path.join(root, "CelebAMask-HQ", f"{split}_label_64")
        os.makedirs(folder)
        for i in range(n):
            # Blocks of classes rather than noise: a label map has regions.
            blocks = rng.integers(0, 19, (8, 8), dtype=np.uint8)
            Image.fromarray(np.kron(blocks, np.ones((8, 8), np.uint8))).save(
                os.path.join(folder, f"{i}.png"))


# ---------------------------------------------------------------- the settings

def mnist_train_images(world=1):
    from data.sources import split_sizes
    n = split_sizes("MNIST", MNIST_TRAIN)[0]
    return math.ceil(n / world) * world  # each rank's share is padded to the same size


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_rate(images):
    """img/s of the training loop, from the run's "train" record; `images(ctx)` is how many
    training images one epoch takes."""
    def rate(job, ctx):
        (train,) = [r for r in records(job["run"]) if r["split"] == "train"]
        return images(ctx) / train["seconds"]
    return rate


def evaluate_rate(job, ctx):
    tests = [r for r in records(job["run"]) if r.get("source") == "-ts"]
    return 2 * MNIST_TEST / sum(r["seconds"] for r in tests[-2:])


def prior_rate(job, ctx):
    prior = [r for r in records(job["run"]) if r["split"] == "prior_test"][-1]
    return mnist_train_images() * prior["prior_epochs"] / prior["seconds"]


def mnist_training(*flags):
    return {"config": "mnist_gauss_1.yaml", "flags": list(flags), "train": True,
            "rate": training_rate(lambda ctx: mnist_train_images())}


SETTINGS = {
    "default": mnist_training(),
    "deterministic": mnist_training("--deterministic"),
    "cudnn-benchmark": mnist_training("--cudnn-benchmark"),
    "amp": mnist_training("train.amp", "True"),
    "compile": mnist_training("train.compile", "True"),
    "evaluate": {"config": "mnist_gauss_1.yaml", "needs": "default", "rate": evaluate_rate,
                 "flags": ["--encode", "test", "--report"]},
    "prior": {"config": "mnist_gauss_1.yaml", "needs": "default", "rate": prior_rate,
              "flags": ["--prior", "--deterministic", "prior.epoch_max", "1"]},
    "sample": {"config": "mnist_gauss_1.yaml", "needs": "prior", "flags": ["--sample",
                                                                           str(SAMPLES)],
               "rate": lambda job, ctx: SAMPLES / job["seconds"]},
    "vmf": {"config": "celebamask_vmf.yaml", "flags": [], "train": True,
            "rate": training_rate(lambda ctx: LABEL_MAPS["train"])},
    "torchrun": {"config": "mnist_gauss_1.yaml", "flags": [], "train": True, "torchrun": True,
                 "rate": training_rate(lambda ctx: mnist_train_images(ctx["gpus"]))},
    "celeba-copy": {"copy": True},
}


def selected(only):
    """The settings to run, in table order, with the ones they need."""
    names = set(only or SETTINGS)
    unknown = names - set(SETTINGS)
    if unknown:
        raise SystemExit(f"error: unknown setting {sorted(unknown)[0]}; choose from "
                         f"{', '.join(SETTINGS)}")
    for name in list(SETTINGS)[::-1]:  # needs point backwards: one reverse pass suffices
        if name in names and SETTINGS[name].get("needs"):
            names.add(SETTINGS[name]["needs"])
    return [name for name in SETTINGS if name in names]


# ---------------------------------------------------------------- running the jobs

def job_command(name, ctx):
    setting = SETTINGS[name]
    result = os.path.join(ctx["work"], f"{name}.result")
    if setting.get("copy"):
        return [sys.executable, THIS, "--copy-child", result, "--device", ctx["device"]], result
    runs = os.path.join(ctx["work"], "runs", name)
    args = ["-c", setting["config"], *(["--device", "cpu"] if ctx["device"] == "cpu" else [])]
    if setting.get("train"):
        args += ["--save", "train.epoch_max", "1"]
    else:
        args += ["-ts", ctx["runs"][setting["needs"]]]
    args += setting["flags"] + ["path", runs, "path_dataset", ctx["data"]]
    child = [THIS, "--child", result, "--"]
    if setting.get("torchrun"):
        world = ctx["gpus"]
        if 32 % world:  # train.bs 32 is the global batch: it must split evenly
            args += ["train.bs_per_rank", "8"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={world}", *child, *args], result
    return [sys.executable, *child, *args], result


def run_job(name, ctx, deadline):
    setting = SETTINGS[name]
    needs = setting.get("needs")
    if needs and needs not in ctx["runs"]:
        return {"ok": False, "why": f"needs {needs}, which failed"}
    limit = min(JOB_LIMIT_S, deadline - time.monotonic())
    if limit < 5:
        return {"ok": False, "why": "no time left in the budget"}
    command, result = job_command(name, ctx)
    env = dict(os.environ, SQVAE_NO_DOWNLOAD="1")
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    # A session of its own, so that a job past its time goes with all its processes
    # (torchrun's workers outlive a killed torchrun, holding their GPUs).
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"ok": False, "why": f"still running after {limit:.0f} s"}
    parts = [json.load(open(p)) for p in sorted(glob.glob(result + ".*.json"))]
    job = {"ok": process.returncode == 0 and bool(parts), "why": stderr.strip()[-1500:],
           "peak_mb": max((p["peak_mb"] for p in parts), default=None),
           "seconds": max((p.get("seconds", 0) for p in parts), default=None)}
    if not job["ok"]:
        return job
    if setting.get("copy"):
        rows = parts[0]["rows"]
        job["rows"] = rows
        job["ok"] = parts[0]["same"]
        job["why"] = "" if job["ok"] else "pinned and pageable batches differ"
        return job
    if setting.get("train"):
        folders = [p for p in glob.glob(os.path.join(ctx["work"], "runs", name, "*", "*"))
                   if os.path.isdir(p)]
        if len(folders) != 1:
            return {**job, "ok": False, "why": f"wrote {len(folders)} run folders, not 1"}
        job["run"] = folders[0]
    else:
        job["run"] = ctx["runs"][needs]
    ctx["runs"][name] = job["run"]  # what the settings that need this one work on
    try:
        job["img_s"] = setting["rate"](job, ctx)
    except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
        job.update(ok=False, why=f"finished, but its records are not as expected: {e!r}")
    return job


def table_rows(name, job):
    def fmt(value, spec):
        return format(value, spec) if value is not None else ""
    result, peak = "ok" if job["ok"] else "failed", fmt(job.get("peak_mb"), ".0f")
    if job.get("rows"):
        return [f"| {name}, {kind} | {result} | {fmt(rate, '.0f')} | {peak} |"
                for kind, rate in job["rows"]]
    return [f"| {name} | {result} | {fmt(job.get('img_s'), '.0f')} | {peak} |"]


def describe_machine(device):
    import torch
    if device == "cpu":
        return f"CPU, {os.cpu_count()} cores; torch {torch.__version__}"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"{len(names)} x {names[0]}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")


def check(args):
    import torch
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to PyTorch here; nothing to check")
        return 0
    deadline = time.monotonic() + args.budget
    names = selected(args.only)
    if args.keep and os.path.isdir(args.keep) and os.listdir(args.keep):
        raise SystemExit(f"error: --keep {args.keep} is not empty; give a new folder")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = args.keep or scratch
        os.makedirs(work, exist_ok=True)
        gpus = torch.cuda.device_count() if args.device != "cpu" else 1
        ctx = {"work": work, "data": os.path.join(work, "data"), "runs": {},
               "device": args.device, "gpus": gpus}
        write_datasets(ctx["data"])
        jobs = {name: run_job(name, ctx, deadline) for name in names}
    print(describe_machine(args.device))
    print(TABLE_HEAD)
    for name, job in jobs.items():
        print("\n".join(table_rows(name, job)))
    failed = [name for name, job in jobs.items() if not job["ok"]]
    for name in failed:
        print(f"\n{name} failed: {jobs[name]['why'] or 'no output'}")
    return 1 if failed else 0


# ---------------------------------------------------------------- inside a job's process

def peak_mb():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_result(path, **values):
    with open(f"{path}.{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump({"peak_mb": peak_mb(), **values}, f)


def child(result, main_args):
    import main as cli  # the repository's main.py
    start = time.perf_counter()
    code = cli.run(main_args)
    if code == 0:
        write_result(result, seconds=time.perf_counter() - start)
    return code


def copy_child(result, device_name, batches=64, batch=32, rounds=5):
    """The cached loader's batch path (data.loader.batch_buffer) against a pageable buffer,
    each batch followed by a convolution the copy of the next one can overlap.

    One untimed pass of each kind first (CUDA context, cuDNN's algorithm choice and the
    pinned-memory cache's first blocks would otherwise all land on whichever kind runs
    first: on an H200 that made pinned look 9x slower), then `rounds` timed passes with
    the two kinds alternating; each pass ends by reading its result back, which waits for
    the device, so queued copies are inside the time. The best pass of each kind counts."""
    import torch

    from data.loader import batch_buffer
    from util.device import select_device
    device = select_device(device_name)
    source = np.random.default_rng(0).integers(0, 256, (batches * batch, 3, 64, 64), np.uint8)
    conv = torch.nn.Conv2d(3, 64, 4, 2, 1).to(device)
    shape = (batch, 3, 64, 64)

    def one_pass(kind):
        total = torch.zeros((), device=device)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(batches):
                block = batch_buffer(shape, device) if kind == "pinned" else torch.empty(
                    shape, dtype=torch.uint8)
                block.numpy()[:] = source[i * batch:(i + 1) * batch]
                x = block.to(device, non_blocking=True).float().div_(255)
                total += conv(x).sum() + x.sum()
        value = float(total)  # reading it back waits for the device
        return time.perf_counter() - start, value

    kinds = ("pinned", "pageable")
    sums = {kind: one_pass(kind)[1] for kind in kinds}  # the warm-up
    best = dict.fromkeys(kinds, math.inf)
    for _ in range(rounds):
        for kind in kinds:
            seconds, value = one_pass(kind)
            best[kind] = min(best[kind], seconds)
            sums[kind] = value
    rows = [(kind, batches * batch / best[kind]) for kind in kinds]
    write_result(result, rows=rows, same=sums["pinned"] == sums["pageable"])
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="SETTING",
                        help=f"run only these settings (and those they need): "
                             f"{', '.join(SETTINGS)}")
    parser.add_argument("--budget", type=float, default=450, metavar="SECONDS",
                        help="time for all jobs together (default 450)")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the data and run folders into DIR (new or empty) and "
                             "keep them")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPU (default); cpu: the same jobs on the CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--copy-child", dest="copy_child", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" in argv:
        # Everything after -- is main.py's, flags included.
        split = argv.index("--")
        return child(build_parser().parse_args(argv[:split]).child, argv[split + 1:])
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(SETTINGS))
    if unknown:  # input: exit 2, whether or not a GPU is there to check
        print(f"error: unknown setting {unknown[0]}; choose from {', '.join(SETTINGS)}",
              file=sys.stderr)
        return 2
    if args.copy_child:
        return copy_child(args.copy_child, args.device)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
