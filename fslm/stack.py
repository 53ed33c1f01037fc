"""The `Stack`: one base model, one adapter per stage, stages chained through their text.

Every pipeline step (run, distill, train, eval, serve) takes a `Stack`; none loads models its own way.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fslm.backends import Backend, create_backend
from fslm.config import StackConfig, StageConfig, load_config
from fslm.errors import FslmError
from fslm.prompts import render_user_message, stage_variables
from fslm.stackdir import StackDir
from fslm.trust import Trust, check_trust, trusting

# How a loaded stack can answer: the bare base, a baseline adapter answering directly, or the whole stack.
SYSTEMS = ("base", "single", "multitask", "stack")
# The baselines' user message: the instruction (and input) alone, no intermediate stages.
DIRECT_TEMPLATE = "Instruction: {{ instruction }}\n{% if input %}Input: {{ input }}\n{% endif %}"

_KEEP = object()


@dataclass
class StageResult:
    name: str
    adapter: str | None  # the adapter the stage ran with; None = the bare base model
    prompt: str
    output: str
    prompt_tokens: int
    output_tokens: int
    seconds: float  # wall time of the stage's (possibly batched) generate call


@dataclass
class Trace:
    instruction: str
    input: str | None = None
    stages: list[StageResult] = field(default_factory=list)

    @property
    def answer(self) -> str:
        return self.stages[-1].output if self.stages else ""

    @property
    def outputs(self) -> dict[str, str]:
        return {s.name: s.output for s in self.stages}

    def to_dict(self, prompts: bool = False) -> dict[str, Any]:
        """The JSON shape of `fslm run --json` and of the server's `fslm_trace`."""
        stages = []
        for s in self.stages:
            d = asdict(s)
            if not prompts:
                d.pop("prompt")
            stages.append(d)
        return {"instruction": self.instruction, "input": self.input, "stages": stages, "answer": self.answer}


Item = str | tuple[str, str | None] | Mapping[str, Any]
StageCallback = Callable[[int, StageResult], None]  # (row, finished stage)
TextStream = Callable[[int, str, str], None]  # (row, stage name, text delta)


