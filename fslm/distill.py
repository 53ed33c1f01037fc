"""`fslm distill`: a teacher writes, for every instruction of a dataset, the text each stage should produce.

For each record, stages run in order. The teacher gets the stage's role as system message and the stage's own
template (from stack.yaml) rendered with the instruction, the input and the EARLIER STAGES' TEACHER OUTPUTS; when
`show_reference` is on (default) and the record has a reference output, it is appended to earlier stages' prompts
as guidance (`REFERENCE_NOTE`). The final stage's target is the dataset's reference when the record has one, unless
`final_from="teacher"`. Output format: docs/formats.md.

Never pay twice, never lose work:
- every teacher answer goes to a content-addressed cache (key: teacher id, exact prompt, generation settings),
  an append-only JSONL written and fsync'ed per batch;
- every finished record is appended to the output (or, when a quality filter drops it, to `<out>.rejected.jsonl`)
  and fsync'ed; a torn last line from a kill is cut off on the next start;
- a restart with the same command skips records already in either file and answers the rest from the cache, so a
  SIGKILLed run finishes with 0 lost and 0 duplicated records. A different command refuses to append to the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fslm.config import GenerationSettings, StackConfig, StageConfig
from fslm.data import Dataset, Record
from fslm.errors import FslmError
from fslm.files import atomic_write_text
from fslm.prompts import render_user_message, stage_variables
from fslm.teachers import Teacher

FORMAT = "fslm-distill"
FORMAT_VERSION = 1
FILTERS = ("empty", "overlong", "repetition")
# Appended to earlier stages' teacher prompts when the reference is shown. Part of the prompts hash.
REFERENCE_NOTE = (
    "\n\nFor your guidance only, a reference answer to the instruction (write only what this step asks for; "
    "do not copy the reference):\n{reference}"
)


@dataclass
class DistillOptions:
    final_from: Literal["reference", "teacher"] = "reference"
    show_reference: bool = True
    max_new_tokens: int | None = None  # override every stage's budget for the teacher
    filters: tuple[str, ...] = FILTERS
    # overlong: a target with more tokens (student tokenizer) than the stage's max_new_tokens x this factor
    overlong_factor: float = 1.0
    # A teacher output cut at the token limit is trimmed to its last complete sentence or line (when that keeps at
    # least a third of it) instead of counting as overlong.
    trim_cut: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "final_from": self.final_from,
            "show_reference": self.show_reference,
            "max_new_tokens": self.max_new_tokens,
            "filters": list(self.filters),
            "overlong_factor": self.overlong_factor,
            "trim_cut": self.trim_cut,
        }


@dataclass
class DistillResult:
    out: Path
    manifest: Path
    selected: int
    written: int
    filtered: dict[str, int]
    resumed: int  # records already done by an earlier run of the same command
    teacher_calls: int
    cache_hits: int
    output_tokens: int
    seconds: float
    manifest_data: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.selected - self.written - sum(self.filtered.values())


# --- quality filters -----------------------------------------------------------------------------


def is_degenerate(text: str, n: int = 4, min_tokens: int = 16, min_distinct: float = 0.5) -> bool:
    """Degenerate repetition: under half of the text's word 4-grams are distinct (a loop like "the the the")."""
    tokens = re.findall(r"\w+|[^\w\s]", text.casefold())
    if len(tokens) < min_tokens:
        return False
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) < min_distinct


_SENTENCE_END = re.compile(r"(?<!\d)[.!?](?:[\"')\]]*)(?=\s|$)|\n")


def trim_to_sentence(text: str, keep: float = 1 / 3) -> str | None:
    """`text` up to its last complete sentence or line; None when that would keep less than `keep` of it.

    For teacher outputs cut at the token limit: a plan cut inside step 4 becomes a plan of three steps.
    A period after a digit ("1.") is a list marker, not a sentence end.
    """
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return None
    trimmed = text[: ends[-1]].strip()
    return trimmed if trimmed and len(trimmed) >= keep * len(text) else None


def check_target(
    text: str,
    stage: StageConfig,
    filters: Iterable[str],
    count_tokens: Callable[[str], int],
    factor: float,
    cut: bool = False,
) -> str | None:
    """The first filter a stage target fails, or None.

    overlong: the teacher stopped at its token limit (`cut`: the text ends mid-thought), or the target has more
    tokens (student tokenizer) than `factor` x the stage's max_new_tokens, so the stage could never produce it.
    """
    filters = set(filters)
    if "empty" in filters and not text.strip():
        return "empty"
    if "overlong" in filters and factor > 0 and (cut or count_tokens(text) > factor * stage.generation.max_new_tokens):
        return "overlong"
    if "repetition" in filters and is_degenerate(text):
        return "repetition"
    return None


