"""`fslm distill`: a teacher writes, for every instruction of a dataset, the text each stage should produce.

For each record the teacher writes the earlier stages in order, each reading its own earlier outputs (prompts in
`fslm.steps.distill.prompts`); what it sees of the record's reference is the *reference policy* (docs/distill.md):

- `hidden` (default): never. Where the answer can be checked (multiple choice, GSM8K), the teacher also answers
  the final stage itself, and a record whose answer is wrong is dropped: only rationales that led the teacher to
  the right answer are kept (Fine-tune-CoT, arXiv 2212.10071; Magister et al., arXiv 2212.08410).
- `hint-on-retry`: blind first; a chain whose answer was checked wrong is written once more with the gold answer as
  a hint in the earlier stages' prompts (never in the final one), and kept only when the teacher, reading those
  stages without the hint, now answers right (STaR's rationalisation; CROP, arXiv 2210.06726).
- `shown`: the reference is appended to every earlier stage's prompt (the first recipe, kept for comparison).

The final stage's target is the gold answer (in the form the evaluation scores it) or the dataset's reference,
unless `final_from="teacher"` for free-text records. Quality filters (`fslm.steps.distill.filters`) and the leak guard
(`fslm.steps.distill.checks.leaks`) reject targets; every rejection is kept in `<out>.rejected.jsonl` with its reason.
`--samples K` writes K sampled chains per record (identical ones dropped). Output format: docs/formats.md.

Never pay twice, never lose work:
- every teacher answer goes to a content-addressed cache (key: teacher id, exact prompt, generation settings),
  an append-only JSONL written and fsync'ed per batch;
- every finished record is appended to the output (or, when a check drops it, to `<out>.rejected.jsonl`)
  and fsync'ed; a torn last line from a kill is cut off on the next start;
- a restart with the same command skips records already in either file and answers the rest from the cache, so a
  SIGKILLed run finishes with 0 lost and 0 duplicated records. A different command refuses to append to the file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fslm.answers import answer_correct, checkable
from fslm.config import GenerationSettings, StackConfig, StageConfig
from fslm.data import FORMATS, Dataset, DatasetRecord
from fslm.distilled import DistilledRecord
from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import JsonlLog, atomic_write_text, exclusive, sha256_file
from fslm.options import Options, comma_list
from fslm.provenance import now, versions
from fslm.steps.distill.cache import TeacherCache
from fslm.steps.distill.checks import leaks, option_references
from fslm.steps.distill.filters import FILTERS, check_target, trim_to_sentence
from fslm.steps.distill.prompts import (
    hint_note,
    join_notes,
    joint_messages,
    options_note,
    prompts_hash,
    reference_note,
    split_sections,
    teacher_messages,
)
from fslm.teachers import Teacher, TeacherSpec

FORMAT = "fslm-distill"
FORMAT_VERSION = 1
# Why a row is rejected: a quality filter, "wrong" (its answer stayed wrong after the policy's retries) or "format"
# (a joint response that cannot be cut into the stack's sections).
REJECTIONS = (*FILTERS, "wrong", "format")
TEACHER_MODES = ("stages", "joint")
log = logging.getLogger("fslm")


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
        if self.samples > 1:
            recipe.update(samples=self.samples, temperature=self.sample_temperature, top_p=self.sample_top_p)
        return recipe


@dataclass
class DistillResult:
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
    checks: dict[str, Any] = field(default_factory=dict)  # teacher accuracy, retries, leak rates (whole file)
    manifest_data: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Records neither written nor rejected: 0 unless something went wrong."""
        return self.selected - self.written_records - self.rejected_records


def paths_for(out: Path) -> dict[str, Path]:
    return {
        "out": out,
        "manifest": out.with_name(out.name + ".manifest.json"),
        "rejected": out.with_name(out.name + ".rejected.jsonl"),
        "cache": out.with_name(out.name + ".cache.jsonl"),
    }


# --- the step ------------------------------------------------------------------------------------