class Stack:
    """A stack directory brought to life: config + backend + attached adapters."""

    def __init__(self, config: StackConfig, backend: Backend, directory: str | Path | None = None) -> None:
        self.config = config
        self.backend = backend
        self.dir = StackDir(directory) if directory is not None else None
        self.attach_adapters()

    @classmethod
    def load(cls, directory: str | Path, backend: str | None = None, *, trust: Trust | None = None) -> Stack:
        """Load a stack directory; `backend` overrides the manifest's `base.backend`.

        The manifest is untrusted: remote code, a server other than this machine, or an API key variable it names
        are refused (FslmError) unless `trust` (or the `trusting(...)` block around the call, e.g. the CLI's flags,
        or the user's FSLM_TRUSTED_SERVERS / FSLM_TRUSTED_KEY_ENVS) allows them.
        """
        config = load_config(directory)
        name = backend or config.base.backend
        with trusting(trust):
            check_trust(config.base, code=True, server=name == "openai")  # before any slow load
            return cls(config, create_backend(name, config.base, directory), directory)

    @property
    def directory(self) -> Path | None:
        return self.dir.root if self.dir is not None else None

    # --- adapters -----------------------------------------------------------------------------------

    def attach_adapters(self) -> None:
        """Attach every trained stage's adapter by its stage name (the directory decides which are trained)."""
        if self.dir is None:
            return
        for name in self.dir.trained_stages(self.config):
            self.backend.add_adapter(name, self.dir.adapter(name))

    def stage_adapter(self, stage: str) -> str | None:
        """The adapter a stage runs with by default: its own when one is attached, else none (zero-shot)."""
        return stage if self.backend.has_adapter(stage) else None

    def load_baseline(self, name: str) -> str:
        """Attach a baseline adapter (`single`, `multitask`) of the stack directory; returns its adapter name.

        A baseline answers directly: `direct_prompt(instruction, input)` with `backend.generate(.., name, ..)`.
        """
        if self.dir is None:
            raise FslmError(f"baseline {name!r}: this stack was not loaded from a directory")
        path = self.dir.require_baseline(name)
        if not self.backend.has_adapter(name):
            self.backend.add_adapter(name, path)
        return name

    def direct_prompt(self, instruction: str, input: str | None = None) -> str:
        """The prompt of a system that answers without intermediate stages (the single and multitask baselines).

        The final stage's role as the system message and a plain user message holding only the instruction and
        input. It does not reuse the final stage's template with empty earlier outputs: that template asks for
        notes the baseline never has.
        """
        user = render_user_message(DIRECT_TEMPLATE, stage_variables(instruction, input, {}, []))
        return self.backend.format_prompt(self.config.final_stage.role, user)

    # --- prompts ------------------------------------------------------------------------------------

    def render_prompt(
        self, stage: StageConfig | str, instruction: str, input: str | None = None, outputs: Mapping[str, str] = {}
    ) -> str:
        """The exact prompt text of a stage; training uses this too, so train and inference never drift."""
        stage = self.config.stage(stage) if isinstance(stage, str) else stage
        missing = [r for r in stage.reads if r not in outputs]
        if missing:
            raise FslmError(f"stage {stage.name!r} reads {', '.join(missing)}, which has no output yet")
        user = render_user_message(stage.template, stage_variables(instruction, input, dict(outputs), stage.reads))
        return self.backend.format_prompt(stage.role, user)

    # --- running ------------------------------------------------------------------------------------

    def run(
        self,
        instruction: str,
        input: str | None = None,
        *,
        on_stage: StageCallback | None = None,
        max_new_tokens: int | None = None,
        adapters: Mapping[str, str | None] | None = None,
    ) -> Trace:
        """Answer one instruction through every stage; `on_stage` sees each stage as it finishes."""
        return self.run_batch(
            [(instruction, input)], on_stage=on_stage, max_new_tokens=max_new_tokens, adapters=adapters
        )[0]

    def run_batch(
        self,
        items: Iterable[Item],
        *,
        on_stage: StageCallback | None = None,
        max_new_tokens: int | None = None,
        adapters: Mapping[str, str | None] | None = None,
        stages: int | None = None,
        on_text: TextStream | None = None,
    ) -> list[Trace]:
        """Run each stage once for the whole batch (left-padded).

        adapters: per-stage override of the adapter to use (None = bare base), for ablations and baselines.
        stages: run only the first N stages (eval scores the last one itself).
        on_text: receives each stage's text as it is generated (as far as the backend streams).
        """
        traces = [_to_trace(item, i) for i, item in enumerate(items)]
        if not traces:
            return []
        adapters = dict(adapters or {})
        for stage in self.config.stages[:stages]:
            adapter = adapters.get(stage.name, _KEEP)
            adapter = self.stage_adapter(stage.name) if adapter is _KEEP else adapter
            settings = stage.generation
            if max_new_tokens is not None:
                settings = settings.model_copy(update={"max_new_tokens": max_new_tokens})
            prompts = [self.render_prompt(stage, t.instruction, t.input, t.outputs) for t in traces]
            start = time.perf_counter()
            stream = None
            if on_text is not None:
                stream = functools.partial(_stream_to, on_text, stage.name)
            completions = self.backend.generate(prompts, adapter, settings, label=stage.name, on_text=stream)
            seconds = time.perf_counter() - start
            for i, (trace, prompt, c) in enumerate(zip(traces, prompts, completions, strict=True)):
                result = StageResult(stage.name, adapter, prompt, c.text, c.prompt_tokens, c.output_tokens, seconds)
                trace.stages.append(result)
                if on_stage is not None:
                    on_stage(i, result)
        return traces

    def answer(
        self,
        items: Iterable[Item],
        system: str = "stack",
        *,
        on_stage: StageCallback | None = None,
        max_new_tokens: int | None = None,
        on_text: TextStream | None = None,
    ) -> list[Trace]:
        """Answer with one of SYSTEMS: the whole stack, or one direct step (the final stage's role, the instruction
        alone) on the bare base or a baseline adapter (`single`, `multitask`)."""
        if system == "stack":
            return self.run_batch(items, on_stage=on_stage, max_new_tokens=max_new_tokens, on_text=on_text)
        if system not in SYSTEMS:
            raise FslmError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
        traces = [_to_trace(item, i) for i, item in enumerate(items)]
        if not traces:
            return []
        adapter = None if system == "base" else self.load_baseline(system)
        settings = self.config.final_stage.generation
        if max_new_tokens is not None:
            settings = settings.model_copy(update={"max_new_tokens": max_new_tokens})
        prompts = [self.direct_prompt(t.instruction, t.input) for t in traces]
        stream = functools.partial(_stream_to, on_text, system) if on_text is not None else None
        start = time.perf_counter()
        completions = self.backend.generate(prompts, adapter, settings, label=system, on_text=stream)
        seconds = time.perf_counter() - start
        for i, (trace, prompt, c) in enumerate(zip(traces, prompts, completions, strict=True)):
            result = StageResult(system, adapter, prompt, c.text, c.prompt_tokens, c.output_tokens, seconds)
            trace.stages.append(result)
            if on_stage is not None:
                on_stage(i, result)
        return traces


def _stream_to(on_text: TextStream, stage: str, row: int, delta: str) -> None:
    on_text(row, stage, delta)


def _to_trace(item: Item, index: int) -> Trace:
    if isinstance(item, str):
        instruction, input = item, None
    elif isinstance(item, Mapping):
        instruction, input = item.get("instruction", ""), item.get("input")
    else:
        instruction, input = item
    if not isinstance(instruction, str) or not instruction.strip():
        raise FslmError(f"item {index}: the instruction is empty")
    return Trace(instruction=instruction.strip(), input=(input.strip() or None) if input else None)
