"""Training: an explicit loop (loop.py), AdamW and LR schedules (optim.py), checkpoints and the run
directory (checkpoint.py), device / precision / DDP / FSDP (runtime.py), metrics and progress (logging.py),
weight EMA (ema.py)."""

from dlm.train.checkpoint import LoadedRun, find_checkpoint, list_checkpoints, load_run
from dlm.train.loop import TrainingInterrupted, train

__all__ = ["LoadedRun", "TrainingInterrupted", "find_checkpoint", "list_checkpoints", "load_run", "train"]
