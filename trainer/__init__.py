"""Training, evaluation, checkpoints and run folders."""
from .loop import (Interrupted, MeanMeter, Trainer, TrainingError, append_test_records,
                   build_optimizer, build_scheduler, evaluate, temperature_at)
from .runs import RunError

__all__ = ["Interrupted", "MeanMeter", "Trainer", "TrainingError", "RunError",
           "append_test_records", "build_optimizer", "build_scheduler", "evaluate",
           "temperature_at"]
