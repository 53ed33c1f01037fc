"""`fslm train`: one fresh LoRA adapter per stage on the stack's shared base (see run.py)."""

from fslm.steps.train.run import TrainedAdapter, TrainOptions, TrainResult, train

__all__ = ["TrainOptions", "TrainResult", "TrainedAdapter", "train"]
