"""Speed of every experiment: a guard against slowdowns, and a throughput table.

    python benchmarks/bench.py --check                      # every experiment file, a few minutes
    python benchmarks/bench.py --check -c mnist_gauss_1 -c celebamask_vmf
    python benchmarks/bench.py -c mnist_gauss_1 -c celeba_gauss_3 --device cpu
    python benchmarks/bench.py -c mnist_gauss_1 --epoch path_dataset DATASET_ROOT

Trailing KEY VALUE pairs override config keys for every config, as in main.py.

--check (run it before merging a change to networks/, trainer/ or data/; docs/speed.md):
for each config, the full training step (forward in training mode, backward, Adam; the model
as networks.build_model returns it) is timed against a floor measured in the same process:
the same encoder and decoder, same weights and layout, with the quantizer left out
(z goes straight to the decoder; loss: the mean square of the output). Rounds alternate
between the two, so machine noise hits both alike. The overhead ratio step / floor is
what the quantizer, the losses and the model's plumbing cost; the command prints it and
exits 1 when a ratio exceeds its limit in benchmarks/overhead_limits.json.

Without --check, each config is measured in its own subprocess so peak memory is its own:
* train img/s and eval img/s: steps on one fixed in-memory batch (random data of the
  dataset's shape), after warm-up; this is the model compute floor;
* floor s/epoch: train step time x train steps + eval batch time x val batches x 2
  (the two validation passes), i.e. an epoch with zero data or loop overhead;
* with --epoch and the dataset present: a real epoch through the trainer (train plus
  both validation passes) and its ratio to the floor;
* peak memory: max RSS of the process on the CPU, max_memory_allocated on CUDA.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util.cli import EXIT_INPUT, OneLineParser, UsageError, run_cli  # noqa: E402

LIMITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead_limits.json")

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


def time_steps(fn, steps, warmup, device, clock=time.perf_counter):
    for _ in range(warmup):
        fn()
    sync(device)
    start = clock()
    for _ in range(steps):
        fn()
    sync(device)
    return (clock() - start) / steps


# ---------------------------------------------------------------------------- the guard

def training_step(cfg, model, forward, device):
    """One optimizer step of `forward(model)`'s loss, as the trainer takes it, at a learning
    rate of 0: every round then times the same weights (trained, the floor's weights drifted
    and its time with them, by up to 15% between runs), and Adam does all its arithmetic."""
    from trainer.loop import build_optimizer
    optimizer = build_optimizer(cfg, model, device)
    for group in optimizer.param_groups:
        group["lr"] = 0.0

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward(model).backward()
        optimizer.step()
    return step


def full_loss(x):
    return lambda model: model(x, "train")[1]["loss"]


def floor_loss(x):
    """The encoder and decoder alone: z (and the variance head, where there is one) straight
    into the decoder."""
    def loss(model):
        z, log_var = model.run_encoder(x)
        total = model.run_decoder(z).square().mean()
        return total if log_var is None else total + log_var.square().mean()
    return loss


def overhead(name, opts, device, rounds, clock):
    """(step ms, floor ms, ratio) for config `name`. Steps and floors alternate one by one,
    `rounds` x 10 pairs (x 3 for 64-pixel inputs), so that what the machine does meanwhile
    hits both alike; the ratio is the median of the pairs' ratios, the times the medians."""
    import copy

    import torch

    from configs import load_config
    from networks import build_model
    cfg = load_config(name, opts)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    floor = copy.deepcopy(model)
    x = fixed_batch(model, cfg, cfg.train.bs, device)
    steps = [training_step(cfg, model, full_loss(x), device),
             training_step(cfg, floor, floor_loss(x), device)]
    for step in steps:  # warm-up: oneDNN picks and caches its kernels on the first steps
        step()
        step()
    pairs = rounds * (10 if cfg.dataset.shape[-1] <= 32 else 3)
    times = [[], []]
    for _ in range(pairs):
        for i, step in enumerate(steps):
            times[i].append(time_steps(step, 1, 0, device, clock) * 1000)
    ratio = statistics.median(a / b for a, b in zip(*times))
    return times, ratio


def limit_key(name):
    """The limits file's key for a config: its file name without .yaml."""
    base = os.path.basename(name)
    return base[:-len(".yaml")] if base.endswith(".yaml") else base


def read_limits(path):
    try:
        with open(path) as f:
            limits = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the overhead limits {path}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if not isinstance(limits, dict):
        raise UsageError(f"{path}: expected a JSON object of config name -> limit")
    return {k: v for k, v in limits.items() if not k.startswith("_")}


