"""`fslm quickstart` on its default path: the base model is a GGUF file exported by fslm, the teacher is llama.cpp
(the default `--teacher-backend`), and the real command is SIGKILLed three times (in distill, train and eval) and
rerun: the last run finishes, nothing finished is redone, nothing is lost or written twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_model_dir

ROOT = Path(__file__).resolve().parents[1]
# Small sizes; everything else is quickstart's default (teacher llama.cpp, reference hidden, seed 0, ...).
# `--filters empty`: a random model never stops by itself, so the default `overlong` filter rejects every target
# (distill then ends with "no usable records"); every other filter stays as shipped.
SIZES = ["--records", "4", "--teacher-tokens", "4", "--train-steps", "1", "--batch-size", "2"]
SIZES += ["--eval-items", "3", "--stage-tokens", "3", "--filters", "empty"]
TEACHER_STAGES = 3  # intent, plan, reasoning: the answer target is the reference (final_from=reference)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random chat Llama written as GGUF by fslm's own exporter (the shape of the embedded default)."""
    from fslm.steps.export import write_base_gguf

    root = tmp_path_factory.mktemp("gguf-base")
    model_dir = make_model_dir(root, "llama", chat=True, context=2048)
    out = root / "tiny-llama.gguf"
    write_base_gguf(model_dir, out, "f32")
    return out


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "FSLM_CACHE": str(tmp_path / "fslm-cache"),  # the de-quantised copy of the GGUF base goes here
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "COLUMNS": "200",  # rich wraps log lines at the terminal width
    }


def _quickstart(
    out: Path, base: Path, env: dict[str, str], log: Path, kill_when: Callable[[], bool] | None = None
) -> subprocess.CompletedProcess:
    """`python -m fslm quickstart` as a real process; SIGKILLed as soon as `kill_when()` holds."""
    cmd = [sys.executable, "-m", "fslm", "quickstart", "--out", str(out), "--base", str(base), *SIZES]
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as std:
        proc = subprocess.Popen(cmd, stdout=std, stderr=err, env=env, cwd=out.parent)
        deadline = time.monotonic() + 900
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, "quickstart did not finish in 15 min"
                if kill_when is not None and kill_when():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.with_suffix(".out").read_text(), log.read_text())


def _lines(path: Path) -> list[dict]:
    """Complete JSON lines of a JSONL file (a line cut by the kill has no newline yet and is not counted)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_default_quickstart_with_llamacpp_teacher_survives_sigkill(tmp_path, tiny_gguf):
    env, out = _env(tmp_path), tmp_path / "qs"
    data, cache = out / "distilled.jsonl", out / "distilled.jsonl.cache.jsonl"
    stack, systems = out / "stack", out / "eval" / "systems"
    run_json = stack / ".fslm-train" / "run.json"

    # 1. Killed in distill, once the teacher's first answers are cached and before any record is written.
    first = _quickstart(out, tiny_gguf, env, tmp_path / "run1.log", lambda: len(_lines(cache)) >= 2)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    cached = _lines(cache)
    # in distill: some teacher answers cached (on a fast machine all of them, a tiny teacher's batches land within one
    # 50 ms poll), no record written yet
    assert 2 <= len(cached) <= 4 * TEACHER_STAGES and not _lines(data), "not killed in the middle of distill"
    assert {c["teacher"].split(":")[0] for c in cached} == {"llamacpp"}  # the default teacher is llama.cpp

    # 2. Killed in train, once the first stage adapter is recorded as done and before the answer stage.
    def one_stage_trained() -> bool:
        done = _read_json(run_json).get("done", [])
        return "intent" in done and "answer" not in done

    second = _quickstart(out, tiny_gguf, env, tmp_path / "run2.log", one_stage_trained)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    manifest = json.loads(Path(f"{data}.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["teacher"]["backend"] == "llamacpp"
    # every teacher answer paid for before the kill was reused, and only the rest was asked for
    assert manifest["last_run"]["cache_hits"] == len(cached)
    assert manifest["last_run"]["teacher_calls"] == 4 * TEACHER_STAGES - len(cached)
    assert "answer" not in _read_json(run_json)["done"], "not killed in the middle of train"
    intent = stack / "adapters" / "intent" / "adapter_model.safetensors"
    intent_mtime = intent.stat().st_mtime_ns

    # 3. Killed in eval, once the base row is saved and before the single row.
    third = _quickstart(out, tiny_gguf, env, tmp_path / "run3.log", lambda: (systems / "base.json").is_file())
    assert third.returncode == -signal.SIGKILL, third.stderr[-3000:]
    assert "intent: already trained in the interrupted run; skipping" in third.stderr
    assert intent.stat().st_mtime_ns == intent_mtime
    assert not (systems / "stack.json").exists(), "not killed in the middle of eval"
    adapters = {p.parent.name: p.stat().st_mtime_ns for p in (stack / "adapters").glob("*/adapter_model.safetensors")}
    assert set(adapters) == {"intent", "plan", "reasoning", "answer", "single"}
    base_row = (systems / "base.json").stat().st_mtime_ns

    # 4. The rerun finishes, redoing nothing that was finished.
    last = _quickstart(out, tiny_gguf, env, tmp_path / "run4.log")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "adapters intent, plan, reasoning, answer already trained on this data: kept" in last.stderr
    assert "adapters single already trained on this data: kept" in last.stderr
    assert "base: already evaluated" in last.stderr
    assert {n: (stack / "adapters" / n / "adapter_model.safetensors").stat().st_mtime_ns for n in adapters} == adapters
    assert (systems / "base.json").stat().st_mtime_ns == base_row

    # Nothing lost, nothing twice: 4 records once each, every teacher prompt asked (and cached) exactly once.
    rows = _lines(data)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert all(list(r["targets"]) == ["intent", "plan", "reasoning", "answer"] for r in rows)
    keys = [c["key"] for c in _lines(cache)]
    assert len(keys) == 4 * TEACHER_STAGES == len(set(keys))
    final = json.loads(Path(f"{data}.manifest.json").read_text())
    assert final["last_run"]["teacher_calls"] == 0 and final["last_run"]["resumed_records"] == 4
    assert final["counts"]["lost"] == 0

    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["systems"]) == ["base", "single", "stack"]
    assert all(s["tasks"]["mmlu"]["n"] == 3 for s in results["systems"].values())
    # the run step's trace and the eval table are printed
    for stage in ("intent", "plan", "reasoning", "answer"):
        assert f"{stage} · adapter {stage} · " in last.stdout
    table = [line.split("│") for line in last.stdout.splitlines() if line.startswith("│ ") and " ± " in line]
    assert [cells[1].strip() for cells in table] == ["base", "single", "stack"]
