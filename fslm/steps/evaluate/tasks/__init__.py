"""Offline lm-eval task configs (YAML) and their loaders (utils.py); see docs/eval.md."""
