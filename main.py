"""SQ-VAE (Takida et al., ICML 2022) for vision: train, resume and evaluate from the command line.

This file only parses flags and wires the pieces: configs -> data + networks -> trainer.
"""
import argparse
import os
import sys

from util.cli import EXIT_INPUT, EXIT_MACHINE, OneLineParser, UsageError, run_command

EPILOG = """examples:
  python main.py -c mnist_sample.yaml --save
      a first run, offline: SQ-VAE on the MNIST sample shipped in tests/data (not the
      paper's setting), in a folder of its own under ./checkpoints/
  python main.py -c mnist_gauss_1.yaml --save
      train on MNIST (downloaded into ./datasets on first use), write a run folder
      under ./checkpoints/mnist_sqvae_gaussian_1/
  python main.py -c mnist_gauss_1.yaml --save train.epoch_max 1 path /tmp/runs
      the same with config overrides given as trailing KEY VALUE pairs
  python main.py -c mnist_gauss_1.yaml -ts resnet_seed0_1125_0915
      evaluate a saved run (a folder name under path/path_specific, or a path)
  python main.py -c images_gauss_1.yaml --save path_dataset ~/pictures
      train on every picture under ~/pictures (docs/usage.md, "Your own images")
  python main.py -c images_gauss_1.yaml -ts RUN --images DIR [--encode images]
      evaluate a run on other pictures (and write their codes)

experiment files (in configs/, or give any YAML path):
  {files}

environment: SQVAE_CHECKPOINTS and SQVAE_DATA set the defaults of `path` (run
folders) and `path_dataset` (datasets); overrides on the command line win.

companion commands (each explains itself with --help):
  python -m trainer.compare RUN_OR_FOLDER ... [--csv F] [--report F] [--curves PNG]
      compare run folders: one table row per run, the reproduction report
      (docs/results.md) and learning curves
  python -m trainer.release import RELEASE_RUN [--to RUN_DIR]
      make a run folder of the authors' release a run of this tool (for --resume and
      --prior; -ts reads it as it is)
  python -m data.prepare_celebamask_hq --src RELEASE --dst DATA_ROOT
      turn the public CelebAMask-HQ release into the folders celebamask_vmf.yaml reads
  python benchmarks/gpu_check.py
      every GPU path once (cuDNN settings, AMP, compile, -ts, prior, vMF, torchrun), one
      table; a check of a CUDA machine
  python benchmarks/bench.py --check
      the speed guard: exit 1 when a training step got slower than its committed limit;
      -c CONFIG ... for throughput, epoch time and memory per experiment
"""


def build_parser():
    from configs import experiment_files
    parser = OneLineParser(
        prog="main.py",
        description="Train or evaluate one SQ-VAE experiment: yacs defaults "
                    "(configs/defaults.py) merged with an experiment YAML and KEY VALUE "
                    "overrides.",
        epilog=EPILOG.format(files="\n  ".join(experiment_files())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config_file", metavar="CONFIG",
                        help="experiment file: a name from configs/ (e.g. mnist_gauss_1.yaml) "
                             "or a path to a YAML file")
    parser.add_argument("-ts", "--timestamp", metavar="RUN",
                        help="skip training; evaluate the best.pt of run folder RUN (a name "
                             "under path/path_specific, or a path) on the test split and "
                             "append the metrics to its metrics.jsonl")
    parser.add_argument("--report", action="store_true",
                        help="with -ts: also write report.png (training curves, codebook usage "
                             "on the test split, test reconstructions) and its three panels "
                             "report_{curves,codebook,reconstructions}.png into the run folder")
    parser.add_argument("--encode", choices=("train", "val", "test", "images"), metavar="SPLIT",
                        help="with -ts: also write the deterministic code indices of the whole "
                             "SPLIT (train, val or test; --limit-batches does not apply) to "
                             "codes_SPLIT.npz in the run folder, e.g. to train a prior; with "
                             "--images DIR, SPLIT is images: one row per picture, with the "
                             "pictures' names")
    parser.add_argument("--images", metavar="DIR",
                        help="with -ts: evaluate the run on every picture under DIR (any "
                             "format Pillow reads, recursively, in sorted file order, at the "
                             "run's image shape) instead of its test split; the records "
                             "(\"split\": \"images\") go to its metrics.jsonl")
    parser.add_argument("--prior", action="store_true",
                        help="with -ts: train a gated PixelCNN prior over the run's code grids "
                             "(prior section of the config; prior.pt, prior_current.pt), "
                             "continuing an interrupted one, and append its test NLL")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="with -ts: draw N code grids from the run's prior (seeded by "
                             "--seed, prior.temperature) and write samples.png and "
                             "codes_samples.npz")
    parser.add_argument("--save", action="store_true",
                        help="write a run folder: config.yaml, best.pt, current.pt, "
                             "metrics.jsonl and reconstruction grids")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the interrupted run folder RUN (a name or a path) "
                             "exactly where its current.pt stopped; implies --save")
    parser.add_argument("--dbg", action="store_true",
                        help="print the release's per-epoch Train/Validation/Test lines")
    parser.add_argument("--gpu", metavar="IDS",
                        help="CUDA devices to make visible, e.g. 0 or 0,1 "
                             "(sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for initialisation, shuffling and sampling "
                             "(default 0; --resume uses the run's own)")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                        help="where to run; auto picks CUDA, then MPS, then the CPU "
                             "(default auto)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="bitwise-repeatable kernels (default: on for the CPU, off on "
                             "GPUs, where cuDNN still runs deterministic as in the authors' "
                             "release)")
    parser.add_argument("--cudnn-benchmark", action="store_true", dest="cudnn_benchmark",
                        help="let cuDNN pick the fastest convolution algorithms (GPU speed; "
                             "results no longer repeat exactly)")
    parser.add_argument("--limit-batches", type=int, metavar="N", dest="limit_batches",
                        help="at most N train, val and test batches per epoch, and per epoch "
                             "of the prior with --prior (smoke runs); --encode, --report and "
                             "the prior's code grids still take whole splits")
    parser.add_argument("--summary", action="store_true",
                        help="print the resolved config and the parameter counts, then exit")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. train.epoch_max 1 path /tmp/runs")
    return parser