def check(names, opts, device_name, rounds, limits_file=LIMITS_FILE, json_file=None):
    """Print the overhead table; 1 if any ratio exceeds its limit, else 0."""
    import torch

    from util.device import configure_kernels, select_device
    device = select_device(device_name)
    configure_kernels(device, deterministic=False, cudnn_benchmark=False)
    clock = time.perf_counter
    limits = read_limits(limits_file)
    limits = {name: limits.get(limit_key(name)) for name in names}
    missing = [n for n in names if not isinstance(limits[n], (int, float))]
    if missing:
        raise UsageError(f"no overhead limit for {', '.join(missing)} in {limits_file}; "
                         "add one (measured ratio x 1.1) before checking it")
    what = "ms"
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{rounds} rounds", flush=True)
    print(f"| config | step ({what}) | floor ({what}) | overhead | limit | |\n"
          "|---|---|---|---|---|---|", flush=True)
    failed, raw = [], {}
    for name in names:
        (step_ms, floor_ms), ratio = overhead(name, opts, device, rounds, clock)
        limit = limits[name]
        raw[name] = {"step_ms": step_ms, "floor_ms": floor_ms, "overhead": ratio,
                     "limit": limit}
        step_ms, floor_ms = statistics.median(step_ms), statistics.median(floor_ms)
        verdict = "ok" if ratio <= limit else "SLOWER"
        if ratio > limit:
            failed.append(name)
        print(f"| {name} | {step_ms:.1f} | {floor_ms:.1f} | {ratio:.3f} | {limit:.2f} | "
              f"{verdict} |", flush=True)
    if json_file:
        from util.io import atomic_write_bytes
        atomic_write_bytes(json_file, json.dumps(raw, indent=1).encode())
    if failed:
        print(f"slower than allowed: {', '.join(failed)} (step / floor above the limit in "
              f"{limits_file}); find the slowdown before merging",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- the speed table

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
        from util.device import seed_everything
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


def speed_table(args):
    rows, failed = [], []
    for name in args.configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "-c", name,
               "--device", args.device, "--steps", str(args.steps),
               *(["--epoch"] if args.epoch else []), *args.opts]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            failed.append(name)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    print(table(rows))
    return 1 if failed else 0


# ----------------------------------------------------------------------------- the CLI

def build_parser():
    parser = OneLineParser(prog="benchmarks/bench.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", dest="configs", metavar="CONFIG",
                        default=[], help="an experiment file, e.g. mnist_gauss_1; repeat -c "
                                         "for more (default with --check: every file in "
                                         "configs/)")
    parser.add_argument("--check", action="store_true",
                        help="time each config's training step against its encoder-decoder "
                             "floor; exit 1 if step / floor exceeds benchmarks/"
                             "overhead_limits.json")
    parser.add_argument("--limits", default=LIMITS_FILE, metavar="JSON",
                        help="--check: config name -> largest allowed step / floor "
                             "(default benchmarks/overhead_limits.json)")
    parser.add_argument("--json", metavar="FILE",
                        help="--check: also write every timed step and floor (ms) per config")
    parser.add_argument("--rounds", type=int, default=7,
                        help="--check: alternating rounds of step and floor (default 7)")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                        help="where to run (default auto: CUDA, then MPS, then the CPU)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per measurement of the table (default 20)")
    parser.add_argument("--epoch", action="store_true",
                        help="also time one real epoch through the trainer (needs the dataset "
                             "under path_dataset)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides for every config, e.g. path_dataset DIR")
    return parser


def _main(argv):
    args = build_parser().parse_intermixed_args(argv)
    from configs import experiment_files, load_config, parse_overrides
    parse_overrides(args.opts)
    if args.check and not args.configs:
        args.configs = [f[:-len(".yaml")] for f in experiment_files()]
    if not args.configs:
        raise UsageError("name the experiment files to measure with -c CONFIG ..., or run "
                         "--check (every file); see benchmarks/bench.py --help")
    if args.steps < 1 or args.rounds < 1:
        raise UsageError("--steps and --rounds need a positive number")
    for name in args.configs:
        load_config(name, args.opts)  # every name and override checked before any timing
    if args.one:
        print(json.dumps(measure(args.configs[0], args.device, args.steps, args.epoch,
                                 args.opts)))
        return 0
    if args.check:
        return check(args.configs, args.opts, args.device, args.rounds, args.limits, args.json)
    return speed_table(args)


def exit_statuses():
    from configs import ConfigError
    from util.device import DeviceError
    return (((ConfigError, DeviceError), EXIT_INPUT),)


def main(argv=None):
    return run_cli(lambda: _main(argv), errors=exit_statuses,
                       interrupted="{what}: benchmark stopped; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
