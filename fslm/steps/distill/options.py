"""What `fslm distill` can be told besides its three paths, and what it returns; the CLI's flags and defaults come
from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fslm.data import FORMATS
from fslm.options import Options, Result, comma_list
from fslm.steps.distill.filters import FILTERS
from fslm.teachers import TeacherSpec

# Why a row is rejected: a quality filter, "wrong" (its answer stayed wrong after the policy's retries) or "format"
# (a joint response that cannot be cut into the stack's sections).
REJECTIONS = (*FILTERS, "wrong", "format")
TEACHER_MODES = ("stages", "joint")


class DistillOptions(Options):
    """Everything `fslm distill` can be told besides its three paths; the CLI's flags and defaults come from here."""

    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    # --- what the teacher writes ---
    teacher_mode: Literal["stages", "joint"] = Field(
        "stages",
        description="stages: one teacher call per stage, each reading the earlier ones; joint: one call per record "
        "writes every stage as a `### Stage` section.",
    )
    options: Literal["hidden", "answer", "shown"] = Field(
        "hidden",
        description="Where the teacher sees a multiple-choice question's options (the student never does): hidden "
        "(nowhere), answer (only when it names its final answer, after writing the earlier stages blind) or shown "
        "(in every request). Earlier-stage targets that point at them are dropped by the options filter.",
    )
    reference: Literal["hidden", "hint-on-retry", "shown"] = Field(
        "hidden",
        description="What the teacher sees of the reference: hidden (never), hint-on-retry (blind first; only after "
        "a checked-wrong answer, once more with the gold answer as a hint) or shown (in every earlier stage).",
    )
    final_from: Literal["reference", "teacher"] = Field(
        "reference", description="Final stage target: reference (when the record has one) or teacher."
    )
    samples: int = Field(1, ge=1, le=16, description="Chains per record (sampled when above 1; duplicates dropped).")
    sample_temperature: float = Field(0.7, gt=0.0, le=2.0, description="Temperature of sampled chains.")
    sample_top_p: float = Field(0.95, gt=0.0, le=1.0, description="top-p of sampled chains.")
    word_limits: bool = Field(
        False,
        description="Tell the teacher each stage's length in words (0.6 a token of the stage's max_new_tokens), so "
        "fewer targets are dropped as overlong.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Override every stage's budget for the teacher (joint: the whole response's)."
    )
    filters: tuple[str, ...] = Field(
        FILTERS, description="Quality filters: comma list of empty,overlong,repetition,leak,options, or none."
    )
    overlong_factor: float = Field(
        1.0, ge=0.0, description="overlong: more student tokens than factor x the stage's max_new_tokens."
    )
    trim_cut: bool = Field(
        True, description="Trim a teacher output cut at the token limit to its last full sentence or line."
    )
    fit_overlong: bool = Field(
        False,
        description="Trim a target longer than its stage's budget to its last full sentence or line within it "
        "(when that keeps a third of it) instead of dropping the record as overlong.",
    )
    # --- which records ---
    format: str = Field("auto", description="auto, alpaca, self-instruct or gsm8k.")
    instruction_field: str | None = Field(None, description="Field holding the instruction.")
    input_field: str | None = Field(None, description="Field holding the optional input.")
    output_field: str | None = Field(None, description="Field holding the reference output.")
    limit: int | None = Field(None, ge=1, description="Distil a reproducible random sample of N records.")
    seed: int = Field(0, description="Seed of the --limit sample.")
    strict: bool = Field(False, description="Bad rows and benchmark contamination are fatal (exit 2).")
    data_dir: Path | None = Field(
        None, description="Benchmark data directory: warn when instructions appear in a test split."
    )
    # --- files ---
    cache: Path | None = Field(None, description="Teacher cache (default <out>.cache.jsonl); share it across runs.")
    overwrite: bool = Field(False, description="Replace an output written by a different distill run.")

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, v: Any) -> Any:
        v = [f for f in comma_list(v) if f != "none"]
        unknown = [f for f in v if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter {', '.join(unknown)} (known: {', '.join(FILTERS)}, none)")
        return tuple(v)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown dataset format {v!r} (known: {', '.join(FORMATS)})")
        return v

    def recipe(self) -> dict[str, Any]:
        """The options that change what the teacher is asked or what is kept: part of the run's identity."""
        recipe = {
            "reference": self.reference,
            "final_from": self.final_from,
            "max_new_tokens": self.max_new_tokens,
            "filters": list(self.filters),
            "overlong_factor": self.overlong_factor,
            "trim_cut": self.trim_cut,
        }
        # Only where they differ from the defaults, so a run made before they existed keeps its identity.
        if self.teacher_mode != "stages":
            recipe["teacher_mode"] = self.teacher_mode
        if self.options != "hidden":
            recipe["options"] = self.options
        if self.word_limits:
            recipe["word_limits"] = True
        if self.fit_overlong:
            recipe["fit_overlong"] = True
        if self.samples > 1:
            recipe.update(samples=self.samples, temperature=self.sample_temperature, top_p=self.sample_top_p)
        return recipe


class DistillResult(Result):
    """What a distill run wrote (counts over the whole files, every run of the same command so far) and what its
    teacher did in this run."""

    out: Path
    manifest: Path
    selected: int  # records of the dataset (after dedup and --limit)
    written: int  # rows written (one per kept chain; several per record with --samples)
    filtered: dict[str, int]  # rejected rows by the first check they failed
    resumed: int  # records already done by an earlier run of the same command
    teacher_calls: int
    cache_hits: int
    output_tokens: int
    seconds: float
    written_records: int = 0  # distinct records with at least one written chain
    rejected_records: int = 0  # distinct records with no written chain
    checks: dict[str, Any] = Field(default_factory=dict)  # teacher accuracy, retries, leak rates (whole file)
    manifest_data: dict[str, Any] = Field(default_factory=dict)

    def nothing_kept(self, options: DistillOptions) -> str | None:
        """When no record was written: why (the checks that dropped them) and what to try, in one line; else None."""
        if self.written_records or not self.selected:
            return None
        counts = {k: n for k, n in sorted(self.filtered.items(), key=lambda kv: -kv[1]) if n}
        why = ", ".join(f"{n} {k}" for k, n in counts.items()) or "none rejected, none written"
        tries = []
        if "wrong" in counts:
            if options.options == "hidden":
                tries.append("--options answer (the teacher sees a multiple-choice question's options only then)")
            if options.reference == "hidden":
                tries.append(
                    "--reference hint-on-retry (a wrong chain is written again with the gold answer as a hint)"
                )
        if counts.keys() & {"overlong", "empty", "repetition", "leak", "options"}:
            tries.append(f"--filters (now {','.join(options.filters) or 'none'}) or --max-new-tokens")
        if "format" in counts:
            tries.append("--teacher-mode stages")
        tries.append("a stronger --teacher-model")
        return (
            f"{self.out}: 0 of {self.selected} records kept (rejected: {why}; reasons per chain in "
            f"{self.out.name}.rejected.jsonl); try {'; '.join(tries)}; rerun with --overwrite (or another --out)"
        )

    @property
    def lost(self) -> int:
        """Records neither written nor rejected: 0 unless something went wrong."""
        return self.selected - self.written_records - self.rejected_records
