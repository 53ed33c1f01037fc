"""What `fslm eval` can be told besides its two paths, and what it returns; the CLI's flags and defaults come from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fslm.options import Options, Result, comma_list
from fslm.stack import SYSTEMS

# tasks with a generative variant (fslm_<task>_gen): multiple choice whose answer can be read off free text
GENERATIVE = ("arc_easy", "arc_challenge", "mmlu", "openbookqa")


class EvalOptions(Options):
    """Everything `fslm eval` can be told besides its two paths; the CLI's flags and defaults come from here."""

    data_dir: Path = Field(description="Benchmark data directory (layout: docs/eval.md).")
    tasks: list[str] = Field(
        ["arc_easy", "arc_challenge", "mmlu"],
        description="Comma-separated: arc_easy, arc_challenge, mmlu, hellaswag, ...",
    )
    systems: list[str] = Field(["base", "single", "stack"], description=f"Comma-separated: {', '.join(SYSTEMS)}.")
    limit: int | None = Field(100, ge=1, description="Items per task (a seeded random subset).")
    split: Literal["test", "dev"] = Field(
        "test",
        description="The split scored: test, or dev to choose settings (prompt forms, budgets) without touching test.",
    )
    seed: int = Field(1234, description="Seed of the subset and of lm-eval.")
    ablate: bool = Field(False, description="Add one stack row per stage, that stage on the bare base.")
    batch_size: int = Field(
        8,
        ge=1,
        description="Batch of requests scored in full (too long to share their context) and of stages on torch.",
    )
    stage_tokens: int | None = Field(
        None, ge=1, description="Cap new tokens of stages 1..N-1 (default: the manifest's)."
    )
    stage_backend: Literal["auto", "torch", "llamacpp", "openai"] = Field(
        "auto",
        description="Where stages 1..N-1 generate: auto (llama.cpp when the base exports to GGUF, a server when "
        "stack.yaml runs on one, else torch), torch, llamacpp, openai. The final stage scores on --backend.",
    )
    stage_batch: int | None = Field(
        None,
        ge=1,
        description="Questions per stage-generation call (default: 32 on llama.cpp/openai, else --batch-size).",
    )
    stage_check: int = Field(
        0, ge=0, description="Questions whose greedy stage text is also generated on torch, to measure agreement."
    )
    stack_scoring: Literal["chain", "ensemble", "gate"] = Field(
        "chain",
        description="How the stack scores choices: chain (greedy chain), ensemble (direct path + K sampled "
        "chains, weight λ), gate (chain only when the direct path is unsure, threshold τ).",
    )
    chains: int = Field(3, ge=1, le=64, description="Sampled chains per question (ensemble).")
    chain_temperature: float = Field(0.7, ge=0.0, le=5.0, description="Sampling temperature of the ensemble's chains.")
    ensemble_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="λ, the direct path's weight (ensemble); default: tuned on each task's dev split.",
    )
    gate_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="τ, the direct margin below which the chain runs (gate); default: tuned on dev.",
    )
    gate_max_chain_rate: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="A cost cap on the tuned τ (gate): only values whose chain rate on dev is at most this compete "
        "(the gate costs about the direct path plus this share of a chain); default: no cap.",
    )
    tune_limit: int = Field(100, ge=1, description="Dev questions per task that tune λ / τ (a seeded subset).")
    generative: bool = Field(
        False, description="Also let each system answer freely and read the option off its text (metric gen)."
    )
    gen_tokens: int | None = Field(None, ge=1, description="New tokens of a generative answer (default: 32).")
    bootstrap: int = Field(10_000, ge=100, description="Paired bootstrap resamples for the difference intervals.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="PyTorch compute precision of scoring (and of stages generating on torch): fp32 (default: "
        "system=base matches lm-eval's hf model), bf16 (autocast), auto (bf16 where the hardware computes it natively).",
    )
    chains_from: Path | None = Field(
        None,
        description="An earlier eval's --out directory of this stack: its greedy stage texts are reused where they "
        "were generated the same way (adapters, --stage-tokens, stage backend); their recorded seconds count here.",
    )
    backend: Literal["torch", "llamacpp"] | None = Field(
        None,
        description="Where choices are scored: torch (default; lm-eval's hf model) or llamacpp (the GGUF export, "
        "or a base that is itself a GGUF file, run bare: e.g. a teacher's row).",
    )

    _lists = field_validator("tasks", "systems", mode="before")(comma_list)


class EvalResult(Result):
    """Where the report went and what it says (`results` is results.json)."""

    out: Path
    results: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.out / "report.md"


def tuning_needed(options: EvalOptions) -> str | None:
    """Which stack-scoring parameter must be tuned on dev first: "weight" (λ), "threshold" (τ) or None."""
    if options.stack_scoring == "ensemble" and options.ensemble_weight is None:
        return "weight"
    if options.stack_scoring == "gate" and options.gate_threshold is None:
        return "threshold"
    return None
