"""Training, evaluation, checkpoints and run folders.

The names below load their modules (and torch) on first use, so that ``python -m
trainer.compare --help`` and ``python -m trainer.release --help`` answer before torch is
imported. trainer/release_format.py is imported at once: it registers the authors' run
folders with trainer.runs (both modules import torch only inside the functions that need it).
"""
import importlib

from util.cli import start_up, started_with_m

# `python -m trainer.compare` (or .release) imports this package before its own run_command
# starts: Ctrl-C or SIGTERM meanwhile is one line too.
with start_up(started_with_m()):
    from . import release_format  # noqa: F401  registers the authors' run folders

# name -> the module of this package that defines it
_LAZY = {"Interrupted": "loop", "Trainer": "loop", "TrainingError": "loop",
         "build_optimizer": "loop", "build_scheduler": "loop", "CodeHistogram": "meters",
         "MeanMeter": "meters", "eval_pass": "meters", "RunError": "runs"}

__all__ = ["CodeHistogram", "Interrupted", "MeanMeter", "Trainer", "TrainingError", "RunError",
           "build_optimizer", "build_scheduler", "eval_pass"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
