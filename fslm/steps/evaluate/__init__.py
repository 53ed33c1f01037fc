"""`fslm eval`: base vs baselines vs stack on offline benchmarks, through lm-evaluation-harness (see run.py)."""

from fslm.steps.evaluate.run import EvalOptions, EvalResult, evaluate

__all__ = ["EvalOptions", "EvalResult", "evaluate"]