def distill(
    dataset: str | Path,
    stack: str | Path,
    out: str | Path,
    options: DistillOptions | None = None,
    on_event: EventHandler | None = None,
) -> DistillResult:
    """Teacher-written targets for every stage of the stack in `stack`, for the records of `dataset`, into `out`.

    Resumable: rerun the same call and it continues where a killed run stopped.
    """
    from fslm import models
    from fslm.config import load_config
    from fslm.data import read_dataset
    from fslm.teachers import make_teacher

    options = options or DistillOptions()
    dataset_path, stack_dir = Path(dataset), Path(stack)
    config = load_config(stack_dir)  # validate before any model load
    data = read_dataset(
        dataset_path,
        format=options.format,
        instruction_field=options.instruction_field,
        input_field=options.input_field,
        output_field=options.output_field,
        limit=options.limit,
        seed=options.seed,
        strict=options.strict,
        on_bad=_warn_bad_rows(),
    )
    if data.bad:
        log.warning(
            "%s: skipped %d bad row(s) of %d (--strict makes them fatal)", dataset_path, len(data.bad), data.rows
        )
    if data.duplicates:
        log.warning(
            "%s: %d duplicate instruction(s) skipped (the first of each is kept)", dataset_path, data.duplicates
        )
    contamination = _contamination(data, options, dataset_path)

    log.info("loading the teacher (%s)", options.teacher.resolved_backend)
    teacher = make_teacher(options.teacher, config.base, stack_dir)
    # Over-long is measured in the student's tokens: what the stage will have to generate.
    student = models.load_tokenizer(models.resolve(config.base.model, stack_dir), config.base)

    def count_tokens(text: str) -> int:
        return len(student(text, add_special_tokens=False)["input_ids"])

    return distill_records(
        config,
        data,
        teacher,
        out,
        options=options,
        count_tokens=count_tokens,
        contamination=contamination,
        stack_dir=stack_dir,
        on_event=on_event,
    )


def _warn_bad_rows(shown: int = 20) -> Callable[[Any], None]:
    count = 0

    def on_bad(row: Any) -> None:
        nonlocal count
        count += 1
        if count <= shown:
            log.warning("skipped bad row %s", row)

    return on_bad


def _contamination(data: Dataset, options: DistillOptions, path: Path) -> dict[str, Any] | None:
    """Instructions that appear in a benchmark test split: a warning, or (strict) a refusal."""
    if options.data_dir is None:
        return None
    from fslm.contamination import BenchmarkIndex

    report = BenchmarkIndex.load(options.data_dir).check((r.id, r.instruction, r.input) for r in data.records)
    if report.total:
        if options.strict:
            raise FslmError(f"{path}: {report.summary()}; refusing with --strict")
        log.warning("%s: %s", path, report.summary())
    return {"checked": True, "data_dir": str(options.data_dir), **report.to_dict()}


def distill_records(
    config: StackConfig,
    dataset: Dataset,
    teacher: Teacher,
    out: str | Path,
    *,
    options: DistillOptions | None = None,
    count_tokens: Callable[[str], int] = lambda s: len(s.split()),
    contamination: dict[str, Any] | None = None,
    stack_dir: str | Path | None = None,
    on_event: EventHandler | None = None,
) -> DistillResult:
    """The step itself, on a read dataset and a built teacher (tests and other tools call this directly).

    The output and the teacher cache are locked for the run: a second distill on either exits 2 naming the holder
    instead of writing every record twice."""
    options = options or DistillOptions()
    paths = paths_for(Path(out))
    if options.cache is not None:
        paths["cache"] = Path(options.cache)
    out_lock = paths["out"].with_name(paths["out"].name + ".lock")
    cache_lock = paths["cache"].with_name(paths["cache"].name + ".lock")
    with exclusive(out_lock, str(paths["out"])), exclusive(cache_lock, f"the teacher cache {paths['cache']}"):
        return _distill_locked(
            config, dataset, teacher, paths, options, count_tokens, contamination, stack_dir, on_event
        )


