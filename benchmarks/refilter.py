"""What other filter options would have kept of the same teacher outputs, with no teacher: `fslm distill`'s own
checks (fslm.steps.distill.rows.filter_chains) re-applied to a distilled file's written and rejected rows.

    python benchmarks/refilter.py --stack data/exp2-mc/stack --data-dir ../shared/data \
        --questions-per-hour 231 --out docs/results/2026-12-08/refilter.json data/exp2-mc/distilled-*_train.jsonl

Each file is first re-filtered with the options its manifest records; that must give back the file's own kept rows
and rejection reasons record for record (else the script says where it differs and exits 1). Then with
`--fit-overlong` (the change measured): how many more records are kept, which stages were fitted, and, given the
teacher's measured questions an hour for these settings, the kept records an hour both ways. A target the teacher
stopped at its token limit is not marked in the rows; a record rejected as overlong at a stage whose target fits its
budget must have been one, and stays marked cut (fitting cannot rescue it: trimming already failed on it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from fslm import models
from fslm.config import load_config
from fslm.data import read_dataset
from fslm.files import atomic_write_text
from fslm.provenance import versions
from fslm.steps.distill import DistillOptions
from fslm.steps.distill.chains import Chain
from fslm.steps.distill.rows import filter_chains


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="distilled files (their manifests and rejected files beside)")
    p.add_argument("--stack", type=Path, required=True, help="the stack they were distilled for (budgets, tokenizer)")
    p.add_argument("--data-dir", type=Path, required=True, help="where the manifests' DATA_DIR/ paths point")
    p.add_argument("--filters", default=None, help="the filters of the re-filtered runs (default: each manifest's)")
    p.add_argument("--questions-per-hour", type=float, default=None, help="the teacher's measured rate, for kept/h")
    p.add_argument("--out", type=Path, default=None, help="JSON with the counts per file")
    return p.parse_args(argv)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def chain_of(row: dict[str, Any], config: Any, count_tokens: Any) -> Chain:
    """The Chain a row was written from, as far as the rows keep it."""
    checks = row.get("checks", {})
    chain = Chain(
        targets=dict(row["targets"]),
        noted=bool(checks.get("noted")),
        retried=bool(checks.get("retried")),
        hinted=bool(checks.get("hinted")),
        teacher_answer=checks.get("teacher_answer"),
        correct=checks.get("correct"),
        blind_correct=checks.get("blind_correct"),
    )
    why = row.get("rejected")
    if why and why["filter"] == "format":
        chain.format_problem = (why.get("detail", ""), why["stage"])
    if why and why["filter"] == "overlong":
        stage = next(s for s in config.stages if s.name == why["stage"])
        if count_tokens(chain.targets.get(stage.name, "")) <= stage.generation.max_new_tokens:
            chain.cut.add(stage.name)  # within its budget, so it was dropped for stopping mid-thought
    return chain


def refilter(path: Path, config: Any, count_tokens: Any, data_dir: Path, filters: str | None) -> dict[str, Any]:
    manifest = json.loads(Path(f"{path}.manifest.json").read_text(encoding="utf-8"))
    spec = manifest["dataset"]
    data = read_dataset(
        Path(spec["file"].replace("DATA_DIR", str(data_dir))),
        format=spec["format"],
        limit=spec.get("limit"),
        seed=spec.get("seed", 0),
    )
    rows, rejected = jsonl(path), jsonl(Path(f"{path}.rejected.jsonl"))
    by_id = {r["id"]: r for r in rows + rejected}
    records = [rec for rec in data.records if rec.id in by_id]
    recorded = {r["id"]: None for r in rows} | {r["id"]: r["rejected"]["filter"] for r in rejected}
    out: dict[str, Any] = {"file": path.name, "questions": len(records), "options": manifest["run"]["options"]}
    written = manifest["run"]["options"]
    changed = {**written, **({"filters": filters} if filters is not None else {})}
    runs = {"as_written": written, **({"with_filters": changed} if changed != written else {})}
    runs["fit_overlong"] = {**changed, "fit_overlong": True}
    out["filters_reapplied"] = list(DistillOptions(**changed).filters)
    for name, settings in runs.items():
        options = DistillOptions(**settings)
        chains = {rec.id: chain_of(by_id[rec.id], config, count_tokens) for rec in records}
        good, bad = filter_chains(config, records, chains, options, count_tokens, data, 0, [])
        reasons = {r["id"]: None for r in good} | {r["id"]: r["rejected"]["filter"] for r in bad}
        filtered = Counter(r["rejected"]["filter"] for r in bad)
        fitted = Counter(stage for r in good for stage in r["checks"].get("fitted", []))
        out[name] = {"kept": len(good), "filtered": dict(filtered), "fitted_targets": dict(fitted)}
        if name == "as_written":
            differ = sorted(i for i in recorded if reasons.get(i, "missing") != recorded[i])
            out["reproduces_the_file"] = not differ
            out["differs"] = differ[:20]
    return out


def share(n: int, of: int) -> str:
    return f"{n} ({n / of:.0%})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.stack)
    tokenizer = models.load_tokenizer(models.resolve_base(config.base, args.stack), config.base)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    parts = [refilter(f, config, count_tokens, args.data_dir, args.filters) for f in args.files]
    names = [k for k in ("as_written", "with_filters", "fit_overlong") if k in parts[0]]
    total = {"questions": sum(p["questions"] for p in parts), **{k: sum(p[k]["kept"] for p in parts) for k in names}}
    head = {
        "as_written": "kept as written",
        "with_filters": "kept with --filters",
        "fit_overlong": "... and --fit-overlong",
    }
    print(f"filters re-applied: {','.join(parts[0]['filters_reapplied'])}")
    print(f"| file | questions | {' | '.join(head[k] for k in names)} | fitted targets (stage) |")
    print(f"|---|---:|{'---:|' * len(names)}---|")
    for p in parts:
        kept = [p[k]["kept"] for k in names]
        fitted = ", ".join(f"{k} {v}" for k, v in p["fit_overlong"]["fitted_targets"].items()) or "-"
        print(f"| {p['file']} | {p['questions']} | {' | '.join(share(n, p['questions']) for n in kept)} | {fitted} |")
    print(f"| all | {total['questions']} | {' | '.join(share(total[k], total['questions']) for k in names)} | |")
    if args.questions_per_hour:
        rate = args.questions_per_hour
        total["kept_per_hour"] = {k: round(rate * total[k] / total["questions"], 1) for k in names}
        print(f"\nkept an hour at {rate:g} questions an hour: {total['kept_per_hour']}")
    bad = [p["file"] for p in parts if not p["reproduces_the_file"]]
    if bad:
        print(f"re-filtering with the manifests' own options does not reproduce: {', '.join(bad)}", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"argv": sys.argv[1:], "parts": parts, "total": total, "versions": versions()}
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
