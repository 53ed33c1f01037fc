"""Data-parallel training: `fslm train --processes 2` (accelerate launch, two CPU processes over gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

from test_train import write_distilled

from fslm.config import load_config
from fslm.steps.init import InitOptions, init


def test_two_processes_over_gloo(tmp_path, tiny_llama):
    data = write_distilled(tmp_path / "d.jsonl", n=40)  # 36 training examples
    d = tmp_path / "s"
    init(d, InitOptions(base=str(tiny_llama)))
    cmd = [sys.executable, "-m", "fslm", "train", str(d), "--data", str(data), "--processes", "2"]
    cmd += ["--stages", "intent,answer", "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    config = load_config(d)
    for stage in ("intent", "answer"):
        t = config.stage(stage).training
        assert t.model_extra["processes"] == 2
        # Global batch 2 x 4 = 8: 36 examples are 5 steps per epoch (one process would need 9).
        assert t.steps == 6 and abs(t.epochs - 6 / 5) < 1e-6
        assert (d / "adapters" / stage / "adapter_model.safetensors").is_file()
    assert r.stdout.count("adapters/intent") == 1, "only the main process prints the result table"