def _distill_locked(
    config: StackConfig,
    dataset: Dataset,
    teacher: Teacher,
    paths: dict[str, Path],
    options: DistillOptions,
    count_tokens: Callable[[str], int],
    contamination: dict[str, Any] | None,
    stack_dir: str | Path | None,
    on_event: EventHandler | None,
) -> DistillResult:
    run = {
        "dataset_sha256": dataset.sha256,
        "dataset": {k: v for k, v in dataset.describe().items() if k not in ("file",)},
        "teacher": teacher.id,
        "prompts_sha256": prompts_hash(config, options.teacher_mode, options.options),
        "options": options.recipe(),
    }
    outputs = JsonlLog(paths["out"])
    rejected = JsonlLog(paths["rejected"])
    cache: TeacherCache | None = None
    try:
        _check_same_run(paths, run, options.overwrite, outputs, rejected)
        outputs.open()
        rejected.open()
        cache = TeacherCache(paths["cache"])
        manifest = _start_manifest(config, dataset, teacher, paths, options, run, contamination, stack_dir)
        done = {_group(r) for r in outputs.rows} | {_group(r) for r in rejected.rows}
        todo = [r for r in dataset.records if r.id not in done]
        resumed = len(dataset.records) - len(todo)
        stats = {"calls": 0, "hits": 0, "tokens": 0, "prompt_tokens": 0, "trimmed": 0}
        start = time.perf_counter()
        emit(on_event, Progress("distill", "records", resumed, len(dataset.records)))
        for i in range(0, len(todo), teacher.batch_size):
            chunk = todo[i : i + teacher.batch_size]
            good, bad = [], []
            for sample in range(options.samples):
                chains = _distill_chunk(config, chunk, teacher, cache, options, stats, sample, count_tokens)
                kept, dropped = _filter_chunk(config, chunk, chains, options, count_tokens, dataset, sample, good)
                good += kept
                bad += dropped
            outputs.append(good)
            rejected.append(bad)
            finished = i + len(chunk)
            dt = max(time.perf_counter() - start, 1e-9)
            rates = {"rate": f"{finished / dt:.2f} rec/s · {stats['tokens'] / dt:.1f} tok/s"}
            emit(on_event, Progress("distill", "records", resumed + finished, len(dataset.records), rates))
        seconds = time.perf_counter() - start
        result = _result(config, dataset, paths, outputs.rows, rejected.rows, resumed, stats, seconds)
        manifest.update(
            status="complete",
            finished=now(),
            counts={
                "selected": result.selected,
                "written": result.written,
                "written_records": result.written_records,
                "rejected_records": result.rejected_records,
                "filtered": result.filtered,
                "lost": result.lost,
            },
            checks=result.checks,
            teacher_mode=options.teacher_mode,
            target_tokens=target_tokens(config, outputs.rows, count_tokens),
            last_run={
                "resumed_records": resumed,
                "records": len(todo),
                "teacher_calls": stats["calls"],
                "cache_hits": stats["hits"],
                "targets_trimmed": stats["trimmed"],
                "output_tokens": stats["tokens"],
                "prompt_tokens": stats["prompt_tokens"],
                "seconds": round(seconds, 3),
                "records_per_second": round(len(todo) / seconds, 4) if seconds > 0 else None,
                "tokens_per_second": round(stats["tokens"] / seconds, 2) if seconds > 0 else None,
            },
            output_sha256=sha256_file(paths["out"]),
        )
        atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        result.manifest_data = manifest
        return result
    finally:
        outputs.close()
        rejected.close()
        if cache is not None:
            cache.close()


def _start_manifest(
    config: StackConfig,
    dataset: Dataset,
    teacher: Teacher,
    paths: dict[str, Path],
    options: DistillOptions,
    run: dict[str, Any],
    contamination: dict[str, Any] | None,
    stack_dir: str | Path | None,
) -> dict[str, Any]:
    """The manifest written at the start (status running): what this run is, so a rerun can tell it is the same."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "running",
        "run": run,
        "stack": {
            "directory": str(stack_dir) if stack_dir is not None else None,
            "name": config.name,
            "stages": config.stage_names,
            "prompts_sha256": run["prompts_sha256"],
        },
        "teacher_mode": options.teacher_mode,
        "dataset": dataset.describe(),
        "teacher": teacher.describe(),
        "options": options.recipe(),
        "cache": str(paths["cache"]),
        "contamination": contamination or {"checked": False},
        "versions": versions(),
        "started": now(),
    }
    atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _result(
    config: StackConfig,
    dataset: Dataset,
    paths: dict[str, Path],
    rows: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    resumed: int,
    stats: dict[str, int],
    seconds: float,
) -> DistillResult:
    """Counts over the whole files (every run of this command so far), this run's teacher figures."""
    filtered = {f: 0 for f in REJECTIONS}
    for r in rejected:
        filtered[r["rejected"]["filter"]] = filtered.get(r["rejected"]["filter"], 0) + 1
    written_groups = {_group(r) for r in rows}
    return DistillResult(
        paths["out"],
        paths["manifest"],
        len(dataset.records),
        len(rows),
        filtered,
        resumed,
        stats["calls"],
        stats["hits"],
        stats["tokens"],
        seconds,
        written_records=len(written_groups),
        rejected_records=len({_group(r) for r in rejected} - written_groups),
        checks=summarise_checks(config, rows, rejected),
    )


