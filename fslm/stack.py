"""The `Stack`: one base model, one adapter per stage, stages chained through their text.

Run, serve, eval and train load a stack directory with `Stack.load` (fslm.backends.choose says where it runs). One
function decides a stage's prompt text, `render_prompt`, which training uses too, and one method runs a stage for a
batch of rows, `run_stage`: the whole stack (`run_batch`), a baseline's direct answer (`answer`), eval's chains and
the server's scheduler all go through it. The baselines (the bare base, `single`, `multitask`) are views of the
same stack: one pseudo-stage, `direct_stage`, that answers from the instruction alone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from fslm.backends import Backend, TextCallback
from fslm.backends.choose import choose_backend, create_backend
from fslm.config import GenerationSettings, StackConfig, StageConfig
from fslm.errors import FslmError
from fslm.prompts import compact_user_message, render_user_message, stage_variables
from fslm.stackdir import StackDir
from fslm.trust import Trust, trusting

# How a loaded stack can answer: the bare base, a baseline adapter answering directly, or the whole stack.
SYSTEMS = ("base", "single", "multitask", "stack")
# The baselines' user message: the instruction (and input) alone, no intermediate stages.
DIRECT_TEMPLATE = "Instruction: {{ instruction }}\n{% if input %}Input: {{ input }}\n{% endif %}"

_OWN = object()  # "the stage's own adapter" (None already means the bare base)


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


class StageInput(Protocol):
    """What a stage prompt is rendered from: a `Trace`, or any row with the same three fields."""

    @property
    def instruction(self) -> str: ...

    @property
    def input(self) -> str | None: ...

    @property
    def outputs(self) -> Mapping[str, str]: ...


Item = str | tuple[str, str | None] | Mapping[str, Any]
StageCallback = Callable[[int, StageResult], None]  # (row, finished stage)
TextStream = Callable[[int, str, str], None]  # (row, stage name, text delta)


class Stack:
    """A stack directory brought to life: config + backend + attached adapters."""

    def __init__(
        self, config: StackConfig, backend: Backend, directory: str | Path | None = None, *, check: bool = True
    ) -> None:
        self.config = config
        self.backend = backend
        self.dir = StackDir(directory) if directory is not None else None
        self.check = check  # refuse a half-written adapter folder (training, which replaces it, passes False)
        self.attach_adapters()

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str | None = None,
        *,
        trust: Trust | None = None,
        check: bool = True,
        **options: Any,
    ) -> Stack:
        """Load a stack directory on `backend`: a backend name, `auto` (fslm.backends.choose decides) or None (the
        manifest's `base.backend`). `options` go to the backend (llama.cpp: `n_ctx`). A stage whose adapter folder is
        half there (StackDir.adapter_problem) is an FslmError, checked before the model loads, unless `check` is
        False (training, which writes that folder anew).

        The manifest is untrusted: remote code, a server other than this machine, or an API key variable it names
        are refused (FslmError) unless `trust` (or the `trusting(...)` block around the call, e.g. the CLI's flags,
        or the user's FSLM_TRUSTED_SERVERS / FSLM_TRUSTED_KEY_ENVS) allows them.
        """
        stack_dir = StackDir(directory)
        config = stack_dir.load()
        if check:
            stack_dir.check_adapters(config)
        with trusting(trust):
            name = choose_backend(stack_dir, backend or config.base.backend, config=config)
            return cls(config, create_backend(name, config.base, directory, **options), directory, check=check)

    @property
    def directory(self) -> Path | None:
        return self.dir.root if self.dir is not None else None

    # --- adapters -----------------------------------------------------------------------------------

    def attach_adapters(self) -> None:
        """Attach every trained stage's adapter by its stage name (the directory decides which are trained)."""
        if self.dir is None:
            return
        self.config = self.dir.load()  # training may have written new records (each adapter's prompt form) since
        if self.check:
            self.dir.check_adapters(self.config)
        for name in self.dir.trained_stages(self.config):
            self.backend.add_adapter(name, self.dir.adapter(name))

    def stage_adapter(self, stage: str) -> str | None:
        """The adapter a stage runs with by default: its own when one is attached, else none (zero-shot)."""
        return stage if self.backend.has_adapter(stage) else None

    def load_baseline(self, name: str) -> str:
        """Attach a baseline adapter (`single`, `multitask`) of the stack directory; returns its adapter name.

        A baseline answers directly: `direct_stage` run with this adapter.
        """
        if self.dir is None:
            raise FslmError(f"baseline {name!r}: this stack was not loaded from a directory")
        path = self.dir.require_baseline(name)
        if not self.backend.has_adapter(name):
            self.backend.add_adapter(name, path)
        return name

    # --- prompts ------------------------------------------------------------------------------------

    def render_prompt(
        self,
        stage: StageConfig | str,
        instruction: str,
        input: str | None = None,
        outputs: Mapping[str, str] = {},
        *,
        form: str | None = None,
    ) -> str:
        """The exact prompt text of a stage: the one place that decides it, for run, serve, eval and training.

        form: `full` or `compact` (fslm.prompts.PROMPT_FORMS); default: the form the stage's own adapter was trained
        on (`prompt_form`), full on the bare base."""
        stage = self.config.stage(stage) if isinstance(stage, str) else stage
        missing = [r for r in stage.reads if r not in outputs]
        if missing:
            raise FslmError(f"stage {stage.name!r} reads {', '.join(missing)}, which has no output yet")
        if form is None:
            form = "full" if is_direct(stage) else self.prompt_form(self.stage_adapter(stage.name))
        if form == "compact":
            user = compact_user_message(instruction, input, dict(outputs), stage.reads)
            # a direct answer speaks as the final stage, as the full form's direct prompt takes its role
            name = self.config.final_stage.name if is_direct(stage) else stage.name
            return self.backend.format_prompt(name, user)
        user = render_user_message(stage.template, stage_variables(instruction, input, dict(outputs), stage.reads))
        return self.backend.format_prompt(stage.role, user)

    def prompt_form(self, adapter: str | None) -> str:
        """The prompt form `adapter` (a stage or a baseline) was trained on, as its training record says; `full` for
        the bare base and for adapters trained before the forms existed."""
        if adapter is None or self.dir is None:
            return "full"
        names = set(self.config.stage_names) | set(self.config.baselines)
        record = self.dir.training(self.config, adapter) if adapter in names else None
        return (record.prompt if record is not None else None) or "full"

    def direct_stage(self, name: str = "direct") -> StageConfig:
        """The one step of a system that answers without intermediate stages (the bare base, the single and
        multitask baselines): the final stage's role and decoding, and a user message holding only the instruction
        and input. It does not reuse the final stage's template with empty earlier outputs: that template asks for
        notes the baseline never has."""
        final = self.config.final_stage
        return final.model_copy(update={"name": name, "template": DIRECT_TEMPLATE, "reads": [], "training": None})

    def direct_prompt(self, instruction: str, input: str | None = None, form: str = "full") -> str:
        """The prompt of `direct_stage`."""
        return self.render_prompt(self.direct_stage(), instruction, input, form=form)

    # --- running ------------------------------------------------------------------------------------

    def run_stage(
        self,
        stage: StageConfig | str,
        rows: Sequence[StageInput],
        *,
        adapter: str | None | object = _OWN,
        settings: GenerationSettings | None = None,
        on_text: TextCallback | None = None,
    ) -> list[StageResult]:
        """One stage for a batch of rows in one `backend.generate` call: the one place a stage runs.

        adapter: the stage's own by default (`stage_adapter`); None runs the bare base model.
        settings: how it decodes (default: the stage's own generation settings).
        on_text(row, delta): its text as it is generated (as far as the backend streams).
        """
        stage = self.config.stage(stage) if isinstance(stage, str) else stage
        chosen = self.stage_adapter(stage.name) if adapter is _OWN else cast("str | None", adapter)
        form = self.prompt_form(chosen)
        prompts = [self.render_prompt(stage, r.instruction, r.input, r.outputs, form=form) for r in rows]
        if not prompts:
            return []
        start = time.perf_counter()
        completions = self.backend.generate(
            prompts, chosen, settings or stage.generation, label=stage.name, on_text=on_text
        )
        seconds = time.perf_counter() - start
        return [
            StageResult(stage.name, chosen, prompt, c.text, c.prompt_tokens, c.output_tokens, seconds)
            for prompt, c in zip(prompts, completions, strict=True)
        ]

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
        overrides: Mapping[str, Any] | None = None,
        given: Sequence[Mapping[str, str]] | None = None,
    ) -> list[Trace]:
        """Run each stage once for the whole batch (left-padded).

        adapters: per-stage override of the adapter to use (None = bare base), for ablations and baselines.
        stages: run only the first N stages (eval scores the last one itself).
        on_text: receives each stage's text as it is generated (as far as the backend streams).
        overrides: generation settings every stage runs with instead of its own (eval's budget, temperature, seed).
        given: per item, the texts of the first stages, already written by an identical chain (an ablation reuses
        the un-ablated chain up to the stage it takes away); only the stages after them run.
        """
        traces = [_to_trace(item, i) for i, item in enumerate(items)]
        update = {**(overrides or {}), **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})}
        chosen, todo = adapters or {}, list(self.config.stages[:stages])
        if given is not None:
            done = self._given(traces, given, todo, chosen)
            todo = todo[done:]
        return self._chain(todo, traces, chosen, update, on_stage, on_text)

    def _given(
        self,
        traces: list[Trace],
        given: Sequence[Mapping[str, str]],
        stages: Sequence[StageConfig],
        adapters: Mapping[str, str | None],
    ) -> int:
        """Put `given` texts in the traces as their first stages (no prompt, no tokens, no seconds: nothing ran);
        returns how many stages they cover, the same for every item."""
        names = [s.name for s in stages]
        done = len(given[0]) if given else 0
        if len(given) != len(traces) or any(list(g) != names[:done] for g in given):
            raise FslmError(f"given stage texts: each item needs the same first stages, in order ({names[:done]})")
        for trace, texts in zip(traces, given, strict=True):
            for name in names[:done]:
                adapter = adapters[name] if name in adapters else self.stage_adapter(name)
                trace.stages.append(StageResult(name, adapter, "", texts[name], 0, 0, 0.0))
        return done

    def answer(
        self,
        items: Iterable[Item],
        system: str = "stack",
        *,
        on_stage: StageCallback | None = None,
        max_new_tokens: int | None = None,
        on_text: TextStream | None = None,
    ) -> list[Trace]:
        """Answer with one of SYSTEMS: the whole stack, or one direct step (`direct_stage`) on the bare base or a
        baseline adapter (`single`, `multitask`)."""
        if system == "stack":
            return self.run_batch(items, on_stage=on_stage, max_new_tokens=max_new_tokens, on_text=on_text)
        if system not in SYSTEMS:
            raise FslmError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
        traces = [_to_trace(item, i) for i, item in enumerate(items)]
        if not traces:
            return []
        adapter = None if system == "base" else self.load_baseline(system)
        update = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return self._chain([self.direct_stage(system)], traces, {system: adapter}, update, on_stage, on_text)

    def _chain(
        self,
        stages: Sequence[StageConfig],
        traces: list[Trace],
        adapters: Mapping[str, str | None],
        update: Mapping[str, Any],
        on_stage: StageCallback | None,
        on_text: TextStream | None,
    ) -> list[Trace]:
        """`stages` in order over the traces, each one `run_stage` for the whole batch."""
        if not traces:
            return traces
        for stage in stages:
            settings = stage.generation.model_copy(update=dict(update)) if update else stage.generation
            stream = functools.partial(_stream_to, on_text, stage.name) if on_text is not None else None
            adapter = adapters.get(stage.name, _OWN)
            results = self.run_stage(stage, traces, adapter=adapter, settings=settings, on_text=stream)
            for i, (trace, result) in enumerate(zip(traces, results, strict=True)):
                trace.stages.append(result)
                if on_stage is not None:
                    on_stage(i, result)
        return traces


def is_direct(stage: StageConfig) -> bool:
    """Whether `stage` is `Stack.direct_stage`'s pseudo-stage (the instruction alone, nothing read)."""
    return stage.template == DIRECT_TEMPLATE and not stage.reads


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
