"""`fslm distill`: a teacher writes, for every instruction of a dataset, the text each stage should produce (see
run.py)."""

from fslm.steps.distill.run import DistillOptions, DistillResult, distill, distill_records

__all__ = ["DistillOptions", "DistillResult", "distill", "distill_records"]
