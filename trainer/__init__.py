"""Training, evaluation, checkpoints and run folders; names load their modules (and torch) on
first use: ``python -m trainer.compare --help`` answers before torch is imported."""
import importlib
import sys

from util.cli import start_up

if sys.argv[:1] == ["-m"]:  # `python -m trainer.MODULE` imports this package (argv[0] is still -m)
    # A companion's modules (no torch) load here, where Ctrl-C is one line too (before run_cli).
    with start_up():
        from . import release_format, runs  # noqa: F401

# name -> the module of this package that defines it
_LAZY = {"Interrupted": "loop", "Trainer": "loop", "TrainingError": "loop",
         "build_optimizer": "loop", "CodeHistogram": "meters", "MeanMeter": "meters",
         "eval_pass": "meters", "evaluate": "meters", "RunError": "checkpoints"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
