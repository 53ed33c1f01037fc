"""Paired statistics for `fslm eval`: is system A really better than system B on the same items?

Two systems scored on the same questions are *paired*: most of the noise of a 200-item accuracy (±3.5 points) is which
items were drawn, and that noise is shared. Comparing the per-item correctness vectors instead of two accuracies
with their separate standard errors removes it:

- the accuracy difference with a 95 % paired bootstrap interval (items resampled with replacement, both systems
  together, seeded). Resampling n items from the per-item differences d_i in {-1, 0, +1} is exactly a multinomial
  draw of how many +1, -1 and 0 items the resample holds, so we draw those three counts instead of n indices:
  the same distribution, in memory that does not grow with n (MMLU has 14k items);
- McNemar's test on the discordant items (A right and B wrong: b; A wrong and B right: c): the exact two-sided
  binomial test when b + c < 25, else the chi-square statistic with continuity correction, (|b - c| - 1)^2 / (b + c),
  on one degree of freedom (the usual rule, e.g. statsmodels' `mcnemar`).

`compare_runs` does the same across two `results.json` files, matching items by their id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fslm.errors import FslmError

RESAMPLES = 10_000
EXACT_BELOW = 25  # discordant pairs; below this McNemar's chi-square approximation is poor
METRICS = ("acc", "acc_norm", "gen")


@dataclass(frozen=True)
class PairedResult:
    """A minus B on the same n items: accuracy difference, its 95 % bootstrap interval, McNemar's test."""

    task: str
    metric: str
    a: str
    b: str
    n: int
    acc_a: float
    acc_b: float
    diff: float
    ci_low: float
    ci_high: float
    a_only: int  # items A gets right and B wrong (McNemar's b)
    b_only: int  # items B gets right and A wrong (McNemar's c)
    p_value: float
    test: str  # "exact binomial" or "chi-square (continuity-corrected)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_interval(
    a: Sequence[int | bool], b: Sequence[int | bool], resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over `resamples` paired bootstrap resamples (see the module docstring)."""
    import numpy as np

    n = _check_pair(a, b)
    if n == 0:
        return (0.0, 0.0)
    plus = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    minus = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [plus / n, minus / n, (n - plus - minus) / n], size=resamples)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return (float(low), float(high))


def mcnemar(a: Sequence[int | bool], b: Sequence[int | bool]) -> tuple[int, int, float, str]:
    """(A-only right, B-only right, two-sided p-value, test used) for paired correctness vectors."""
    from scipy import stats

    _check_pair(a, b)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = a_only + b_only
    if n == 0:
        return a_only, b_only, 1.0, "exact binomial"
    if n < EXACT_BELOW:
        p = stats.binomtest(min(a_only, b_only), n, 0.5, alternative="two-sided").pvalue
        return a_only, b_only, min(1.0, float(p)), "exact binomial"
    statistic = (abs(a_only - b_only) - 1) ** 2 / n
    return a_only, b_only, float(stats.chi2.sf(statistic, 1)), "chi-square (continuity-corrected)"


def paired(
    task: str,
    metric: str,
    name_a: str,
    a: Sequence[int | bool],
    name_b: str,
    b: Sequence[int | bool],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedResult:
    n = _check_pair(a, b)
    acc_a = sum(map(bool, a)) / n if n else 0.0
    acc_b = sum(map(bool, b)) / n if n else 0.0
    low, high = bootstrap_interval(a, b, resamples, seed)
    a_only, b_only, p, test = mcnemar(a, b)
    return PairedResult(
        task, metric, name_a, name_b, n, acc_a, acc_b, acc_a - acc_b, low, high, a_only, b_only, p, test
    )


def _check_pair(a: Sequence[Any], b: Sequence[Any]) -> int:
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length ({len(a)} vs {len(b)})")
    return len(a)


# --- per-item records in results.json ------------------------------------------------------------------


def item_map(items: dict[str, Any], metric: str) -> dict[str, int]:
    """{item id: 0/1} of one task's per-item record ({"ids": [...], "acc": [...], ...}); empty without that metric
    or when its values are not right/wrong."""
    values = items.get(metric)
    if values is None:
        return {}
    if any(v not in (0, 1) for v in values):
        return {}  # a graded score (TruthfulQA mc2's true mass) has no right/wrong to pair
    ids = items["ids"]
    if len(set(ids)) != len(ids):
        raise FslmError("per-item records hold a repeated item id; cannot pair items")
    return {i: int(v) for i, v in zip(ids, values, strict=True)}


def pair_on_ids(x: dict[str, int], y: dict[str, int]) -> tuple[list[str], list[int], list[int]]:
    """The items both maps have (in x's order), and each side's correctness on them."""
    common = [i for i in x if i in y]
    return common, [x[i] for i in common], [y[i] for i in common]


def system_pairs(
    systems: dict[str, Any], tasks: Iterable[str], resamples: int = RESAMPLES, seed: int = 0
) -> list[PairedResult]:
    """Every pair of systems of one run, per task and metric, on the items both scored (A listed before B)."""
    names = [n for n, s in systems.items() if s.get("items")]
    rows = []
    for task in tasks:
        for metric in METRICS:
            for i, name_a in enumerate(names):
                for name_b in names[i + 1 :]:
                    x = item_map(systems[name_a]["items"].get(task, {}), metric)
                    y = item_map(systems[name_b]["items"].get(task, {}), metric)
                    _, a, b = pair_on_ids(x, y)
                    if a:
                        rows.append(paired(task, metric, name_a, a, name_b, b, resamples, seed))
    return rows


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    systems_a: list[str] | None = None,
    systems_b: list[str] | None = None,
    metrics: Sequence[str] = METRICS,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two `fslm eval` runs, matching items by (task, item id).

    Which systems are compared: the given ones; by default every system name both runs have (A's `stack` against
    B's `stack`), or every pair when they share none. Rows are named `A:<system>` and `B:<system>`.
    """
    a, b = _load_run(run_a), _load_run(run_b)
    names_a = systems_a or [n for n in a["systems"] if a["systems"][n].get("items")]
    names_b = systems_b or [n for n in b["systems"] if b["systems"][n].get("items")]
    for run, wanted, path in ((a, names_a, run_a), (b, names_b, run_b)):
        missing = [n for n in wanted if n not in run["systems"] or not run["systems"][n].get("items")]
        if missing:
            known = ", ".join(n for n, s in run["systems"].items() if s.get("items")) or "none"
            raise FslmError(f"{path}: no per-item results for system(s) {', '.join(missing)} (has: {known})")
    if systems_a or systems_b:
        pairs = [(x, y) for x in names_a for y in names_b]
    else:
        pairs = [(x, x) for x in names_a if x in names_b] or [(x, y) for x in names_a for y in names_b]
    tasks = [t for t in a["tasks"] if t in b["tasks"]]
    if not tasks:
        raise FslmError(f"{run_a} and {run_b} share no task ({', '.join(a['tasks'])} vs {', '.join(b['tasks'])})")
    rows, unmatched = [], {}
    for task in tasks:
        for metric in metrics:
            for x, y in pairs:
                left = item_map(a["systems"][x]["items"].get(task, {}), metric)
                right = item_map(b["systems"][y]["items"].get(task, {}), metric)
                if not left or not right:
                    continue
                ids, va, vb = pair_on_ids(left, right)
                unmatched[task] = max(unmatched.get(task, 0), len(left) + len(right) - 2 * len(ids))
                if ids:
                    rows.append(paired(task, metric, f"A:{x}", va, f"B:{y}", vb, resamples, seed))
    if not rows:
        raise FslmError(f"{run_a} and {run_b}: no item id in common on any shared task")
    return {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "resamples": resamples,
        "seed": seed,
        "unmatched_items": unmatched,
        "rows": [r.to_dict() for r in rows],
    }


def _load_run(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FslmError(f"{p}: no results.json (give an `fslm eval --out` directory or its results.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        data["systems"], data["tasks"]  # noqa: B018 - the fields every run has
    except (ValueError, KeyError, TypeError) as e:
        raise FslmError(f"{p}: not an fslm eval results.json ({e})") from None
    return data


def markdown_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Report lines: one row per pair, difference in points with its interval, discordant counts, p-value."""
    lines = [
        "| task | metric | A | B | n | acc A | acc B | A − B (95 % CI) | A only / B only | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['a']} | {r['b']} | {r['n']} | {r['acc_a']:.3f} | {r['acc_b']:.3f} | "
            f"{100 * r['diff']:+.1f} pts ({100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}) | "
            f"{r['a_only']} / {r['b_only']} | {format_p(r['p_value'])} |"
        )
    return lines


def format_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"
