"""`fslm distill`: a teacher writes, for every instruction of a dataset, the text each stage should produce.

For each record the teacher writes the earlier stages in order, each reading its own earlier outputs (prompts in
prompts.py); what it sees of the record's reference is the *reference policy* (docs/distill.md):

- `hidden` (default): never. Where the answer can be checked (multiple choice, GSM8K), the teacher also answers
  the final stage itself, and a record whose answer is wrong is dropped: only rationales that led the teacher to
  the right answer are kept (Fine-tune-CoT, arXiv 2212.10071; Magister et al., arXiv 2212.08410).
- `hint-on-retry`: blind first; a chain whose answer was checked wrong is written once more with the gold answer as
  a hint in the earlier stages' prompts (never in the final one), and kept only when the teacher, reading those
  stages without the hint, now answers right (STaR's rationalisation; CROP, arXiv 2210.06726).
- `shown`: the reference is appended to every earlier stage's prompt (the first recipe, kept for comparison).

The final stage's target is the gold answer (in the form the evaluation scores it) or the dataset's reference,
unless `final_from="teacher"` for free-text records. Quality filters (filters.py) and the leak guard
(checks.py) reject targets; every rejection is kept in `<out>.rejected.jsonl` with its reason.
`--samples K` writes K sampled chains per record (identical ones dropped). Output format: docs/formats.md.

Never pay twice, never lose work:
- every teacher answer goes to a content-addressed cache (key: teacher id, exact prompt, generation settings),
  an append-only JSONL written and fsync'ed per batch;
- every finished record is appended to the output (or, when a check drops it, to `<out>.rejected.jsonl`)
  and fsync'ed; a torn last line from a kill is cut off on the next start;
- a restart with the same command skips records already in either file and answers the rest from the cache, so a
  SIGKILLed run finishes with 0 lost and 0 duplicated records. A different command refuses to append to the file.

The parts: options.py (what it can be told, what it returns), chains.py (the teacher writes and answers), rows.py
(each chain kept or rejected), manifest.py (the run's identity and files), cache.py, prompts.py, filters.py,
checks.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fslm import models
from fslm.config import StackConfig, load_config
from fslm.contamination import BenchmarkIndex
from fslm.data import Dataset, DatasetRecord, read_dataset
from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import JsonlLog, atomic_write_text, check_file_target, exclusive
from fslm.steps.distill.cache import TeacherCache
from fslm.steps.distill.chains import Asker, ChainWriter
from fslm.steps.distill.manifest import check_same_run, complete_manifest, paths_for, run_identity, start_manifest
from fslm.steps.distill.options import REJECTIONS, DistillOptions, DistillResult
from fslm.steps.distill.rows import filter_chains, group, summarise_checks, target_tokens
from fslm.teachers import Teacher, make_teacher

log = logging.getLogger("fslm")


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
    options = options or DistillOptions()
    dataset_path, stack_dir = Path(dataset), Path(stack)
    config = load_config(stack_dir)  # validate before any model load
    check_targets(Path(out), options)
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
    student_ref = models.resolve_base(config.base, stack_dir)  # a misspelled base fails here, naming its line

    log.info("loading the teacher (%s)", options.teacher.resolved_backend)
    teacher = make_teacher(options.teacher, config.base, stack_dir)
    # Over-long is measured in the student's tokens: what the stage will have to generate.
    student = models.load_tokenizer(student_ref, config.base)

    def count_tokens(text: str) -> int:
        return len(student(text, add_special_tokens=False)["input_ids"])

    try:
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
    finally:  # the teacher made here is freed here: a step after it in this process (training) needs the memory
        if (close := getattr(teacher, "close", None)) is not None:  # optional for a caller's own teacher object
            close()


def check_targets(out: Path, options: DistillOptions) -> None:
    """The output and the files beside it can be written (before the teacher loads, which takes a while)."""
    paths = paths_for(out)
    check_file_target(out, "--out")
    for key in ("manifest", "rejected"):
        check_file_target(paths[key], f"--out (beside it, {paths[key].name})")
    check_file_target(options.cache or paths["cache"], "--cache" if options.cache else f"--out ({paths['cache'].name})")


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
    check_targets(Path(out), options)
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
    run = run_identity(config, dataset, teacher, options)
    outputs = JsonlLog(paths["out"])
    rejected = JsonlLog(paths["rejected"])
    cache: TeacherCache | None = None
    try:
        check_same_run(paths, run, options.overwrite, outputs, rejected)
        outputs.open()
        rejected.open()
        cache = TeacherCache(paths["cache"])
        manifest = start_manifest(config, dataset, teacher, paths, options, run, contamination, stack_dir)
        done = {group(r) for r in outputs.rows} | {group(r) for r in rejected.rows}
        todo = [r for r in dataset.records if r.id not in done]
        resumed = len(dataset.records) - len(todo)
        stats = {"calls": 0, "hits": 0, "tokens": 0, "prompt_tokens": 0, "trimmed": 0}
        start = time.perf_counter()
        emit(on_event, Progress("distill", "records", resumed, len(dataset.records)))
        for i in range(0, len(todo), teacher.batch_size):
            chunk = todo[i : i + teacher.batch_size]
            _distill_chunk(
                config, dataset, chunk, Asker(teacher, cache, stats, options), outputs, rejected, count_tokens
            )
            finished = i + len(chunk)
            dt = max(time.perf_counter() - start, 1e-9)
            rates = {"rate": f"{finished / dt:.2f} rec/s · {stats['tokens'] / dt:.1f} tok/s"}
            emit(on_event, Progress("distill", "records", resumed + finished, len(dataset.records), rates))
        seconds = time.perf_counter() - start
        result = _result(config, dataset, paths, outputs.rows, rejected.rows, resumed, stats, seconds)
        tokens = target_tokens(config, outputs.rows, count_tokens)
        complete_manifest(manifest, result, stats, len(todo), seconds, options.teacher_mode, tokens, paths["out"])
        atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        result.manifest_data = manifest
        return result
    finally:
        outputs.close()
        rejected.close()
        if cache is not None:
            cache.close()


def _distill_chunk(
    config: StackConfig,
    dataset: Dataset,
    chunk: list[DatasetRecord],
    asker: Asker,
    outputs: JsonlLog,
    rejected: JsonlLog,
    count_tokens: Callable[[str], int],
) -> None:
    """A batch of records, every sample of each: their chains written, checked, and appended to either file."""
    options = asker.options
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for sample in range(options.samples):
        chains = ChainWriter(config, asker, options, sample, count_tokens).write(chunk)
        kept, dropped = filter_chains(config, chunk, chains, options, count_tokens, dataset, sample, good)
        good += kept
        bad += dropped
    outputs.append(good)
    rejected.append(bad)


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
    written_groups = {group(r) for r in rows}
    return DistillResult(
        out=paths["out"],
        manifest=paths["manifest"],
        selected=len(dataset.records),
        written=len(rows),
        filtered=filtered,
        resumed=resumed,
        teacher_calls=stats["calls"],
        cache_hits=stats["hits"],
        output_tokens=stats["tokens"],
        seconds=seconds,
        written_records=len(written_groups),
        rejected_records=len({group(r) for r in rejected} - written_groups),
        checks=summarise_checks(config, rows, rejected),
    )
