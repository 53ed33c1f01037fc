"""The rows a distill run writes: each chain checked (format, answer, quality filters, leaks, option references)
and kept or rejected with its reason, and what the manifest reports of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fslm.config import StackConfig
from fslm.data import Dataset, DatasetRecord
from fslm.distilled import DistilledRecord
from fslm.steps.distill.chains import Chain
from fslm.steps.distill.checks import leaks, option_references
from fslm.steps.distill.filters import check_target, fit_to_budget
from fslm.steps.distill.options import DistillOptions


def filter_chains(
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
        fitted = []
        for stage in config.stages:
            if reason is not None:
                break
            text = chain.targets[stage.name]
            budget = options.overlong_factor * stage.generation.max_new_tokens
            fit = options.fit_overlong and "overlong" in options.filters and stage.name != final and budget > 0
            if fit and count_tokens(text) > budget:
                # the answer check read the whole text; later stages' targets were written after it too
                if (short := fit_to_budget(text, budget, count_tokens)) is not None:
                    text = chain.targets[stage.name] = short
                    chain.cut.discard(stage.name)  # it ends on a full sentence now
                    fitted.append(stage.name)
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
                **({"fitted": fitted} if fitted else {}),
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
            same = [r for r in earlier_rows + good if group(r) == rec.id and r["targets"] == chain.targets]
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
        "kept_records": len({group(r) for r in rows}),
        # written rows with a target trimmed to its stage's budget (--fit-overlong)
        "fitted_records": sum(bool(r.get("checks", {}).get("fitted")) for r in rows),
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


def group(row: dict[str, Any]) -> str:
    """The record a row belongs to (samples of one record share it)."""
    return row.get("group") or row["id"]
