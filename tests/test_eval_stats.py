"""Paired statistics (fslm/steps/eval_stats.py) and `fslm eval compare`: hand-checked numbers."""

from __future__ import annotations

import json
import math

import pytest

from fslm.errors import FslmError
from fslm.steps.evaluate.stats import bootstrap_interval, compare_runs, mcnemar, paired

# 20 items: 7 only A gets right, 2 only B, 5 both, 6 neither
A = [1] * 7 + [0] * 2 + [1] * 5 + [0] * 6
B = [0] * 7 + [1] * 2 + [1] * 5 + [0] * 6


def test_mcnemar_exact_binomial_by_hand():
    a_only, b_only, p, test = mcnemar(A, B)
    assert (a_only, b_only) == (7, 2) and test == "exact binomial"
    # P(X <= 2 | n = 9, 1/2) = (1 + 9 + 36) / 512; two-sided doubles it
    assert p == pytest.approx(2 * 46 / 512, abs=1e-12)


def test_mcnemar_chi_square_for_many_discordant_items():
    a = [1] * 30 + [0] * 10 + [1] * 50
    b = [0] * 30 + [1] * 10 + [1] * 50
    a_only, b_only, p, test = mcnemar(a, b)
    assert (a_only, b_only) == (30, 10) and test.startswith("chi-square")
    statistic = (abs(30 - 10) - 1) ** 2 / 40  # 9.025
    assert p == pytest.approx(math.erfc(math.sqrt(statistic / 2)), rel=1e-9)  # chi2(1) tail = normal two-sided tail
    assert p == pytest.approx(0.002663, abs=2e-6)


def test_no_discordant_items_means_p_one():
    assert mcnemar([1, 0, 1], [1, 0, 1])[2] == 1.0


def test_paired_difference_and_bootstrap_interval():
    r = paired("arc_easy", "acc", "a", A, "b", B, resamples=10_000, seed=0)
    assert (r.n, r.acc_a, r.acc_b) == (20, 0.6, 0.35)
    assert r.diff == pytest.approx(0.25)
    # the large-sample interval is 0.25 +- 1.96 * sqrt(0.3875 / 20) = (-0.023, 0.523); the bootstrap of 20 items
    # moves in steps of 0.05
    assert -0.1 <= r.ci_low <= 0.05 and 0.45 <= r.ci_high <= 0.55
    assert r.ci_low < r.diff < r.ci_high
    # seeded: the same interval again, another seed may differ by a step at most
    assert bootstrap_interval(A, B, 10_000, 0) == (r.ci_low, r.ci_high)


def test_bootstrap_agrees_with_resampling_item_indices():
    """The multinomial shortcut is the item bootstrap: compare with explicit index resampling."""
    import numpy as np

    a = [1] * 40 + [0] * 25 + [1] * 100 + [0] * 35
    b = [0] * 40 + [1] * 25 + [1] * 100 + [0] * 35
    d = np.array(a) - np.array(b)
    rng = np.random.default_rng(7)
    brute = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(4000)]
    low, high = bootstrap_interval(a, b, 10_000, 1)
    assert low == pytest.approx(np.percentile(brute, 2.5), abs=0.01)
    assert high == pytest.approx(np.percentile(brute, 97.5), abs=0.01)


def test_degenerate_interval_when_every_difference_is_the_same():
    """Every item differs the same way: every resample has the same difference."""
    assert bootstrap_interval([1, 1, 1], [0, 0, 0]) == (1.0, 1.0)
    assert bootstrap_interval([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)


def _run(path, systems: dict[str, dict[str, list]], tasks=("arc_easy",)):
    """A minimal results.json: per system, per task ids + acc."""
    path.mkdir(parents=True, exist_ok=True)
    data = {
        "tasks": list(tasks),
        "systems": {
            name: {"items": {t: {"ids": ids, "acc": acc} for t in tasks}} for name, (ids, acc) in systems.items()
        },
    }
    (path / "results.json").write_text(json.dumps(data))
    return path


def test_compare_runs_matches_items_by_id(tmp_path):
    ids = [f"q{i}" for i in range(20)]
    # run B lists the same items in reverse order plus two it alone scored
    run_a = _run(tmp_path / "a", {"stack": (ids, A)})
    run_b = _run(tmp_path / "b", {"stack": ([*reversed(ids), "x1", "x2"], [*reversed(B), 1, 1])})
    report = compare_runs(run_a, run_b, metrics=["acc"], resamples=2000, seed=3)
    (row,) = report["rows"]
    assert (row["a"], row["b"], row["n"]) == ("A:stack", "B:stack", 20)
    assert row["diff"] == pytest.approx(0.25) and (row["a_only"], row["b_only"]) == (7, 2)
    assert row["p_value"] == pytest.approx(2 * 46 / 512)
    assert report["unmatched_items"] == {"arc_easy": 2}


def test_compare_cli_json_and_errors(tmp_path):
    from typer.testing import CliRunner

    from fslm.cli import app

    ids = [f"q{i}" for i in range(20)]
    run_a = _run(tmp_path / "a", {"base": (ids, B), "stack": (ids, A)})
    run_b = _run(tmp_path / "b", {"single": (ids, B)})
    result = CliRunner().invoke(app, ["eval", "compare", str(run_a), str(run_b), "--metric", "acc", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    # no system name in common: every pair
    assert [(r["a"], r["b"]) for r in rows] == [("A:base", "B:single"), ("A:stack", "B:single")]
    assert rows[0]["diff"] == 0 and rows[0]["p_value"] == 1.0 and rows[1]["diff"] == pytest.approx(0.25)
    table = CliRunner().invoke(app, ["eval", "compare", str(run_a), str(run_b), "--systems-a", "stack"])
    assert table.exit_code == 0 and "+25.0 pts" in table.output
    missing = CliRunner().invoke(app, ["eval", "compare", str(run_a), str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no results.json" in missing.output
    bad = CliRunner().invoke(app, ["eval", "compare", str(run_a), str(run_b), "--systems-b", "stack"])
    assert bad.exit_code == 2 and "no per-item results for system(s) stack" in bad.output.replace("\n", "")


def test_repeated_ids_refuse_to_pair(tmp_path):
    run_a = _run(tmp_path / "a", {"s": (["q1", "q1"], [1, 0])})
    with pytest.raises(FslmError, match="repeated item id"):
        compare_runs(run_a, run_a)