def run(argv=None):
    # util.cli from the first line on: the imports below take seconds, and Ctrl-C or SIGTERM
    # there must be one line too.
    # An OSError is the machine (a full disk, a read-only file system); every file is
    # written atomically, so what was on disk before is intact.
    return run_command(lambda: _run(argv), errors=exit_statuses,
                       interrupted="{what} during start-up; nothing was written",
                       os_hint="; free space or fix the folder's permissions, then resume")


def exit_statuses():
    """The exceptions that end main.py with one line and an exit status (util.cli);
    imported only once one arrives. (Interrupted, a util.cli.Stopped, says how to resume.)"""
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

    problem = flag_problem(args)
    if problem:
        raise UsageError(problem)
    try:
        cfg = load_config(args.config_file, args.opts)
        if args.summary:
            return commands.summary(cfg)
        device = select_device(args.device, dist.env_world()[1])
        # Before any CUDA computation: cuBLAS reads its workspace setting at its first call.
        configure_kernels(device, args.deterministic, args.cudnn_benchmark)
        dist.init(device)
        if args.timestamp:
            return commands.test_run(cfg, device, run=args.timestamp, opts=args.opts,
                                     seed=args.seed, limit_batches=args.limit_batches,
                                     dbg=args.dbg, report=args.report, encode=args.encode,
                                     prior=args.prior, sample=args.sample, images=args.images,
                                     program=__file__, config_file=args.config_file)
        return commands.train(cfg, device, program=__file__, config_file=args.config_file,
                              opts=args.opts, save=args.save or bool(args.resume),
                              resume=args.resume, seed=args.seed,
                              limit_batches=args.limit_batches, dbg=args.dbg)
    finally:
        dist.shutdown()


def flag_problem(args):
    """What is wrong with a combination of flags, or None."""
    if not args.config_file:
        return ("-c/--config_file is required (e.g. -c mnist_gauss_1.yaml); "
                "see python main.py --help")
    if args.limit_batches is not None and args.limit_batches < 1:
        return "--limit-batches needs a positive number"
    needs_run = [flag for flag, given in (("--report", args.report), ("--encode", args.encode),
                                          ("--prior", args.prior),
                                          ("--sample", args.sample is not None),
                                          ("--images", args.images is not None)) if given]
    if needs_run and not args.timestamp:
        return f"{needs_run[0]} works on a saved run: add -ts RUN"
    if args.sample is not None and args.sample < 1:
        return "--sample needs a positive number of samples"
    if args.seed is not None and not -2**63 <= args.seed < 2**64:
        return "--seed needs a whole number from -2**63 to 2**64 - 1 (torch's seed range)"
    if (args.prior or args.sample) and (args.report or args.encode):
        return "--prior/--sample and --report/--encode are separate jobs: run them one by one"
    if args.images is not None:
        if args.report or args.prior or args.sample is not None:
            return ("--images evaluates and encodes pictures; --report, --prior and --sample "
                    "work on the run's own splits: run them without --images")
        if args.encode not in (None, "images"):
            return (f"--encode {args.encode} encodes a split of the run's dataset; with "
                    "--images DIR, --encode images encodes the pictures")
    elif args.encode == "images":
        return "--encode images encodes the pictures of --images DIR: add it"
    if args.timestamp and args.resume:
        return "-ts evaluates a run and --resume trains it further: give one of them"
    return None


if __name__ == "__main__":
    sys.exit(run())
