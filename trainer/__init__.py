"""Training, evaluation, checkpoints and run folders."""
from . import release_format  # registers the authors' run folders with trainer.runs
from .loop import Interrupted, Trainer, TrainingError, build_optimizer, build_scheduler
from .meters import CodeHistogram, MeanMeter, eval_pass
from .runs import RunError

__all__ = ["CodeHistogram", "Interrupted", "MeanMeter", "Trainer", "TrainingError", "RunError",
           "build_optimizer", "build_scheduler", "eval_pass"]
