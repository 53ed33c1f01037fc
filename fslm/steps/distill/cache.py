"""The teacher's answers, content-addressed: nothing a teacher was paid for is asked twice.

Key: sha256 over (teacher id, the exact prompt it conditions on, the generation settings). Stored as an append-only,
fsync'ed JSONL (`fslm.files.JsonlLog`), so a killed run keeps every answer that arrived.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fslm.config import GenerationSettings
from fslm.files import JsonlLog


class TeacherCache:
    """Content-addressed teacher answers: sha256 over (teacher id, exact prompt, generation settings)."""

    def __init__(self, path: Path) -> None:
        self.log = JsonlLog(path).open()
        self.entries = {r["key"]: r for r in self.log.rows if "key" in r}

    @staticmethod
    def key(teacher_id: str, prompt: str, settings: GenerationSettings) -> str:
        blob = json.dumps(
            {"teacher": teacher_id, "prompt": prompt, "settings": settings.model_dump(mode="json", exclude_none=True)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, entries: list[dict[str, Any]]) -> None:
        self.log.append(entries)
        self.entries.update((e["key"], e) for e in entries)

    def close(self) -> None:
        self.log.close()
