"""`fslm distill`: a teacher writes, for every instruction of a dataset, the text each stage should produce (run.py
says how; its docstring names every part of this package)."""

from fslm.steps.distill.options import DistillOptions, DistillResult
from fslm.steps.distill.run import distill, distill_records

__all__ = ["DistillOptions", "DistillResult", "distill", "distill_records"]
