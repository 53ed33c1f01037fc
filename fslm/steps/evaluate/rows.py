"""One system's row of `fslm eval`: its metrics per task, its cost, its per-item records, and the key a saved row is
reused under (the part of the setup the row depends on: a stack-only option never recomputes the base row)."""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path
from typing import Any

from fslm.errors import FslmError
from fslm.files import sha256_file
from fslm.precision import resolve as resolve_precision
from fslm.stackdir import StackDir
from fslm.steps.evaluate.options import EvalOptions, tuning_needed


def row_name(system: str, ablated: str | None) -> str:
    return f"stack-ablate-{ablated}" if ablated else system


# Options that only the stack rows read: changing one must not recompute the base and single rows.
STACK_ONLY = ("stage_tokens", "stage_backend", "stage_batch", "stack_scoring")


def row_key(setup: dict[str, Any], system: str, stages: list[str]) -> str:
    """The part of the eval setup a row of `system` depends on, hashed: a saved row is reused only under its key."""
    uses = stages if system == "stack" else [] if system == "base" else [system]
    own = {k: v for k, v in setup.items() if system == "stack" or k not in STACK_ONLY}
    own["adapters"] = {a: h for a, h in setup["adapters"].items() if a in uses}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:16]


def chain_key(setup: dict[str, Any], stages: list[str]) -> str:
    """What a greedy chain's stage texts depend on, hashed: the stages' adapters, their token budget, where they
    generate (backend, batch, precision). Another eval of the same stack (a gate row after the chain row, another
    task list) reuses a chain only under this key."""
    own = {k: setup.get(k) for k in ("stage_tokens", "stage_backend", "stage_batch", "precision")}
    own["adapters"] = {a: h for a, h in setup["adapters"].items() if a in stages}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:16]


def tuning_chains_key(setup: dict[str, Any], stages: list[str], options: EvalOptions) -> str:
    """What the dev chains of a λ / τ tuning depend on: the greedy chain's key, and the sampled chains' count,
    temperature and seed."""
    sampled = {"chains": options.chains, "temperature": options.chain_temperature, "seed": options.seed}
    return chain_key(setup, stages) + ":" + hashlib.sha256(json.dumps(sampled).encode()).hexdigest()[:8]


def gate_capped(options: EvalOptions) -> bool:
    """The gate's τ is tuned under a chain-rate cap (a given τ ignores the cap)."""
    return (
        options.stack_scoring == "gate" and options.gate_threshold is None and options.gate_max_chain_rate is not None
    )


def adapter_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every adapter's weights: a retrained adapter must not reuse a finished row."""
    adapters = StackDir(directory).adapters
    if not adapters.is_dir():
        return {}
    return {p.parent.name: sha256_file(p) for p in sorted(adapters.glob("*/adapter_model.safetensors"))}


def setup(directory: Path, options: EvalOptions, stage_backend: str, data_hashes: dict[str, Any]) -> dict[str, Any]:
    """Everything a row's numbers depend on: saved in results.json and hashed into each row's resume key."""
    ensemble = {"chains": options.chains, "temperature": options.chain_temperature, "weight": options.ensemble_weight}
    return {
        "precision": resolve_precision(options.precision, "eval scoring"),
        **({"backend": options.backend} if options.backend not in (None, "torch") else {}),  # torch rows keep keys
        "tasks": options.tasks,
        **({"split": options.split} if options.split != "test" else {}),  # test rows keep their earlier keys
        "limit": options.limit,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "stage_tokens": options.stage_tokens,
        "data_hashes": data_hashes,
        "stage_backend": stage_backend,
        "stage_batch": options.stage_batch,
        "stack_scoring": {
            "mode": options.stack_scoring,
            **(ensemble if options.stack_scoring == "ensemble" else {}),
            **({"threshold": options.gate_threshold} if options.stack_scoring == "gate" else {}),
            **({"max_chain_rate": options.gate_max_chain_rate} if gate_capped(options) else {}),  # earlier keys kept
            **({"tune_limit": options.tune_limit} if tuning_needed(options) else {}),
        },
        "generative": options.generative,
        "gen_tokens": options.gen_tokens,
        "adapters": adapter_hashes(directory),
    }


def system_row(
    lm: Any, result: dict[str, Any], tasks: list[str], gen_tasks: list[str], seconds: float, precision: str
) -> dict[str, Any]:
    """One system's row: metrics per task, cost, and the per-item records the paired statistics read."""
    metrics, items, queries = {}, {}, 0
    samples = result.get("samples", {})
    for t in tasks:
        r = result["results"][f"fslm_{t}"]
        n = int(result.get("n-samples", {}).get(f"fslm_{t}", {}).get("effective", r.get("sample_len", 0)))
        metrics[t] = {**_metrics(r), "n": n}
        if t in gen_tasks:
            g = result["results"][f"fslm_{t}_gen"]
            metrics[t].update(gen=g["gen,none"], gen_stderr=g.get("gen_stderr,none"), answered=g.get("answered,none"))
        items[t] = _item_records(samples.get(f"fslm_{t}", []), samples.get(f"fslm_{t}_gen"))
        if getattr(lm, "scoring", "chain") == "gate" and lm.records:
            items[t].update(_gate_records(lm.records, t, samples.get(f"fslm_{t}", [])))
        queries += n
    return {
        "system": lm.system,
        "ablated_stage": lm.ablate,
        "adapters": lm.adapters,
        "tasks": metrics,
        "seconds": round(seconds, 2),
        "seconds_per_query": round(seconds / max(queries, 1), 4),
        "peak_rss_mb": _peak_rss_mb(),
        "parameters_per_query": lm.parameters_per_query(),
        "earlier_stage_runs": lm.stage_calls,
        "precision": precision,
        "items": items,
    }


