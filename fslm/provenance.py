"""What every report records so a number can be reproduced: library versions, file hashes, the time."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fslm.errors import FslmError
from fslm.files import atomic_write_text

# The libraries whose version can change a number fslm reports.
PACKAGES = (
    "fslm",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "lm_eval",
    "datasets",
    "llama_cpp_python",
    "gguf",
    "openai",
)


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Python and each installed package's version (missing packages are left out)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return found


def now() -> str:
    """UTC time to the second, ISO 8601 (what manifests and ledgers record)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """A long experiment's record (one JSON file): its settings, the library versions, and wall-clock seconds per step
    summed over every invocation, so a killed and resumed run still reports what the whole cost. A rerun with other
    settings is refused: the ledger must describe one experiment."""

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self.data.get("settings") not in (None, settings):
            changed = sorted(k for k in settings if self.data["settings"].get(k) != settings[k])
            raise FslmError(f"{self.path}: written with other settings ({', '.join(changed)}); use another --out")
        self.data.update(settings=settings, versions=versions())
        self.data.setdefault("steps", {})

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run `fn` as step `name`, adding its wall-clock time (also when it fails or is interrupted)."""
        entry = self.data["steps"].setdefault(name, {"seconds": 0.0, "invocations": 0, "finished": False})
        start = time.perf_counter()
        try:
            return fn()
        finally:
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 1)
            entry["invocations"] += 1
            self.save()

    def finish(self, name: str) -> None:
        self.data["steps"][name]["finished"] = True
        self.save()

    def done(self, name: str) -> bool:
        return bool(self.data["steps"].get(name, {}).get("finished"))

    def save(self) -> None:
        self.data["updated"] = now()
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")
