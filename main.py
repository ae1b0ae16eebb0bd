"""SQ-VAE (Takida et al., ICML 2022) for vision, from the command line: flags, then one call
per mode (trainer.commands), which wires configs -> data + networks -> trainer."""
import argparse
import os
import sys

from util.cli import EXIT_INPUT, EXIT_MACHINE, OneLineParser, UsageError, run_cli

EPILOG = """examples:
  python main.py -c mnist_sample.yaml --save
      a first run, offline, on the MNIST sample in tests/data (not the paper's setting)
  python main.py -c mnist_gauss_1.yaml --save train.epoch_max 1 path /tmp/runs
      train on MNIST (downloaded on first use), with config overrides as KEY VALUE pairs
  python main.py -c mnist_gauss_1.yaml -ts resnet_seed0_1125_0915
      evaluate a saved run (a folder name under path/path_specific, or a path)
  python main.py -c images_gauss_1.yaml --save path_dataset ~/pictures
      train on every picture under ~/pictures (docs/usage.md, "Your own images")

experiment files (in configs/, or give any YAML path):
  {files}

environment: SQVAE_CHECKPOINTS and SQVAE_DATA set the defaults of `path` (run folders) and
`path_dataset` (datasets); overrides on the command line win.

companion commands (each explains itself with --help):
  python -m trainer.compare RUN_OR_FOLDER ... [--csv F] [--report F] [--curves PNG]
      compare run folders: a table, the reproduction report (docs/results.md), curves
  python -m trainer.release import RELEASE_RUN [--to RUN_DIR]
      make a release run folder one of ours (for --resume, --prior; -ts reads it as it is)
  python -m data.prepare_celebamask_hq --src RELEASE --dst DATA_ROOT
      turn the public CelebAMask-HQ release into the folders celebamask_vmf.yaml reads
  python benchmarks/gpu_check.py
      every GPU path once (cuDNN, AMP, compile, -ts, prior, vMF, torchrun), one table
  python benchmarks/bench.py --check
      the speed guard: exit 1 when a training step got slower than its committed limit;
      -c CONFIG ... for throughput, epoch time and memory per experiment
"""


def build_parser():
    from configs import experiment_files
    parser = OneLineParser(
        prog="main.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train or evaluate one SQ-VAE experiment: configs/defaults.py merged with "
                    "an experiment YAML and KEY VALUE overrides.",
        epilog=EPILOG.format(files="\n  ".join(experiment_files())))
    add = parser.add_argument
    add("-c", "--config_file", metavar="CONFIG", help="experiment file: a name from configs/ "
        "(e.g. mnist_gauss_1.yaml) or a YAML path")
    add("-ts", "--timestamp", metavar="RUN", help="skip training; evaluate the best.pt of run "
        "folder RUN (a name under path/path_specific, or a path) on the test split, appending to "
        "its metrics.jsonl")
    add("--report", action="store_true", help="with -ts: also write report.png and its panels "
        "(curves, codebook use, reconstructions) into the run folder")
    add("--encode", choices=("train", "val", "test", "images"), metavar="SPLIT", help="with -ts: "
        "also write the deterministic codes of the whole SPLIT (train, val, test; images: of "
        "--images) to codes_SPLIT.npz")
    add("--images", metavar="DIR", help="with -ts: evaluate on every picture under DIR (sorted, "
        "recursively, at the run's shape) instead of the test split")
    add("--prior", action="store_true", help="with -ts: train (or continue) a PixelCNN prior over "
        "the run's codes (prior section; prior.pt); test NLL")
    add("--sample", type=int, metavar="N", help="with -ts: draw N code grids from the run's "
        "prior; samples.png and codes_samples.npz")
    add("--save", action="store_true", help="write a run folder: config.yaml, best.pt, "
        "current.pt, metrics.jsonl and reconstruction grids")
    add("--resume", metavar="RUN", help="continue the run folder RUN (a name or a path) exactly "
        "where its current.pt stopped; implies --save")
    add("--dbg", action="store_true", help="print the release's per-epoch lines")
    add("--gpu", metavar="IDS", help="CUDA devices to make visible, e.g. 0 or 0,1")
    add("--seed", type=int, help="seed of initialisation, shuffling and sampling (default 0; "
        "--resume uses the run's own)")
    add("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}", help="where to run; "
        "auto picks CUDA, then MPS, then the CPU (default auto)")
    add("--deterministic", action=argparse.BooleanOptionalAction, help="bitwise-repeatable "
        "kernels (default: on for the CPU, off on GPUs)")
    add("--cudnn-benchmark", action="store_true", dest="cudnn_benchmark", help="let cuDNN pick "
        "the fastest convolutions (results no longer repeat)")
    add("--limit-batches", type=int, metavar="N", dest="limit_batches", help="at most N train, "
        "val and test batches per epoch, and per epoch of the prior with --prior (smoke runs); "
        "--encode, --report and the prior's code grids still take whole splits")
    add("--summary", action="store_true", help="print the config and parameter counts")
    add("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. train.epoch_max 1 "
        "path /tmp/runs")
    return parser


