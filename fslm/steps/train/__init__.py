"""`fslm train`: one fresh LoRA adapter per stage on the stack's shared base (run.py says how; its docstring names
every part of this package)."""

from fslm.steps.train.options import TrainedAdapter, TrainOptions, TrainResult
from fslm.steps.train.run import train

__all__ = ["TrainOptions", "TrainResult", "TrainedAdapter", "train"]
