"""Throughput, epoch time and memory per experiment, printed as a markdown table.

    python benchmarks/bench.py mnist_gauss_1 celeba_gauss_3 celeba_gauss_4 --device cpu
    python benchmarks/bench.py mnist_gauss_1 --epoch --opts path_dataset DATASET_ROOT

Each config is measured in its own subprocess so peak memory is its own:

* train img/s and eval img/s: steps on one fixed in-memory batch (random data of
  the dataset's shape), after warm-up; this is the model compute floor;
* floor s/epoch: train step time x train steps + eval batch time x val batches x 2
  (the two validation passes), i.e. an epoch with zero data or loop overhead;
* with --epoch and the dataset present: a real epoch through the trainer (train
  plus both validation passes) and its ratio to the floor;
* peak memory: max RSS of the process on the CPU, max_memory_allocated on CUDA.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Official split sizes (train, val) used for the floor when no data is loaded.
SPLIT_SIZES = {"MNIST": (50000, 10000), "FashionMNIST": (50000, 10000),
               "CIFAR10": (40000, 10000), "CelebA": (162770, 19867),
               "CelebAMask_HQ": (24183, 2993)}


def fixed_batch(model, cfg, batch, device):
    import torch
    shape = (batch, *cfg.dataset.shape)
    if model.OUTPUTS == "labels":
        return torch.randint(0, model.num_classes, shape, device=device)
    return torch.rand(shape, device=device)


def sync(device):
    import torch

    from util.device import is_cuda
    if is_cuda(device):
        torch.cuda.synchronize(device)


def time_steps(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure(name, device_name, steps, epoch, opts):
    import math

    import torch

    from configs import load_config
    from networks import build_model
    from trainer import Trainer
    from trainer.loop import build_optimizer
    from util.device import configure_kernels, is_cuda, select_device

    device = select_device(device_name)
    configure_kernels(device, deterministic=False, cudnn_benchmark=is_cuda(device))
    cfg = load_config(name, opts)
    model = build_model(cfg).to(device)
    model.amp = cfg.train.amp
    train_model = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(cfg, model, device)
    x = fixed_batch(model, cfg, cfg.train.bs, device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        _, terms = train_model(x, "train")
        terms["loss"].backward()
        optimizer.step()

    model.train()
    step_s = time_steps(train_step, steps, 3, device)
    xe = fixed_batch(model, cfg, cfg.test.bs, device)

    @torch.no_grad()
    def eval_step():
        train_model(xe, "deterministic")

    model.eval()
    eval_s = time_steps(eval_step, steps, 2, device)
    n_train, n_val = SPLIT_SIZES[cfg.dataset.name]
    floor = step_s * math.ceil(n_train / cfg.train.bs) + \
        eval_s * math.ceil(n_val / cfg.test.bs) * 2
    row = {"config": name, "device": str(device), "train_img_s": cfg.train.bs / step_s,
           "step_ms": step_s * 1000, "eval_img_s": cfg.test.bs / eval_s, "floor_s": floor}

    if epoch:
        import data
        from util.rng import seed_everything
        seed_everything(0)
        model = build_model(cfg).to(device)
        trainer = Trainer(cfg, model, data.build_loaders(cfg, device, 0), device)
        n_train, n_val = len(trainer.loaders["train"]), len(trainer.loaders["val"])
        floor = step_s * n_train + eval_s * n_val * 2
        start = time.perf_counter()
        trainer.train_epoch()
        sync(device)
        train_seconds = time.perf_counter() - start
        val_seconds = sum(seconds for _, seconds in trainer.evaluate_split("val"))
        row.update(floor_s=floor, epoch_s=train_seconds + val_seconds, train_s=train_seconds,
                   val_s=val_seconds, ratio=(train_seconds + val_seconds) / floor)

    if is_cuda(device):
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def table(rows):
    cols = [("config", "config", "{}"), ("device", "device", "{}"),
            ("train img/s", "train_img_s", "{:.0f}"), ("step ms", "step_ms", "{:.1f}"),
            ("eval img/s", "eval_img_s", "{:.0f}"), ("floor s/epoch", "floor_s", "{:.1f}"),
            ("epoch s", "epoch_s", "{:.1f}"), ("train s", "train_s", "{:.1f}"),
            ("val s (2 passes)", "val_s", "{:.1f}"), ("epoch / floor", "ratio", "{:.3f}"),
            ("peak MB", "peak_mb", "{:.0f}")]
    cols = [c for c in cols if any(c[1] in r for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[1]]) if c[1] in r else "" for c in cols)
                     + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="experiment names, e.g. mnist_gauss_1")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides for every config, e.g. path_dataset DIR")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--epoch", action="store_true",
                        help="also time one real epoch (needs the dataset)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names, opts = args.configs, args.opts
    if args.one:
        print(json.dumps(measure(names[0], args.device, args.steps, args.epoch, opts)))
        return 0
    rows = []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), name, "--opts", *opts, "--one",
               "--device", args.device, "--steps", str(args.steps)] + \
            (["--epoch"] if args.epoch else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