def _group(row: dict[str, Any]) -> str:
    """The record a row belongs to (samples of one record share it)."""
    return row.get("group") or row["id"]


def _check_same_run(
    paths: dict[str, Path], run: dict[str, Any], overwrite: bool, outputs: JsonlLog, rejected: JsonlLog
) -> None:
    """Append only to files of the same run; `overwrite` empties files of another run first."""
    if not any(p.exists() and p.stat().st_size > 0 for p in (paths["out"], paths["rejected"])):
        return
    previous = _read_manifest(paths["manifest"])
    if overwrite:
        outputs.open().truncate()
        rejected.open().truncate()
    elif previous is None or previous.get("run") != run:
        differs = _differences(previous.get("run") if previous else None, run)
        raise FslmError(
            f"{paths['out']}: already holds records from a different distill run ({differs}); "
            "pass --overwrite to replace them (cached teacher answers are kept) or choose another --out"
        )


@dataclass
class Chain:
    """One record's teacher chain: every stage's target, and what the checks found."""

    targets: dict[str, str] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)  # stages whose teacher output stopped at the token limit
    noted: bool = False  # the intermediate stages were written with the reference (shown) or a hint visible
    retried: bool = False  # the blind answer was wrong, so the chain was written again with a hint (hint-on-retry)
    hinted: bool = False  # ... and that hinted chain answered right, so it is the one kept
    teacher_answer: str | None = None  # the teacher's own final-stage answer, when it was asked for one
    correct: bool | None = None  # that answer checked against the gold one (None: not checkable)
    blind_correct: bool | None = None  # the first, blind chain's answer checked
    format_problem: tuple[str, str | None] | None = None  # joint mode: why the response has no usable sections


class _Asker:
    """The teacher with the cache in front: one batched call per stage (or per joint response) for every record that
    still needs it."""

    def __init__(self, teacher: Teacher, cache: TeacherCache, stats: dict[str, int], options: DistillOptions):
        self.teacher, self.cache, self.stats, self.options = teacher, cache, stats, options

    def settings(self, base: GenerationSettings, sample: int, max_new_tokens: int | None = None) -> GenerationSettings:
        """`base` with the run's budget override (else `max_new_tokens`, else its own) and, with --samples, sampling."""
        budget = self.options.max_new_tokens or max_new_tokens
        settings = base.model_copy(update={"max_new_tokens": budget}) if budget is not None else base
        if self.options.samples > 1:  # every chain of a record sampled; the seed tells them apart
            seed = self.options.seed * 1000 + sample
            o = self.options
            settings = settings.model_copy(
                update={"temperature": o.sample_temperature, "top_p": o.sample_top_p, "seed": seed}
            )
        return settings

    def ask(
        self,
        stage: StageConfig,
        asks: list[tuple[DatasetRecord, dict[str, str], str | None]],
        sample: int,
        max_new_tokens: int | None = None,
    ) -> list[tuple[str, bool]]:
        """(text, cut) per (record, earlier outputs, note) for one stage."""
        settings = self.settings(stage.generation, sample, max_new_tokens)
        messages = [teacher_messages(stage, rec, outputs, note) for rec, outputs, note in asks]
        return self.ask_messages(stage.name, messages, settings)

    def ask_messages(
        self, label: str, messages: list[tuple[str, str]], settings: GenerationSettings
    ) -> list[tuple[str, bool]]:
        """(text, cut) per (system, user) pair: cache first, the teacher for the misses (`label`: the stage, or
        `joint`, names the cache entries and keys the teacher's prefix cache)."""
        keyed = [(m, TeacherCache.key(self.teacher.id, self.teacher.prompt_key(*m), settings)) for m in messages]
        misses: dict[str, tuple[str, str]] = {}
        for m, key in keyed:
            if self.cache.get(key) is None:
                misses.setdefault(key, m)
        self.stats["hits"] += len(keyed) - len(misses)
        empty: dict[str, dict[str, Any]] = {}  # empty answers are used now but never cached (a rerun asks again)
        if misses:
            keys = list(misses)

            def keep(i: int, o: Any) -> None:  # every answer is cached the moment it arrives
                self.stats["calls"] += 1
                self.stats["tokens"] += o.output_tokens
                self.stats["prompt_tokens"] += o.prompt_tokens
                entry = {
                    "key": keys[i],
                    "teacher": self.teacher.id,
                    "stage": label,
                    "text": o.text,
                    "prompt_tokens": o.prompt_tokens,
                    "output_tokens": o.output_tokens,
                    "finished": o.finished,
                }
                if o.text.strip():
                    self.cache.put([entry])
                else:
                    empty[keys[i]] = entry

            self.teacher.generate(list(misses.values()), settings, keep, label=label)
        results = []
        for _, key in keyed:
            entry = self.cache.get(key) or empty[key]
            text, cut = entry["text"].strip(), not entry.get("finished", True)
            if cut:
                trimmed = trim_to_sentence(text) if self.options.trim_cut else None
                if trimmed is not None:
                    text, cut = trimmed, False
                    self.stats["trimmed"] += 1
            results.append((text, cut))
        return results