# --- prompts -------------------------------------------------------------------------------------


def teacher_messages(
    stage: StageConfig, record: Record, outputs: dict[str, str], show_reference: bool
) -> tuple[str, str]:
    """(system, user) for the teacher: the stage's role and its template over the earlier teacher outputs."""
    user = render_user_message(stage.template, stage_variables(record.instruction, record.input, outputs, stage.reads))
    if show_reference and record.reference:
        user += REFERENCE_NOTE.format(reference=record.reference)
    return stage.role, user


def prompts_hash(config: StackConfig) -> str:
    """What the teacher is asked, independent of data: roles, templates, reads, budgets, the reference note."""
    stages = [
        s.model_dump(mode="json", include={"name", "role", "template", "reads", "generation"}) for s in config.stages
    ]
    blob = json.dumps({"stages": stages, "reference_note": REFERENCE_NOTE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- append-only JSONL with crash repair ---------------------------------------------------------


class JsonlLog:
    """An append-only JSONL file: each append is one write + fsync.

    Reading ignores a torn last line (a kill mid-write); `open()` cuts it off before the first append, so it is
    never glued to the next record. Nothing is modified until `open()`, so a refused run leaves files untouched.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._f: Any = None
        self._end = 0
        if path.exists():
            data = path.read_bytes()
            self._end = data.rfind(b"\n") + 1
            for n, line in enumerate(data[: self._end].split(b"\n"), 1):
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise FslmError(f"{path}:{n}: not a JSON line (the file was edited or damaged)") from None

    def open(self) -> JsonlLog:
        if self._f is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the run, closed in close()
        if self._f.tell() > self._end:  # a line cut by a crash: drop it, it will be redone
            self._f.truncate(self._end)
            self._sync()
        return self

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self._f.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows))
        self._sync()
        self.rows.extend(rows)

    def truncate(self) -> None:
        self._f.truncate(0)
        self._sync()
        self.rows = []

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class TeacherCache:
    """Content-addressed teacher answers: sha256 over (teacher id, exact prompt, generation settings)."""

    def __init__(self, path: Path) -> None:
        self.log = JsonlLog(path).open()
        self.entries = {r["key"]: r for r in self.log.rows if "key" in r}

    @staticmethod
    def key(teacher_id: str, prompt: str, settings: GenerationSettings) -> str:
        blob = json.dumps(
            {"teacher": teacher_id, "prompt": prompt, "settings": settings.model_dump(mode="json")}, sort_keys=True
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entries: list[dict[str, Any]]) -> None:
        self.log.append(entries)
        self.entries.update((e["key"], e) for e in entries)

    def close(self) -> None:
        self.log.close()


# --- the step ------------------------------------------------------------------------------------


def paths_for(out: Path) -> dict[str, Path]:
    return {
        "out": out,
        "manifest": out.with_name(out.name + ".manifest.json"),
        "rejected": out.with_name(out.name + ".rejected.jsonl"),
        "cache": out.with_name(out.name + ".cache.jsonl"),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("fslm", "torch", "transformers", "peft", "openai", "llama_cpp_python"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


ProgressCallback = Callable[[int, int], None]  # (records finished now, teacher output tokens now)


def distill(
    config: StackConfig,
    dataset: Dataset,
    teacher: Teacher,
    out: str | Path,
    *,
    options: DistillOptions | None = None,
    count_tokens: Callable[[str], int] = lambda s: len(s.split()),
    cache_path: str | Path | None = None,
    overwrite: bool = False,
    contamination: dict[str, Any] | None = None,
    stack_dir: str | Path | None = None,
    on_start: Callable[[int, int], None] | None = None,  # (records to do, records already done)
    on_progress: ProgressCallback | None = None,
) -> DistillResult:
    """Distil per-stage targets for every selected record into `out` (resumable; see the module docstring)."""
    options = options or DistillOptions()
    unknown = sorted(set(options.filters) - set(FILTERS))
    if unknown:
        raise FslmError(f"unknown filter {', '.join(unknown)} (known: {', '.join(FILTERS)})")
    paths = paths_for(Path(out))
    if cache_path is not None:
        paths["cache"] = Path(cache_path)
    run = {
        "dataset_sha256": dataset.sha256,
        "dataset": {k: v for k, v in dataset.describe().items() if k not in ("file",)},
        "teacher": teacher.id,
        "prompts_sha256": prompts_hash(config),
        "options": options.to_dict(),
    }
    outputs = JsonlLog(paths["out"])
    rejected = JsonlLog(paths["rejected"])
    cache: TeacherCache | None = None
    try:
        if any(p.exists() and p.stat().st_size > 0 for p in (paths["out"], paths["rejected"])):
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
        outputs.open()
        rejected.open()
        cache = TeacherCache(paths["cache"])
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
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
            "dataset": dataset.describe(),
            "teacher": teacher.describe(),
            "options": options.to_dict(),
            "cache": str(paths["cache"]),
            "contamination": contamination or {"checked": False},
            "versions": versions(),
            "started": started,
        }
        atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

        done = {r["id"] for r in outputs.rows} | {r["id"] for r in rejected.rows}
        todo = [r for r in dataset.records if r.id not in done]
        resumed = len(dataset.records) - len(todo)
        if on_start is not None:
            on_start(len(todo), resumed)
        stats = {"calls": 0, "hits": 0, "tokens": 0, "trimmed": 0}
        start = time.perf_counter()
        for i in range(0, len(todo), teacher.batch_size):
            chunk = todo[i : i + teacher.batch_size]
            before = stats["tokens"]
            targets, cut = _distill_chunk(config, chunk, teacher, cache, options, stats)
            good, bad = [], []
            for rec in chunk:
                reason = None
                for stage in config.stages:
                    why = check_target(
                        targets[rec.id][stage.name],
                        stage,
                        options.filters,
                        count_tokens,
                        options.overlong_factor,
                        cut=stage.name in cut[rec.id],
                    )
                    if why is not None:
                        reason = (why, stage.name)
                        break
                row = _record_row(rec, targets[rec.id], dataset.path)
                if reason is None:
                    good.append(row)
                else:
                    bad.append({**row, "rejected": {"filter": reason[0], "stage": reason[1]}})
            outputs.append(good)
            rejected.append(bad)
            if on_progress is not None:
                on_progress(len(chunk), stats["tokens"] - before)
        seconds = time.perf_counter() - start

        filtered = {f: 0 for f in FILTERS}
        for r in rejected.rows:
            filtered[r["rejected"]["filter"]] = filtered.get(r["rejected"]["filter"], 0) + 1
        result = DistillResult(
            paths["out"],
            paths["manifest"],
            len(dataset.records),
            len(outputs.rows),
            filtered,
            resumed,
            stats["calls"],
            stats["hits"],
            stats["tokens"],
            seconds,
        )
        manifest.update(
            status="complete",
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            counts={
                "selected": result.selected,
                "written": result.written,
                "filtered": filtered,
                "lost": result.lost,
            },
            last_run={
                "resumed_records": resumed,
                "records": len(todo),
                "teacher_calls": stats["calls"],
                "cache_hits": stats["hits"],
                "targets_trimmed": stats["trimmed"],
                "output_tokens": stats["tokens"],
                "seconds": round(seconds, 3),
                "records_per_second": round(len(todo) / seconds, 4) if seconds > 0 else None,
                "tokens_per_second": round(stats["tokens"] / seconds, 2) if seconds > 0 else None,
            },
            output_sha256=_sha256(paths["out"]),
        )
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
    chunk: list[Record],
    teacher: Teacher,
    cache: TeacherCache,
    options: DistillOptions,
    stats: dict[str, int],
) -> tuple[dict[str, dict[str, str]], dict[str, set[str]]]:
    """Every stage's target for a batch of records: stage by stage, cache first, teacher for the misses.

    Returns (record id -> stage -> target, record id -> stages whose teacher output was cut at the token limit).
    """
    targets: dict[str, dict[str, str]] = {r.id: {} for r in chunk}
    cut: dict[str, set[str]] = {r.id: set() for r in chunk}
    final = config.final_stage.name
    for stage in config.stages:
        settings = stage.generation
        if options.max_new_tokens is not None:
            settings = settings.model_copy(update={"max_new_tokens": options.max_new_tokens})
        asks: list[tuple[Record, tuple[str, str], str]] = []
        for rec in chunk:
            if stage.name == final and rec.reference and options.final_from == "reference":
                targets[rec.id][stage.name] = rec.reference
                continue
            show = options.show_reference and stage.name != final
            messages = teacher_messages(stage, rec, targets[rec.id], show)
            asks.append((rec, messages, TeacherCache.key(teacher.id, teacher.prompt_key(*messages), settings)))
        misses: dict[str, tuple[str, str]] = {}
        for _, messages, key in asks:
            if cache.get(key) is None:
                misses.setdefault(key, messages)
        stats["hits"] += len(asks) - len(misses)
        if misses:
            outs = teacher.generate(list(misses.values()), settings)
            stats["calls"] += len(outs)
            stats["tokens"] += sum(o.output_tokens for o in outs)
            cache.put(
                [
                    {
                        "key": key,
                        "teacher": teacher.id,
                        "stage": stage.name,
                        "text": o.text,
                        "prompt_tokens": o.prompt_tokens,
                        "output_tokens": o.output_tokens,
                        "finished": o.finished,
                    }
                    for key, o in zip(misses, outs, strict=True)
                ]
            )
        for rec, _, key in asks:
            entry = cache.get(key)
            text = entry["text"].strip()
            if not entry.get("finished", True):
                trimmed = trim_to_sentence(text) if options.trim_cut else None
                if trimmed is None:
                    cut[rec.id].add(stage.name)
                else:
                    text = trimmed
                    stats["trimmed"] += 1
            targets[rec.id][stage.name] = text
    return targets, cut


def _record_row(rec: Record, targets: dict[str, str], path: Path) -> dict[str, Any]:
    return {
        "id": rec.id,
        "instruction": rec.instruction,
        "input": rec.input,
        "reference": rec.reference,
        "targets": targets,
        "source": {"file": path.name, "index": rec.index},
    }


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


def _sha256(path: Path) -> str:
    from fslm.files import sha256_file

    return sha256_file(path)


# --- the command ---------------------------------------------------------------------------------


def run_command(
    dataset_path: Path,
    stack_dir: Path,
    out: Path,
    *,
    console: Any,
    teacher_backend: str | None = None,
    teacher_model: str | None = None,
    teacher_url: str | None = None,
    api_key_env: str = "FSLM_API_KEY",
    concurrency: int = 4,
    timeout: float = 120.0,
    max_retries: int = 5,
    batch_size: int = 8,
    options: DistillOptions | None = None,
    format: str = "auto",
    instruction_field: str | None = None,
    input_field: str | None = None,
    output_field: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    strict: bool = False,
    data_dir: Path | None = None,
    cache: Path | None = None,
    overwrite: bool = False,
) -> DistillResult:
    """What `fslm distill` does, with warnings and a progress bar on `console` (stderr)."""
    import logging

    from fslm import models
    from fslm.config import load_config
    from fslm.data import read_dataset
    from fslm.teachers import make_teacher

    log = logging.getLogger("fslm")
    config = load_config(stack_dir)  # validate before any model load
    bad_shown = 0

    def on_bad(row: Any) -> None:
        nonlocal bad_shown
        bad_shown += 1
        if bad_shown <= 20:
            log.warning("skipped bad row %s", row)

    dataset = read_dataset(
        dataset_path,
        format=format,
        instruction_field=instruction_field,
        input_field=input_field,
        output_field=output_field,
        limit=limit,
        seed=seed,
        strict=strict,
        on_bad=on_bad,
    )
    if dataset.bad:
        log.warning(
            "%s: skipped %d bad row(s) of %d (--strict makes them fatal)", dataset_path, len(dataset.bad), dataset.rows
        )
    if dataset.duplicates:
        log.warning(
            "%s: %d duplicate instruction(s) skipped (the first of each is kept)", dataset_path, dataset.duplicates
        )

    contamination: dict[str, Any] | None = None
    if data_dir is not None:
        from fslm.contamination import BenchmarkIndex

        report = BenchmarkIndex.load(data_dir).check((r.id, r.instruction, r.input) for r in dataset.records)
        contamination = {"checked": True, "data_dir": str(data_dir), **report.to_dict()}
        if report.total:
            if strict:
                raise FslmError(f"{dataset_path}: {report.summary()}; refusing with --strict")
            log.warning("%s: %s", dataset_path, report.summary())

    backend = teacher_backend or ("openai" if teacher_url else "torch")
    with console.status(f"loading teacher ({backend})"):
        teacher = make_teacher(
            backend,
            model=teacher_model,
            url=teacher_url,
            base=config.base,
            stack_dir=stack_dir,
            batch_size=batch_size,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
        )
        # Over-long is measured in the student's tokens: what the stage will have to generate.
        student = models.load_tokenizer(models.resolve(config.base.model, stack_dir), config.base)

    def count_tokens(text: str) -> int:
        return len(student(text, add_special_tokens=False)["input_ids"])

    with DistillProgress(console) as progress:
        return distill(
            config,
            dataset,
            teacher,
            out,
            options=options,
            count_tokens=count_tokens,
            cache_path=cache,
            overwrite=overwrite,
            contamination=contamination,
            stack_dir=stack_dir,
            on_start=progress.start,
            on_progress=progress.advance,
        )


class DistillProgress:
    """A rich progress bar with records/s, teacher tokens/s and ETA (rates over this run only)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("distilling"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None
        self.tokens = 0
        self.records = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> DistillProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start(self, todo: int, done: int) -> None:
        self.task = self.progress.add_task("distill", total=todo + done, completed=done, rates="")
        self.t0 = time.perf_counter()

    def advance(self, records: int, tokens: int) -> None:
        self.records += records
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rates = f"{self.records / dt:.2f} rec/s · {self.tokens / dt:.1f} tok/s"
        self.progress.update(self.task, advance=records, rates=rates)
