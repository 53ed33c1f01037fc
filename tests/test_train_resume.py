"""Kill a real `fslm train` process with SIGKILL mid-run; `--resume` must end with the uninterrupted run's adapters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from test_train import adapter_weights, write_distilled

from fslm.config import load_config
from fslm.steps.init import InitOptions, init
from fslm.steps.train import TrainOptions, train

ARGS = ["--max-steps", "30", "--save-steps", "5", "--stages", "intent,plan", "--lr", "3e-3", "--batch-size", "4"]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_llama):
    data = write_distilled(tmp_path / "d.jsonl", n=40)  # 36 training examples: 9 steps per epoch
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    for d in (killed, reference):
        init(d, InitOptions(base=str(tiny_llama)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fslm", "train", str(killed), "--data", str(data), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # Kill in the second stage, in its second epoch, just after a complete checkpoint.
    marker = killed / ".fslm-train" / "plan" / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 600  # generous: CI machines may be shared
    while not marker.exists():
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "adapters" / "intent").is_dir() and not (killed / "adapters" / "plan").exists()
    intent_mtime = (killed / "adapters" / "intent" / "adapter_model.safetensors").stat().st_mtime_ns

    # A resume with other settings is refused with one clear line (and leaves the checkpoints alone).
    other = [*cmd[: -len(ARGS)], *ARGS[:-1], "8", "--resume"]
    r = subprocess.run(other, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "cannot resume: options differs" in r.stderr, r.stderr[-2000:]

    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already trained" in r.stderr and "from checkpoint-" in r.stderr
    assert (killed / "adapters" / "intent" / "adapter_model.safetensors").stat().st_mtime_ns == intent_mtime
    plan = load_config(killed).stage("plan").training
    assert plan.steps == 30 and plan.model_extra["resumed"] is True

    train(reference, data, TrainOptions(stages=["intent", "plan"], max_steps=30, lr=3e-3))
    for stage in ("intent", "plan"):
        got, want = adapter_weights(killed, stage), adapter_weights(reference, stage)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert load_config(reference).stage("plan").training.val_loss == load_config(killed).stage("plan").training.val_loss
