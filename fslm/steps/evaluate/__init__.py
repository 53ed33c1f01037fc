"""`fslm eval`: base vs baselines vs stack on offline benchmarks, through lm-evaluation-harness (run.py says how;
its docstring names every part of this package)."""

from fslm.steps.evaluate.options import EvalOptions, EvalResult
from fslm.steps.evaluate.run import evaluate

__all__ = ["EvalOptions", "EvalResult", "evaluate"]
