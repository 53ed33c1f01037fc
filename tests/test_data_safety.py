"""Nothing paid for is lost, nothing is written twice: locks on distill outputs, caches and training directories;
no checkpoint deleted without --fresh; resume refuses an edited manifest; empty answers are not cached; answers that
arrived before a teacher failure are kept; stack.yaml keeps the user's comments when train writes to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import StageTraining, load_config
from fslm.data import read_dataset
from fslm.errors import FslmError
from fslm.files import exclusive
from fslm.stackdir import StackDir
from fslm.steps.distill import DistillOptions, distill_records
from fslm.steps.init import InitOptions, init
from fslm.steps.train import TrainOptions, train
from fslm.steps.train.run_state import RunState, manifest_hash
from fslm.teachers import TeacherOutput

HOLD = "import sys, time; from fslm.files import exclusive\nwith exclusive(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(60)"


def hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / "x.lock"
    proc = hold_lock(lock)
    try:
        with pytest.raises(FslmError, match=rf"in use by another fslm run \(pid {proc.pid} "):
            with exclusive(lock, "the thing"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with exclusive(lock, "the thing"):  # the kernel released it with the holder
        pass


@pytest.fixture
def stack_dir(tmp_path, tiny_llama) -> Path:
    init(tmp_path / "stack", InitOptions(base=str(tiny_llama)))
    return tmp_path / "stack"


def write_data(path: Path, n: int = 4) -> Path:
    path.write_text(
        json.dumps([{"instruction": f"Explain {i}.", "input": "", "output": f"It is {i}."} for i in range(n)])
    )
    return path


def test_a_second_distill_on_the_same_output_is_refused(tmp_path, stack_dir):
    data, out = write_data(tmp_path / "d.json"), tmp_path / "o.jsonl"
    proc = hold_lock(out.with_name("o.jsonl.lock"))
    try:
        args = ["distill", str(data), "--stack", str(stack_dir), "--out", str(out), "--max-new-tokens", "2"]
        r = CliRunner().invoke(app, args)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert r.exit_code == 2 and "in use by another fslm run" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_a_second_training_of_the_same_stack_is_refused(tmp_path, stack_dir):
    proc = hold_lock(stack_dir / ".fslm-train.lock")
    try:
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps({"id": "a", "instruction": "x", "targets": {"intent": "y"}}) + "\n")
        with pytest.raises(FslmError, match="in use by another fslm run"):
            train(stack_dir, data, TrainOptions(stages=["intent"], max_steps=1))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


class FlakyTeacher:
    """Answers `good` requests of each call (calling on_result as each arrives), then fails; empty text for 'b'."""

    id = "flaky"
    batch_size = 8

    def __init__(self, good: int):
        self.good, self.asked = good, 0

    def describe(self):
        return {"id": self.id}

    def prompt_key(self, system, user):
        return user

    def generate(self, requests, settings, on_result=None, label="teacher"):
        outs = []
        for i, (_, user) in enumerate(requests):
            if i >= self.good:
                raise RuntimeError("the server went away")
            self.asked += 1
            outs.append(TeacherOutput("" if "Explain 1." in user else f"text {i}", 5, 3, True))
            on_result(i, outs[-1])
        return outs


def test_answers_paid_for_survive_a_failure_and_empty_ones_are_not_cached(tmp_path, stack_dir):
    config = load_config(stack_dir)
    dataset = read_dataset(write_data(tmp_path / "d.json"))
    out = tmp_path / "o.jsonl"
    teacher = FlakyTeacher(good=3)
    with pytest.raises(RuntimeError):
        distill_records(config, dataset, teacher, out, options=DistillOptions(filters=()))
    cache = [json.loads(x) for x in Path(f"{out}.cache.jsonl").read_text().splitlines()]
    assert len(cache) == 2 and all(e["text"] for e in cache)  # 3 answered, the empty one not cached
    teacher = FlakyTeacher(good=99)
    result = distill_records(config, dataset, teacher, out, options=DistillOptions(filters=()))
    assert result.cache_hits == 2 and teacher.asked == 4 * 3 - 2  # only what was not kept is asked again
    assert result.written == 4 and result.lost == 0


def test_checkpoints_are_kept_without_fresh_and_resume_checks_the_manifest(tmp_path, stack_dir):
    layout = StackDir(stack_dir)
    identity = {"data_sha256": "x", "names": ["intent"], "options": {}, "manifest": manifest_hash(layout.load())}
    run = RunState(layout, identity)
    run.start(resume=False, fresh=False, is_main=True)
    checkpoint = layout.train_state / "intent" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(FslmError, match="--resume continues it, --fresh discards them"):
        RunState(layout, identity).start(resume=False, fresh=False, is_main=True)
    assert checkpoint.is_dir()
    text = layout.manifest.read_text().replace("max_new_tokens: 64", "max_new_tokens: 65", 1)
    layout.manifest.write_text(text)
    edited = {**identity, "manifest": manifest_hash(layout.load())}
    with pytest.raises(FslmError, match=r"stack.yaml \(stages, prompts, LoRA settings\) differs"):
        RunState(layout, edited).start(resume=True, fresh=False, is_main=True)
    RunState(layout, edited).start(resume=False, fresh=True, is_main=True)
    assert not checkpoint.exists()


def test_training_records_keep_the_users_comments(stack_dir):
    layout = StackDir(stack_dir)
    text = layout.manifest.read_text().replace("recipe: paper4", "recipe: paper4  # tried three recipes; this one won")
    layout.manifest.write_text("# my stack, edited by hand\n" + text)
    layout.record_training("plan", StageTraining(examples=3, steps=2))
    layout.record_training("single", StageTraining(examples=4))
    after = layout.manifest.read_text()
    assert after.startswith("# my stack, edited by hand\n") and "# tried three recipes; this one won" in after
    config = load_config(stack_dir)
    assert config.stage("plan").training.steps == 2 and config.baselines["single"].examples == 4


def test_sigkill_during_training_leaves_the_lock_free(tmp_path, stack_dir):
    """A killed training does not leave a lock that blocks the rerun (flock dies with its process)."""
    data = tmp_path / "d.jsonl"
    rows = [{"id": f"r{i}", "instruction": f"q {i}", "targets": {"intent": f"t {i}"}} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "fslm", "train", str(stack_dir), "--data", str(data), "--stages", "intent"]
    cmd += ["--max-steps", "200", "--batch-size", "1", "--save-steps", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 300
    while not list((stack_dir / ".fslm-train").glob("intent/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with exclusive(stack_dir / ".fslm-train.lock", "the stack"):
        pass
