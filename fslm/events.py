"""Progress as events: a step reports what it counts; the face (the CLI) decides how to show it.

No step draws on the terminal. A step takes `on_event: EventHandler | None` and calls it with a `Progress` whenever
a count moves; warnings and notes go through the `fslm` logger. The CLI turns events into rich progress bars, a
notebook or a service may log them, tests may collect them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """One count moved: `task` of `step` has `done` of `total` units finished (total None: unknown)."""

    step: str  # "distill", "train", "eval", "export", "quickstart"
    task: str  # what is counted, readable: "records", "intent (1/4)", "base: scoring"
    done: int
    total: int | None = None
    info: Mapping[str, str] = field(default_factory=dict)  # short extra columns: rates, loss, ETA hints


EventHandler = Callable[[Progress], None]


def emit(handler: EventHandler | None, event: Progress) -> None:
    if handler is not None:
        handler(event)
