"""A distill run's files and its manifest: what the run is (its identity), so that a rerun of the same command
resumes where a killed one stopped and a different command refuses to append to the same output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fslm.config import StackConfig
from fslm.data import Dataset
from fslm.errors import FslmError
from fslm.files import JsonlLog, atomic_write_text, sha256_file
from fslm.provenance import now, versions
from fslm.steps.distill.options import DistillOptions, DistillResult
from fslm.steps.distill.prompts import prompts_hash
from fslm.teachers import Teacher

FORMAT = "fslm-distill"
FORMAT_VERSION = 1


def paths_for(out: Path) -> dict[str, Path]:
    """The output and the files beside it: its manifest, the rejected rows and the teacher cache."""
    return {
        "out": out,
        "manifest": out.with_name(out.name + ".manifest.json"),
        "rejected": out.with_name(out.name + ".rejected.jsonl"),
        "cache": out.with_name(out.name + ".cache.jsonl"),
    }


def run_identity(config: StackConfig, dataset: Dataset, teacher: Teacher, options: DistillOptions) -> dict[str, Any]:
    """What makes two runs the same: the data, the teacher, the prompts and the recipe."""
    return {
        "dataset_sha256": dataset.sha256,
        "dataset": {k: v for k, v in dataset.describe().items() if k not in ("file",)},
        "teacher": teacher.id,
        "prompts_sha256": prompts_hash(config, options.teacher_mode, options.options, options.word_limits),
        "options": options.recipe(),
    }


def check_same_run(
    paths: dict[str, Path], run: dict[str, Any], overwrite: bool, outputs: JsonlLog, rejected: JsonlLog
) -> None:
    """Append only to files of the same run; `overwrite` empties files of another run first."""
    if not any(p.exists() and p.stat().st_size > 0 for p in (paths["out"], paths["rejected"])):
        return
    previous = read_manifest(paths["manifest"])
    if overwrite:
        outputs.open().truncate()
        rejected.open().truncate()
    elif previous is None or previous.get("run") != run:
        differs = differences(previous.get("run") if previous else None, run)
        raise FslmError(
            f"{paths['out']}: already holds records from a different distill run ({differs}); "
            "pass --overwrite to replace them (cached teacher answers are kept) or choose another --out"
        )


def start_manifest(
    config: StackConfig,
    dataset: Dataset,
    teacher: Teacher,
    paths: dict[str, Path],
    options: DistillOptions,
    run: dict[str, Any],
    contamination: dict[str, Any] | None,
    stack_dir: str | Path | None,
) -> dict[str, Any]:
    """The manifest written at the start (status running): what this run is, so a rerun can tell it is the same.
    A resumed run carries the earlier runs' `runs` over: a resume that distils nothing must not erase how many
    teacher calls and seconds the records cost."""
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
        "runs": [] if options.overwrite else earlier_runs(read_manifest(paths["manifest"]), run),
    }
    atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def complete_manifest(
    manifest: dict[str, Any],
    result: DistillResult,
    stats: dict[str, int],
    records: int,
    seconds: float,
    teacher_mode: str,
    tokens: dict[str, dict[str, float]],
    out: Path,
) -> dict[str, Any]:
    """The manifest once the run is done: the counts of both files, the checks, the targets' lengths (`tokens`),
    and what this run's teacher did (`records` distilled now, in `seconds`)."""
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
        teacher_mode=teacher_mode,
        target_tokens=tokens,
        last_run={
            "resumed_records": result.resumed,
            "records": records,
            "teacher_calls": stats["calls"],
            "cache_hits": stats["hits"],
            "targets_trimmed": stats["trimmed"],
            "output_tokens": stats["tokens"],
            "prompt_tokens": stats["prompt_tokens"],
            "seconds": round(seconds, 3),
            "records_per_second": round(records / seconds, 4) if seconds > 0 else None,
            "tokens_per_second": round(stats["tokens"] / seconds, 2) if seconds > 0 else None,
        },
        output_sha256=sha256_file(out),
    )
    if records > 0:  # the history keeps the runs that distilled something
        this = {"started": manifest["started"], "finished": manifest["finished"], **manifest["last_run"]}
        manifest["runs"] = [*manifest.get("runs", []), {**this, "versions": manifest["versions"]}]
    return manifest


def earlier_runs(previous: dict[str, Any] | None, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of the same distillation before this one (a manifest from before `runs` existed gives its last)."""
    if previous is None or previous.get("run") != run:
        return []
    if "runs" in previous:
        return list(previous["runs"])
    last = previous.get("last_run")
    if not last or not last.get("records"):
        return []
    return [{"started": previous.get("started"), "finished": previous.get("finished"), **last,
             "versions": previous.get("versions")}]  # fmt: skip


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def differences(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    if previous is None:
        return "no matching manifest beside it"
    keys = [k for k in current if previous.get(k) != current[k]]
    return "differs in " + ", ".join(keys) if keys else "unknown difference"