def run(argv=None):
    # util.cli from the first line on: Ctrl-C in the imports (seconds) is one line too.
    return run_cli(lambda: _run(argv), errors=exit_statuses,
                   interrupted="{what} during start-up; nothing was written",
                   os_hint="; free space or fix the folder's permissions, then resume")


def exit_statuses():
    """The exceptions that end main.py with one line, and their exit statuses."""
    from configs import ConfigError
    from data import DatasetError
    from trainer import RunError, TrainingError
    from util.device import DeviceError
    from util.io import UnsafeLink
    return (((ConfigError, DatasetError, RunError, DeviceError, UnsafeLink), EXIT_INPUT),
            ((TrainingError,), EXIT_MACHINE))


def _run(argv):
    args = build_parser().parse_intermixed_args(argv)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    from configs import load_config
    from trainer import commands
    from util import distributed as dist
    from util.device import configure_kernels, select_device
    if problem := flag_problem(args):
        raise UsageError(problem)
    try:
        cfg = load_config(args.config_file, args.opts)
        if args.summary:
            return commands.summary(cfg)
        device = select_device(args.device, dist.env_world()[1])
        # Before any CUDA computation: cuBLAS reads its workspace setting at its first call.
        configure_kernels(device, args.deterministic, args.cudnn_benchmark)
        dist.init(device)
        common = dict(program=__file__, config_file=args.config_file, opts=args.opts,
                      seed=args.seed, limit_batches=args.limit_batches, dbg=args.dbg)
        if args.timestamp:
            return commands.test_run(cfg, device, run=args.timestamp, report=args.report,
                                     encode=args.encode, prior=args.prior, sample=args.sample,
                                     images=args.images, **common)
        return commands.train(cfg, device, save=args.save or bool(args.resume),
                              resume=args.resume, **common)
    finally:
        dist.shutdown()


def flag_problem(args):
    """What is wrong with a combination of flags, or None."""
    if not args.config_file:
        return ("-c/--config_file is required (e.g. -c mnist_gauss_1.yaml); "
                "see python main.py --help")
    if args.limit_batches is not None and args.limit_batches < 1:
        return "--limit-batches needs a positive number"
    given = {"--report": args.report, "--encode": args.encode, "--prior": args.prior,
             "--sample": args.sample is not None, "--images": args.images is not None}
    if any(given.values()) and not args.timestamp:
        return f"{next(flag for flag, on in given.items() if on)} works on a saved run: add -ts RUN"
    if args.sample is not None and args.sample < 1:
        return "--sample needs a positive number of samples"
    if args.seed is not None and not -2**63 <= args.seed < 2**64:
        return "--seed needs a whole number from -2**63 to 2**64 - 1 (torch's seed range)"
    if (args.prior or args.sample) and (args.report or args.encode):
        return "--prior/--sample and --report/--encode are separate jobs: run them one by one"
    if args.images is not None and (args.report or args.prior or args.sample is not None):
        return ("--images evaluates and encodes pictures; --report, --prior and --sample "
                "work on the run's own splits: run them without --images")
    if args.images is not None and args.encode not in (None, "images"):
        return (f"--encode {args.encode} encodes a split of the run's dataset; with "
                "--images DIR, --encode images encodes the pictures")
    if args.images is None and args.encode == "images":
        return "--encode images encodes the pictures of --images DIR: add it"
    if args.timestamp and args.resume:
        return "-ts evaluates a run and --resume trains it further: give one of them"
    return None


if __name__ == "__main__":
    sys.exit(run())