def answer_budget(stage: StageConfig, records: list[DatasetRecord], count_tokens: Callable[[str], int]) -> int:
    """The final stage's teacher budget: its own, or for multiple choice what naming the longest option takes."""
    if records and all(r.choices for r in records):
        longest = max(count_tokens(c) for r in records for c in r.choices or [""])
        return min(stage.generation.max_new_tokens, 2 * longest + 16)
    return stage.generation.max_new_tokens


def joint_budget(config: StackConfig, records: list[DatasetRecord], count_tokens: Callable[[str], int]) -> int:
    """A joint response's budget: every earlier stage's, the final one's (sized to the data), and the headers."""
    earlier = sum(s.generation.max_new_tokens for s in config.stages[:-1])
    return earlier + answer_budget(config.final_stage, records, count_tokens) + 8 * len(config.stages)


def _distill_chunk(
    config: StackConfig,
    chunk: list[DatasetRecord],
    teacher: Teacher,
    cache: TeacherCache,
    options: DistillOptions,
    stats: dict[str, int],
    sample: int = 0,
    count_tokens: Callable[[str], int] = lambda s: len(s.split()),
) -> dict[str, Chain]:
    """Every stage's target for a batch of records under the reference policy (module docstring): stage by stage,
    batched across the records, or (joint mode) one response per record holding every stage."""
    asker = _Asker(teacher, cache, stats, options)
    final = config.final_stage
    earlier = config.stages[:-1]
    policy = options.reference
    shown = options.options == "shown"  # in every request; "answer": only where the teacher names its answer

    def with_options(
        note_of: Callable[[DatasetRecord], str | None], final_answer: bool = False
    ) -> Callable[[DatasetRecord], str | None]:
        if shown or (final_answer and options.options == "answer"):
            return lambda r: join_notes(note_of(r), options_note(r, final=final_answer))
        return note_of

    def write_stages(recs: list[DatasetRecord], note_of: Callable[[DatasetRecord], str | None]) -> dict[str, Chain]:
        chains = {r.id: Chain(noted=note_of(r) is not None) for r in recs}
        told = with_options(note_of)
        for stage in earlier:
            texts = asker.ask(stage, [(r, chains[r.id].targets, told(r)) for r in recs], sample)
            for r, (text, cut) in zip(recs, texts, strict=True):
                chains[r.id].targets[stage.name] = text
                if cut:
                    chains[r.id].cut.add(stage.name)
        return chains

    def write_joint(recs: list[DatasetRecord], note_of: Callable[[DatasetRecord], str | None]) -> dict[str, Chain]:
        """One response per record; its final section is the teacher's own answer (unless a note was shown)."""
        chains = {r.id: Chain(noted=note_of(r) is not None) for r in recs}
        if not recs:
            return chains
        messages = [joint_messages(config, r, note_of(r), shown) for r in recs]
        base = final.generation.model_copy(update={"repetition_penalty": 1.0})  # headers repeat by design
        settings = asker.settings(base, sample, joint_budget(config, recs, count_tokens))
        for r, (text, cut) in zip(recs, asker.ask_messages("joint", messages, settings), strict=True):
            chain = chains[r.id]
            sections = split_sections(text, config)
            chain.targets = {s.name: sections.targets.get(s.name, "") for s in config.stages}
            if sections.problem is not None:
                why = sections.problem + (" (cut at the token limit)" if cut else "")
                chain.format_problem = (why, sections.stage)
            elif cut:
                chain.cut.add(final.name)
            # Its own final section is its answer, unless a note was shown or the options wait for the answer call.
            if sections.problem is None and not chain.noted and not (options.options == "answer" and r.choices):
                chain.teacher_answer = chain.targets[final.name]
        return chains

    def answer(recs: list[DatasetRecord], chains: dict[str, Chain]) -> None:
        """The teacher's own final-stage answer (never with a note but the options), checked where it can be."""
        recs = [r for r in recs if chains[r.id].format_problem is None]
        if not recs:
            return
        need = [r for r in recs if chains[r.id].teacher_answer is None]
        if need:
            note = with_options(lambda _: None, final_answer=True)
            budget = answer_budget(final, need, count_tokens)
            texts = asker.ask(final, [(r, chains[r.id].targets, note(r)) for r in need], sample, budget)
            for r, (text, cut) in zip(need, texts, strict=True):
                chains[r.id].teacher_answer = text
                if cut:
                    chains[r.id].cut.add(final.name)
        for r in recs:
            chains[r.id].correct = answer_correct(chains[r.id].teacher_answer or "", r)

    write_chains = write_joint if options.teacher_mode == "joint" else write_stages
    note = reference_note if policy == "shown" else (lambda _: None)
    chains = write_chains(chunk, note)
    # Which records the teacher answers itself: checkable ones (unless the reference is shown, today's recipe),
    # and those whose final target comes from the teacher.
    checked = [r for r in chunk if policy != "shown" and checkable(r)]
    checked_ids = {r.id for r in checked}
    own = [r for r in chunk if r.id not in checked_ids and not (r.reference and options.final_from == "reference")]
    own_ids = {r.id for r in own}
    answer(checked + own, chains)
    for r in checked:
        chains[r.id].blind_correct = chains[r.id].correct
    if policy == "hint-on-retry":
        wrong = [r for r in checked if chains[r.id].correct is False]
        retried = write_chains(wrong, hint_note)
        answer(wrong, retried)
        for r in wrong:
            chains[r.id].retried = True  # a failed retry keeps the blind chain, but the retry is still counted
            retried[r.id].retried, retried[r.id].hinted, retried[r.id].blind_correct = True, True, False
            if retried[r.id].correct:
                chains[r.id] = retried[r.id]
    for r in chunk:
        chain = chains[r.id]
        if chain.format_problem is not None:
            continue
        if r.id in own_ids:
            chain.targets[final.name] = chain.teacher_answer or ""
        else:
            chain.targets[final.name] = r.reference or ""
            chain.cut.discard(final.name)  # the teacher's answer was only checked, not kept
    return chains


