"""``python -m trainer.release import RELEASE_RUN [--to RUN_DIR]``: a release run folder made
one of ours, for ``--resume`` and ``--prior``. The command line only (the format is
release_format's), so that ``python -m`` runs a module not yet imported."""
import argparse
import os
import shutil
import sys

from configs import config_to_yaml
from util.cli import EXIT_INPUT, OneLineParser, UsageError, run_cli
from util.io import UnsafeLink, atomic_write_bytes

from . import release_format, runs
from .runs import RunError


def import_run(run_dir, dest=None):
    """Write a run folder of ours (`dest`, or path/path_specific/NAME) for a release run."""
    cfg, model, _ = runs.load_run_model(run_dir)  # the weights fit the model of its config
    weights = model.state_dict()
    if dest is None:
        dest = os.path.join(cfg.path_checkpoint, os.path.basename(os.path.abspath(run_dir)))
        # read_release_config keeps path_specific below `path`; checked again where it is made.
        if os.path.commonpath([os.path.abspath(dest), cfg.path]) != cfg.path:
            raise RunError(f"{run_dir}: its configs.json would place the import at {dest}, "
                           f"outside path ({cfg.path}); choose a folder with --to")
    dest = os.path.abspath(dest)
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.mkdir(dest)
    except (FileExistsError, NotADirectoryError):
        if os.path.lexists(dest):
            raise RunError(f"{dest} already exists; choose another folder with --to") from None
        blocker = os.path.dirname(dest)
        while not os.path.lexists(blocker):
            blocker = os.path.dirname(blocker)
        raise RunError(f"cannot make {dest}: {blocker} is a file, not a folder; choose "
                       "another folder with --to") from None
    try:
        runs.write_config(dest, cfg)
        runs.save_checkpoint(os.path.join(dest, runs.BEST), {
            "model": weights, "epoch": None, "step": None, "val_loss": None,
            "config": config_to_yaml(cfg), "imported_from": os.path.abspath(run_dir)})
        atomic_write_bytes(os.path.join(dest, runs.METRICS_FILE), b"")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # never leave a half-imported folder
        raise
    return dest


def main(argv=None):
    return run_cli(lambda: _main(argv), errors=(((RunError, UnsafeLink), EXIT_INPUT),),
                       interrupted="{what}; no run folder was written")


def _main(argv):
    parser = OneLineParser(
        prog="python -m trainer.release",
        description="Run folders of the authors' release (github.com/sony/sqvae, vision/).\n"
                    "main.py -ts, --report and --encode read one as it is, without this\n"
                    "command; --resume and --prior need a run folder of this tool, which\n"
                    "`import` makes (the original is only read).",
        epilog=("example:\n"
                "  python -m trainer.release import RELEASE_RUN --to /tmp/runs/imported\n"
                "  python main.py -c mnist_gauss_1.yaml -ts /tmp/runs/imported --prior"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    imp = sub.add_parser(
        "import", help="copy a release run folder into a new run folder of this tool: "
                       "config.yaml, best.pt (its weights under our names) and an empty "
                       "metrics.jsonl",
        description="Write a run folder of this tool for the release run folder RELEASE_RUN "
                    "(its configs.json and best.pt), for --resume and --prior; RELEASE_RUN is "
                    "only read. See python -m trainer.release --help.")
    imp.add_argument("run", metavar="RELEASE_RUN", help="the release's run folder")
    imp.add_argument("--to", metavar="RUN_DIR",
                     help="where to write it (default: path/path_specific/<its name>)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run) or not release_format.is_release_run(args.run):
        raise UsageError(f"{args.run} is not a run folder of the authors' release (no "
                         f"{release_format.CONFIG_FILE}, or it already holds a {runs.CONFIG_FILE})")
    dest = import_run(args.run, args.to)
    print(f"imported {os.path.abspath(args.run)} as {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
