"""What `fslm train` can be told besides its two paths, and what it returns; the CLI's flags and defaults come from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fslm.config import StageTraining
from fslm.options import Options, Result, comma_list


class TrainOptions(Options):
    """Everything `fslm train` can be told besides its two paths; the CLI's flags and defaults come from here."""

    stages: list[str] | None = Field(None, description="Stages to train (default: all).")
    single: bool = Field(False, description="Train only the single-adapter baseline (adapters/single/).")
    multitask: bool = Field(
        False,
        description="Train only the multitask baseline (adapters/multitask/): every stage's targets + the answer.",
    )
    prompt: Literal["full", "compact"] | None = Field(
        None,
        description="The prompt form the adapters train on (recorded with each; run, serve and eval then use it): "
        "full (role and template) or compact (stage name, instruction, earlier stages); default: stack.yaml's prompt.",
    )
    answer_inputs: Literal["auto", "student", "teacher", "mix"] = Field(
        "auto",
        description="What the final stage reads in training: student (the trained earlier stages' own outputs), "
        "teacher (the distilled targets) or mix (both); auto: student when every earlier stage is trained.",
    )
    student_backend: Literal["auto", "torch", "llamacpp"] = Field(
        "auto", description="Where the student's earlier-stage outputs are generated (auto: llama.cpp when it can)."
    )
    epochs: float = Field(3.0, ge=0.01, description="Epochs per stage.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps per stage (overrides --epochs).")
    lr: float = Field(2e-4, ge=0.0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Examples per batch per process.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="cosine, linear or constant_with_warmup."
    )
    warmup: float = Field(0.05, ge=0.0, description="Warm-up: a fraction of the steps (<1) or steps (>=1).")
    seed: int = Field(0, description="Seed for LoRA init, data order, dropout and the validation split.")
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="Records held out for validation.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    max_length: int | None = Field(None, ge=8, description="Skip examples longer than this (default: the context).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bfloat16 autocast where the hardware computes it natively (AMX, AVX-512-BF16, CUDA), "
        "else float32; LoRA weights, optimizer state and saved adapters stay float32.",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: the largest micro-batch that fits --memory-budget without checkpointing (gradients "
        "accumulate to the same update), else as few checkpointed layers as fit (docs/train.md, Memory); on: keep "
        "only each layer's input and recompute the rest in the backward pass (least memory, half as much compute "
        "again); off: keep every activation of whole batches. The same loss and gradients each way.",
    )
    memory_budget: float = Field(
        2.0, gt=0.0, description="GiB of resident memory a training process may use (what auto checkpointing sizes to)."
    )
    strict: bool = Field(False, description="Stop on the first bad record instead of skipping.")
    resume: bool = Field(False, description="Continue an interrupted run from its checkpoints.")
    fresh: bool = Field(False, description="Discard an interrupted run's checkpoints and start over.")
    keep_checkpoints: bool = Field(False, description="Keep DIR/.fslm-train/ after a finished run.")
    # For benchmarks/train_throughput.py: False + pad_to=N is the naive baseline.
    group_by_length: bool = True
    pad_to: int | None = None
    eval_each_epoch: bool = True  # False: validation loss only at the end (outside the timed training loop)

    _stages = field_validator("stages", mode="before")(comma_list)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        """True / False (the flag's earlier form, still what Python callers may pass) mean on / off."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the result: a resumed run must match them."""
        skip = {"resume", "fresh", "keep_checkpoints", "strict", "save_steps", "eval_each_epoch"}
        skip |= {"gradient_checkpointing", "memory_budget"}  # recomputing activations does not change the result
        return self.model_dump(mode="json", exclude=skip)


class TrainedAdapter(Result):
    """One adapter written by this call: where, and what `fslm train` recorded about it in stack.yaml."""

    name: str
    path: Path
    training: StageTraining
    log_history: list[dict[str, Any]] = Field(default_factory=list)


class TrainResult(Result):
    """The adapters trained by this call (those already trained by an interrupted run are not repeated)."""

    adapters: dict[str, TrainedAdapter] = Field(default_factory=dict)
    skipped_records: int = 0
