"""What every report records so a number can be reproduced: library versions, file hashes, the time."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import metadata

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
