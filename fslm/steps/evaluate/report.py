"""What `fslm eval` writes under REPORT/: results.json (every row, the setup, the paired differences, versions),
report.md (the same, to read) and accuracy_vs_cost.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fslm.files import atomic_write_bytes, atomic_write_text
from fslm.provenance import versions
from fslm.steps.evaluate.options import EvalOptions
from fslm.steps.evaluate.stats import markdown_table, system_pairs

VERSIONED = ("fslm", "torch", "transformers", "peft", "lm_eval", "datasets", "llama_cpp_python")


def write_report(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "report.md", report_markdown(results))
    atomic_write_bytes(out / "accuracy_vs_cost.png", plot_png(results))


def results_json(
    directory: Path,
    systems: dict[str, Any],
    setup: dict[str, Any],
    options: EvalOptions,
    tuning: dict[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    """results.json: the rows, the setup, every pair of systems compared on the same items, and versions."""
    return {
        "stack": str(directory.resolve()),
        "systems": systems,
        **setup,
        "data_dir": str(options.data_dir.resolve()),
        "prompt_format": "see docs/eval.md (lm-eval prompts; stack/single wrap the context in the final stage prompt)",
        "pinned": {
            "batch_size": options.batch_size,
            "padding_side": "right (scoring)",
            "logprob_dtype": "float32",
            "compute": "bfloat16 autocast"
            if setup["precision"] == "bf16"
            else "float32"
            if setup.get("backend", "torch") == "torch"
            else f"{setup['backend']}: the model file's own formats (a GGUF's quantisation)",
        },
        "tuning": tuning,
        "paired": [r.to_dict() for r in system_pairs(systems, options.tasks, options.bootstrap, options.seed)],
        "paired_settings": {
            "bootstrap_resamples": options.bootstrap,
            "seed": options.seed,
            "interval": "95 % percentile, paired bootstrap over items",
            "test": "McNemar: exact binomial below 25 discordant items, else chi-square with continuity correction",
        },
        "contamination_warnings": warnings,
        "versions": versions(VERSIONED),
        "peak_rss_note": "peak RSS of the whole process so far (ru_maxrss), so it can only grow from row to row",
    }


def report_markdown(results: dict[str, Any]) -> str:
    """report.md: the accuracy table, then what only some rows have, the stack rows, tuning and the paired tests."""
    lines = [*_accuracy_table(results), *_other_metrics(results), *_stack_rows(results)]
    if results.get("tuning"):
        lines += _tuning(results["tuning"])
    if results.get("paired"):
        lines += _paired(results["paired"], results.get("paired_settings", {}))
    if results["contamination_warnings"]:
        lines += ["", "**Contamination warnings:**", ""] + [f"- {w}" for w in results["contamination_warnings"]]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines += ["", f"Versions: {versions}.", "", "![accuracy vs cost](accuracy_vs_cost.png)", ""]
    return "\n".join(lines)


def _accuracy_table(results: dict[str, Any]) -> list[str]:
    tasks = results["tasks"]
    head = "| system | " + " | ".join(tasks) + " | mean | s/query | params/query | peak RSS MB |"
    lines = [
        f"# fslm eval: {results['stack']}",
        "",
        f"Zero-shot accuracy ± stderr on a seeded subset of the {results.get('split', 'test')} split "
        f"(limit {results['limit']}, seed {results['seed']}), "
        f"scored in {results.get('pinned', {}).get('compute', 'float32')}.",
        "",
        head,
        "|" + "---|" * (len(tasks) + 5),
    ]
    for name, s in results["systems"].items():
        cells = [
            f"{s['tasks'][t]['accuracy']:.3f} ± {s['tasks'][t]['stderr'] or 0:.3f} (n={s['tasks'][t]['n']})"
            for t in tasks
        ]
        mean = sum(s["tasks"][t]["accuracy"] for t in tasks) / len(tasks)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | {s['seconds_per_query']:.3f} | "
            f"{s['parameters_per_query']:,} | {s['peak_rss_mb']} |"
        )
    return lines


def _other_metrics(results: dict[str, Any]) -> list[str]:
    """acc_norm and the generative metric, for the tasks that have them."""
    extra = [
        (name, t, s["tasks"][t])
        for name, s in results["systems"].items()
        for t in results["tasks"]
        if "acc_norm" in s["tasks"][t] or "gen" in s["tasks"][t]
    ]
    if not extra:
        return []
    lines = ["", "| system | task | acc | acc_norm | gen (answered) |", "|---|---|---|---|---|"]
    for name, t, m in extra:
        gen = f"{m['gen']:.3f} ({m.get('answered') or 0:.0%})" if "gen" in m else "-"
        norm = f"{m['acc_norm']:.3f}" if "acc_norm" in m else "-"
        lines.append(f"| {name} | {t} | {m['accuracy']:.3f} | {norm} | {gen} |")
    return lines


def _stack_rows(results: dict[str, Any]) -> list[str]:
    """Per stack row: where its stages ran, how it scored, and how often the fast path wrote PyTorch's text."""
    stack_rows = {n: s for n, s in results["systems"].items() if s.get("system") == "stack"}
    if not stack_rows:
        return []
    lines = ["", "## Stack", ""]
    for name, s in stack_rows.items():
        mode = s.get("stack_scoring", {})
        text = f"- {name}: stages 1..N-1 on **{s.get('stage_backend', 'torch')}** "
        text += f"({s.get('stage_seconds', 0):.0f} s of {s['seconds']:.0f} s); scoring **{mode.get('mode', 'chain')}**"
        settings = ", ".join(f"{k} {v}" for k, v in mode.items() if k not in ("mode", "tuned") and v is not None)
        if settings:
            text += f" ({settings})"
        if mode.get("tuned"):
            text += "; tuned on dev: " + ", ".join(f"{t} {v}" for t, v in mode["tuned"].items())
        lines.append(text)
        agreement = s.get("stage_agreement")
        if agreement and agreement.get("questions"):
            per = ", ".join(f"{k} {v:.0%}" for k, v in agreement["stage_text_equal"].items())
            lines.append(
                f"  - greedy stage text equal to PyTorch's on {agreement['questions']} questions: {per}; "
                f"whole chain {agreement['chain_text_equal']:.0%}"
            )
    return lines


def _tuning(tuning: dict[str, Any]) -> list[str]:
    lines = ["", "Tuning (dev splits only; never the test items):", ""]
    for t, v in tuning.items():
        lines.append(
            f"- {t}: {v['parameter']} = {v['value']} (dev accuracy {v['dev_accuracy']:.3f} on {v['n']} items of "
            f"{v['split']})"
        )
    return lines


def _paired(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Paired differences",
        "",
        f"Same items for both systems; 95 % paired bootstrap interval ({settings.get('bootstrap_resamples')} "
        f"resamples, seed {settings.get('seed')}); McNemar's test ({settings.get('test')}).",
        "",
        *markdown_table(rows),
    ]


def plot_png(results: dict[str, Any]) -> bytes:
    """Mean accuracy against seconds per query, one point per system."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, s in results["systems"].items():
        mean = sum(t["accuracy"] for t in s["tasks"].values()) / len(s["tasks"])
        ax.scatter(s["seconds_per_query"], mean)
        ax.annotate(name, (s["seconds_per_query"], mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("seconds per query (wall, this machine)")
    ax.set_ylabel(f"mean accuracy over {', '.join(results['tasks'])}")
    ax.set_title("fslm eval: accuracy vs cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
