"""The resumable run: DIR/.fslm-train/run.json says what a `fslm train` call trains (its identity: data, adapters,
options, the manifest's shape) and which adapters it has written, beside the Trainer's checkpoints of each."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fslm.errors import FslmError
from fslm.files import atomic_write_text
from fslm.stackdir import StackDir

LOCK = ".fslm-train.lock"  # in the stack directory: one training at a time


class RunState:
    """DIR/.fslm-train/run.json: what this run trains and which adapters are already written."""

    def __init__(self, directory: StackDir, identity: dict[str, Any]) -> None:
        self.root = directory.train_state
        self.path = self.root / "run.json"
        self.identity = identity
        self.done: list[str] = []

    def start(self, resume: bool, fresh: bool, is_main: bool) -> None:
        """Continue the interrupted run (resume), or start a new one. Checkpoints of an interrupted run are never
        discarded silently: without --resume they are an error unless --fresh says to drop them."""
        if resume:
            if not self.path.is_file():
                raise FslmError(f"{self.root}: no interrupted run to resume; run without --resume")
            saved = json.loads(self.path.read_text())
            for key, value in self.identity.items():
                if saved.get("identity", {}).get(key) != value:
                    then = saved.get("identity", {}).get(key)
                    what = "stack.yaml (stages, prompts, LoRA settings)" if key == "manifest" else key
                    detail = "" if key == "manifest" else f" ({then!r} then, {value!r} now)"
                    raise FslmError(
                        f"{self.path}: cannot resume: {what} differs from the interrupted run{detail}; "
                        "--fresh discards its checkpoints and starts over"
                    )
            self.done = list(saved.get("done", []))
        elif is_main:
            if self.root.exists():
                if self.path.is_file() and any(self.root.glob("*/checkpoint-*")) and not fresh:
                    raise FslmError(
                        f"{self.root}: holds the checkpoints of an interrupted run; --resume continues it, "
                        "--fresh discards them"
                    )
                shutil.rmtree(self.root)
            self._write()

    def mark_done(self, name: str) -> None:
        self.done.append(name)
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"identity": self.identity, "done": self.done}, indent=1))

    def checkpoint_dir(self, name: str) -> Path:
        return self.root / name

    def last_checkpoint(self, name: str) -> Path | None:
        """The newest complete checkpoint (trainer_state.json is written last, so a killed save lacks it)."""
        complete = []
        for p in self.checkpoint_dir(name).glob("checkpoint-*"):
            if (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit():
                complete.append((int(p.name.split("-")[-1]), p))
        return max(complete)[1] if complete else None

    def drop_incomplete(self, name: str) -> None:
        for p in self.checkpoint_dir(name).glob("checkpoint-*"):
            if not (p / "trainer_state.json").is_file():
                shutil.rmtree(p, ignore_errors=True)


def manifest_hash(config: Any) -> str:
    """What of stack.yaml shapes an adapter (base, LoRA, stages' prompts and decoding), without the training records
    train itself writes: a resumed run must find it unchanged."""
    data = config.model_dump(mode="json", exclude={"baselines", "metadata", "description", "name"})
    for stage in data["stages"]:
        stage.pop("training", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