def stack_details(lm: Any, setup: dict[str, Any], tuning: dict[str, Any], options: EvalOptions) -> dict[str, Any]:
    """What only a stack row records: where its stages ran and for how long, and how it scored choices."""
    details: dict[str, Any] = {"stage_backend": lm.stage_backend, "stage_seconds": round(lm.stage_seconds, 2)}
    if lm.resumed_chains:
        details["stage_chains_resumed"] = lm.resumed_chains  # from a killed run; their seconds are included
    if lm.borrowed_chains:
        details["stage_chains_borrowed"] = lm.borrowed_chains  # from --chains-from; their seconds are included
    if lm.borrowed_prefixes:  # an ablated row: the stages before the ablated one, from --chains-from; not timed here
        details["stage_prefixes_borrowed"] = lm.borrowed_prefixes
    details["stack_scoring"] = {
        **setup["stack_scoring"],
        **({"tuned": {t: v["value"] for t, v in tuning.items()}} if tuning else {}),
        "questions_with_chain": lm.chain_questions if options.stack_scoring != "chain" else None,
    }
    return details


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _metrics(task_result: dict[str, Any]) -> dict[str, Any]:
    """acc (or GSM8K's flexible exact match) + stderr + acc_norm when the task has it."""
    for key in ("acc,none", "exact_match,flexible-extract", "exact_match,strict-match"):
        if key in task_result:
            metric, filt = key.split(",")
            out = {
                "metric": metric if filt == "none" else f"{metric} ({filt})",
                "accuracy": task_result[key],
                "stderr": task_result.get(f"{metric}_stderr,{filt}"),
            }
            if "acc_norm,none" in task_result:
                out["acc_norm"] = task_result["acc_norm,none"]
                out["acc_norm_stderr"] = task_result.get("acc_norm_stderr,none")
            return out
    raise FslmError(f"lm-eval returned no accuracy metric ({', '.join(task_result)})")


def _gate_records(records: dict[tuple[str, Any], Any], task: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The gate's per-item path record, in `_item_records`' order: the direct path's margin, whether the direct path
    alone was right (acc), and whether the chain answered. With the chain row's per-item acc (the same greedy chains,
    e.g. through --chains-from) this gives the test accuracy at any τ, e.g. a τ picked on dev under a cost cap."""
    from fslm.steps.evaluate.scoring import argmax

    rows = sorted({s["doc_id"]: s for s in samples}.values(), key=lambda s: s["doc_id"])
    picked = [records.get((f"fslm_{task}", s["doc_id"])) for s in rows]
    if any(r is None for r in picked):
        return {}
    return {
        "direct_margin": [round(r.margin, 6) for r in picked],
        "direct_acc": [int(argmax(r.direct) == int(s["doc"]["gold"])) for r, s in zip(picked, rows, strict=True)],
        "chained": [int(r.chain_ran) for r in picked],
    }


def _item_records(samples: list[dict[str, Any]], gen_samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Per-item correctness of one task, columnar: ids and one 0/1 (or score) list per metric.

    lm-eval logs one sample per document and filter; GSM8K's flexible-extract filter is its reported metric, as in
    `_metrics`. Ids come from the documents (fslm.benchmark_files gives every row a stable `id`)."""
    filters = {s.get("filter") for s in samples}
    keep = "flexible-extract" if "flexible-extract" in filters else ("none" if "none" in filters else None)
    rows = sorted((s for s in samples if keep is None or s.get("filter") == keep), key=lambda s: s["doc_id"])
    ids = [str(s["doc"].get("id", s["doc_id"])) for s in rows]
    out: dict[str, Any] = {"ids": ids}
    for metric, source in (("acc", "acc"), ("acc_norm", "acc_norm"), ("acc", "exact_match")):
        if rows and source in rows[0] and metric not in out:
            out[metric] = [round(float(s[source]), 4) for s in rows]
    if gen_samples:
        by_id = {str(s["doc"].get("id", s["doc_id"])): s for s in gen_samples}
        out["gen"] = [round(float(by_id[i]["gen"]), 4) if i in by_id else 0.0 for i in ids]
        out["answered"] = [round(float(by_id[i]["answered"]), 4) if i in by_id else 0.0 for i in ids]
    return out