def _filter_chunk(
    config: StackConfig,
    chunk: list[DatasetRecord],
    chains: dict[str, Chain],
    options: DistillOptions,
    count_tokens: Callable[[str], int],
    dataset: Dataset,
    sample: int,
    earlier_rows: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to keep, rows rejected with the first check that failed). A sampled chain identical to one already kept
    for the same record is dropped silently (it would only repeat a training example)."""
    good, bad = [], []
    final = config.final_stage.name
    for rec in chunk:
        chain = chains[rec.id]
        reason = None
        if chain.format_problem is not None:
            reason = ("format", chain.format_problem[1] or final)
        elif chain.correct is False:
            reason = ("wrong", final)
        for stage in config.stages:
            if reason is not None:
                break
            text = chain.targets[stage.name]
            why = check_target(
                text, stage, options.filters, count_tokens, options.overlong_factor, cut=stage.name in chain.cut
            )
            if why is None and "leak" in options.filters and stage.name != final and chain.noted and leaks(text, rec):
                why = "leak"
            if why is None and "options" in options.filters and stage.name != final and option_references(text, rec):
                why = "options"
            if why is not None:
                reason = (why, stage.name)
        extra: dict[str, Any] = {
            "checks": {
                "teacher_answer": chain.teacher_answer,
                "correct": chain.correct,
                "blind_correct": chain.blind_correct,
                "retried": chain.retried,
                "hinted": chain.hinted,
                "noted": chain.noted,
                "leaks": [s.name for s in config.stages[:-1] if leaks(chain.targets[s.name], rec)],
                "option_references": {
                    s.name: hit for s in config.stages[:-1] if (hit := option_references(chain.targets[s.name], rec))
                },
            }
        }
        if rec.choices is not None:
            extra.update(choices=rec.choices, gold=rec.gold, answer_format=rec.answer_format)
        if options.samples > 1:
            extra.update(group=rec.id, sample=sample)
        row = DistilledRecord(
            id=rec.id if sample == 0 else f"{rec.id}-{sample}",
            instruction=rec.instruction,
            input=rec.input,
            reference=rec.reference,
            targets=chain.targets,
            source={"file": Path(rec.file).name, "index": rec.index},
            extra=extra,
        ).to_row()
        if reason is None:
            same = [r for r in earlier_rows + good if _group(r) == rec.id and r["targets"] == chain.targets]
            if not same:
                good.append(row)
        else:
            rejected = {"filter": reason[0], "stage": reason[1]}
            if reason[0] == "format" and chain.format_problem is not None:
                rejected["detail"] = chain.format_problem[0]
            bad.append({**row, "rejected": rejected})
    return good, bad


def summarise_checks(config: StackConfig, rows: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    """What the manifest reports of the checks: teacher accuracy (blind and after hints), and per intermediate stage
    the share of targets that contain the reference (written and rejected rows together, first chains only)."""
    first = [r for r in rows + rejected if r.get("sample", 0) == 0 and "checks" in r]
    checked = [r for r in first if r["checks"].get("blind_correct") is not None]
    blind = sum(bool(r["checks"]["blind_correct"]) for r in checked)
    retried = [r for r in checked if r["checks"].get("retried", r["checks"].get("hinted"))]
    rescued = sum(bool(r["checks"].get("hinted") and r["checks"].get("correct")) for r in retried)
    leak_rate = {}
    for stage in config.stages[:-1]:
        n = sum(stage.name in r["checks"].get("leaks", []) for r in first)
        leak_rate[stage.name] = {"leaking": n, "of": len(first), "rate": round(n / len(first), 4) if first else None}
    targets = sum(v["of"] for v in leak_rate.values())
    pointing = [r for r in first if r["checks"].get("option_references")]
    return {
        "checked_records": len(checked),
        "teacher_blind_correct": blind,
        "teacher_blind_accuracy": round(blind / len(checked), 4) if checked else None,
        "retried_with_hint": len(retried),
        "correct_after_hint": rescued,
        "kept_records": len({_group(r) for r in rows}),
        "leaks": leak_rate,
        "leak_rate_all_intermediate": round(sum(v["leaking"] for v in leak_rate.values()) / targets, 4)
        if targets
        else None,
        # Chains whose intermediate targets point at the options (letters, positions, two wrong options' texts);
        # `in_written_rows` is 0 whenever the options filter is on.
        "option_references": {
            "chains": len(pointing),
            "of": len(first),
            "in_written_rows": sum(bool(r.get("checks", {}).get("option_references")) for r in rows),
        },
    }


def target_tokens(
    config: StackConfig, rows: list[dict[str, Any]], count_tokens: Callable[[str], int]
) -> dict[str, dict[str, float]]:
    """Per stage, the written targets' length in student tokens (mean, 90th percentile, max): what the stage's
    budget has to hold."""
    out = {}
    for stage in config.stages:
        lengths = sorted(count_tokens(r["targets"].get(stage.name, "")) for r in rows)
        if lengths:
            p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
            out[stage.name] = {"mean": round(sum(lengths) / len(lengths), 1), "p90": p90, "max": lengths[-1]}
    return out


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _differences(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    if previous is None:
        return "no matching manifest beside it"
    keys = [k for k in current if previous.get(k) != current[k]]
    return "differs in " + ", ".join(keys) if keys else "unknown difference"
