"""`fslm train`: one fresh LoRA adapter per stage on the stack's shared base, with the transformers Trainer.

Why the stock Trainer: it already does gradient accumulation, schedules with warm-up, checkpoints with optimizer,
scheduler and RNG state, exact resume (it skips the batches already seen), and data parallelism through
accelerate (DDP over gloo or NCCL, FSDP, DeepSpeed). fslm adds what is specific to stacks: examples rendered by
`Stack.render_prompt` (the inference prompt; examples.py), loss only on target tokens (loss.py), length-grouped
batches with dynamic padding and a per-epoch seeded order, so a resumed run sees the same batches (batches.py,
trainer.py), a resumable run's state (run_state.py), the final stage trained on the earlier stages' own outputs
(student.py), atomic adapter writes, and the per-stage training record in stack.yaml.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fslm import heap
from fslm.backends import TRAIN
from fslm.card import write_model_card
from fslm.config import StackConfig, StageTraining
from fslm.distilled import DistilledRecord, Problem, read_distilled
from fslm.errors import FslmError
from fslm.events import EventHandler
from fslm.files import atomic_replace_dir, exclusive, sha256_file
from fslm.precision import resolve as resolve_precision
from fslm.stack import Stack
from fslm.stackdir import BASELINES, MULTITASK, SINGLE, StackDir
from fslm.steps.train.examples import Examples, build_examples, report_problems, split_validation
from fslm.steps.train.memory import StepPlan, longest_batch_tokens, plan_step
from fslm.steps.train.options import TrainedAdapter, TrainOptions, TrainResult
from fslm.steps.train.run_state import LOCK, RunState, manifest_hash
from fslm.steps.train.student import student_outputs

log = logging.getLogger("fslm")


@dataclass
class _Data:
    """The distilled file as this call trains on it: its hash, its records split into training and validation (the
    same records held out for every stage), and the rows it could not read."""

    path: Path
    sha: str
    train: list[DistilledRecord]
    val: list[DistilledRecord]
    problems: list[Problem]


def train(
    stack: str | Path,
    data: str | Path,
    options: TrainOptions | None = None,
    on_event: EventHandler | None = None,
    loaded: Any = None,
) -> TrainResult:
    """Train the requested stage adapters (or the single baseline) of the stack directory `stack` on `data`.

    `loaded`: an already loaded `Stack` of that directory (torch backend) to train in place, so a caller that goes
    on to run or evaluate the stack does not load the base twice; it ends with the new adapters attached.
    """
    import torch
    from accelerate import PartialState

    options = options or TrainOptions()
    directory, path = StackDir(stack), Path(data)
    config = directory.load()
    reserved = [n for n in config.stage_names if n in BASELINES]
    if reserved:
        raise FslmError(f"a stage is named {reserved[0]!r}, which is reserved for a baseline adapter")
    names = _names(config, options)
    records, parse_problems = read_distilled(path)
    if not records:
        first = f" (first problem: {parse_problems[0]})" if parse_problems else ""
        raise FslmError(f"{path}: no usable records{first}")
    train_recs, val_recs = split_validation(records, options.val_fraction, options.seed)
    inputs = _Data(path, sha256_file(path), train_recs, val_recs, parse_problems)
    # cpu=True matters: without it accelerate sees no GPU and ignores the torchrun environment (no gloo group).
    state = PartialState(cpu=not torch.cuda.is_available())
    is_main = state.is_main_process
    lock = exclusive(directory.root / LOCK, f"the stack {directory.root}") if is_main else contextlib.nullcontext()
    with lock:
        return _Training(directory, inputs, options, names, state, on_event, loaded).train_all()


class _Training:
    """Everything after the checks, under the stack's lock (the main process holds it): the examples of every
    adapter, the resumable run, and the loop that trains each adapter fresh on the bare base."""

    def __init__(
        self,
        directory: StackDir,
        data: _Data,
        options: TrainOptions,
        names: list[str],
        state: Any,
        on_event: EventHandler | None,
        loaded: Any,
    ) -> None:
        self.directory, self.data, self.options, self.names = directory, data, options, names
        self.state, self.on_event, self.is_main = state, on_event, state.is_main_process
        self.config = directory.load()
        self.form = options.prompt or self.config.prompt  # the prompt form every adapter of this call trains on
        self.stack = loaded if loaded is not None else Stack.load(directory.root, backend="torch", check=False)
        self.backend = self.stack.backend
        self.backend.require(TRAIN, "training")
        self.base: Any = None  # the bare base model while adapters train (the backend holds it again after)
        self.wrapped: Any = None  # the PeftModel around the base while one adapter trains (an interrupt unloads it)
        self.inputs_from = _answer_inputs(directory, self.config, names, options)
        self.examples, self.skipped = self._examples()
        identity = {
            "data_sha256": data.sha,
            "names": names,
            "options": options.fingerprint(),
            "manifest": manifest_hash(self.config),
        }
        self.run = RunState(directory, identity)
        self.run.start(options.resume, options.fresh, self.is_main)
        state.wait_for_everyone()
        if self.skipped and self.is_main:
            log.warning("%d bad record(s) skipped; --strict makes them fatal", self.skipped)

    def _examples(self) -> tuple[dict[str, Examples], int]:
        """Every adapter's examples (the final stage on the student's own outputs is built later, in the loop), and
        how many bad records were skipped. Every process sees the same data and stops on the same bad record; only
        the main one prints warnings."""
        data, options = self.data, self.options
        examples = {
            n: build_examples(self.stack, data.train, data.val, n, options.max_length, form=self.form)
            for n in self.names
        }
        problems = {n: e.problems for n, e in examples.items()}
        skipped = report_problems(data.path, problems, data.problems, options.strict, quiet=not self.is_main)
        for n, e in examples.items():
            if not e.train:
                raise FslmError(f"{data.path}: no usable training examples for {n!r} (see the warnings above)")
        return examples, skipped

    def train_all(self) -> TrainResult:
        """Train each adapter not yet written by an interrupted run; the model card and stack.yaml follow."""
        # Each adapter trains fresh on the bare base, never on top of an old adapter.
        self.base = self.backend.release_adapters()
        precision = resolve_precision(self.options.precision, "training")
        result = TrainResult(skipped_records=self.skipped)
        try:
            for index, name in enumerate(self.names, 1):
                if name in self.run.done:
                    if self.is_main:
                        log.info("%s: already trained in the interrupted run; skipping", name)
                    continue
                result.adapters[name] = self._train_one(name, f"{name} ({index}/{len(self.names)})", precision)
        finally:  # also on Ctrl-C mid-adapter: the base gets its LoRA layers removed before the backend takes it
            if self.wrapped is not None:
                self.base, self.wrapped = self.wrapped.unload(), None
            self.backend.take_model(self.base)
        self.stack.attach_adapters()
        if self.is_main:
            write_model_card(self.directory.root, self.directory.load())
            if not self.options.keep_checkpoints and set(self.names) <= set(self.run.done):
                shutil.rmtree(self.run.root, ignore_errors=True)
        return result

    def _train_one(self, name: str, label: str, precision: str) -> TrainedAdapter:
        """One adapter, fresh on the bare base, trained, saved and recorded; the bare base is `self.base` again."""
        from peft import get_peft_model
        from transformers import set_seed

        # PyTorch, transformers and PEFT load with the trainer: only when an adapter trains.
        from fslm.steps.train.trainer import fit, lora_config, make_trainer, progress_events, release_heap

        options, examples, student = self.options, self.examples[name], None
        if name == self.config.final_stage.name and self.inputs_from != "teacher":
            self.base, examples, student = _on_policy_examples(
                self.stack, self.directory, self.data, options, self.inputs_from, self.state, self.on_event
            )
        set_seed(options.seed)  # the fresh LoRA's initial weights depend only on the seed
        model = self.wrapped = get_peft_model(self.base, lora_config(self.config.lora))
        resume_from = self._resume_point(name)
        callbacks = [release_heap()]
        if self.on_event is not None and self.is_main:
            callbacks.append(progress_events(label, self.on_event))
        pad_id = self.backend.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else self.backend.tokenizer.eos_token_id
        step = self._step_plan(name, examples)
        trainer = make_trainer(
            model, examples, options, self.run.checkpoint_dir(name), callbacks, pad_id, precision, step
        )
        if self.is_main:
            where = f" from {resume_from.name}" if resume_from else ""
            log.info(
                "%s: %d training / %d validation examples, %d target tokens%s",
                name,
                len(examples.train),
                len(examples.val),
                examples.target_tokens,
                where,
            )
        processes, lora = self.state.num_processes, self.config.lora
        training, history = fit(
            trainer, examples, resume_from, self.data.path, self.data.sha, options, processes, lora, self.form
        )
        self._annotate(name, training, precision, student)
        training.micro_batch = step.micro_batch  # type: ignore[attr-defined]
        training.checkpoint_every_n_layers = step.every_n_layers  # type: ignore[attr-defined]
        target = self._save(name, model, training)
        del trainer
        self.base, self.wrapped = model.unload(), None
        heap.release()
        if step.every_n_layers is not None:  # the Trainer turned it on; inference on the base must not see it
            self.base.activation_checkpointing_disable()
            self.base.disable_input_require_grads()
        return TrainedAdapter(name=name, path=target, training=training, log_history=history)

    def _step_plan(self, name: str, examples: Examples) -> StepPlan:
        """Micro-batches and gradient checkpointing for this adapter: as asked (on: every layer, whole batches;
        off: none), or auto, sized to the memory budget and this adapter's longest batch (memory.py)."""
        choice, batch = self.options.gradient_checkpointing, self.options.batch_size
        lengths = [len(e["input_ids"]) for e in examples.train]
        config = self.base.config
        if choice == "auto" and self.base.device.type == "cpu":
            heap.return_free_memory()  # what an earlier adapter's steps freed is not in use
            plan = plan_step(config, lengths, batch, self.options.memory_budget, self.config.lora.dropout)
            if self.is_main:
                log.info("%s: %s", name, plan.describe(batch))
            return plan
        every = 1 if choice != "off" else None  # on, or auto on a GPU (the budget is of this process's RAM)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        return StepPlan(batch, every, layers, longest_batch_tokens(lengths, batch), 0.0, 0.0)

    def _resume_point(self, name: str) -> Path | None:
        """The checkpoint an interrupted run of this adapter continues from (--resume), its incomplete ones dropped."""
        if not self.options.resume:
            return None
        if self.is_main:
            self.run.drop_incomplete(name)
        self.state.wait_for_everyone()
        return self.run.last_checkpoint(name)

    def _annotate(self, name: str, training: StageTraining, precision: str, student: dict[str, Any] | None) -> None:
        """What the training record says besides the Trainer's figures (extra fields are allowed)."""
        training.precision = precision  # type: ignore[attr-defined]
        if name == self.config.final_stage.name:
            training.answer_inputs = self.inputs_from  # type: ignore[attr-defined]
            training.student = student  # type: ignore[attr-defined]
        training.distill = _distill_recipe(self.data.path)  # type: ignore[attr-defined]

    def _save(self, name: str, model: Any, training: StageTraining) -> Path:
        """adapters/<name>/ replaced whole (a kill leaves the old one or the new one), then its record in stack.yaml."""
        target = self.directory.adapter(name)
        if self.is_main:
            staging = target.with_name(f".{name}.{os.getpid()}.tmp")
            if staging.exists():
                shutil.rmtree(staging)
            model.save_pretrained(str(staging), safe_serialization=True)
            atomic_replace_dir(staging, target)
            self.directory.record_training(name, training)
            self.run.mark_done(name)
        self.state.wait_for_everyone()
        return target


def _answer_inputs(directory: StackDir, config: StackConfig, names: list[str], options: TrainOptions) -> str:
    """What the final stage reads in this call: `auto` is student when every earlier stage will be trained."""
    if options.answer_inputs != "auto":
        return options.answer_inputs
    upstream = [s.name for s in config.stages[:-1]]
    ready = all(n in names or directory.is_trained(n) for n in upstream)
    return "student" if upstream and ready else "teacher"


def _on_policy_examples(
    stack: Stack,
    directory: StackDir,
    data: _Data,
    options: TrainOptions,
    inputs_from: str,
    state: Any,
    on_event: EventHandler | None,
) -> tuple[Any, Examples, dict[str, Any]]:
    """The final stage's examples over the trained earlier stages' own outputs (generated by the main process
    first; the others then find them in the cache). Returns (the bare base again, the examples, a summary)."""
    backend = stack.backend
    final = stack.config.final_stage.name
    missing = [s.name for s in stack.config.stages[:-1] if not directory.is_trained(s.name)]
    if missing:
        raise FslmError(
            f"--answer-inputs {inputs_from}: stage(s) {', '.join(missing)} have no adapter yet; train them first "
            "or use --answer-inputs teacher"
        )
    backend.take_model(backend.release_adapters())
    stack.attach_adapters()  # the trained earlier stages, for generating on torch
    records = data.train + data.val
    summary: dict[str, Any] = {}
    if state.is_main_process:
        outputs, summary = student_outputs(directory, records, options.student_backend, stack, on_event)
    state.wait_for_everyone()
    if not state.is_main_process:
        outputs, summary = student_outputs(directory, records, options.student_backend, stack)
    base = backend.release_adapters()
    form = options.prompt or stack.config.prompt
    ex = build_examples(
        stack, data.train, data.val, final, options.max_length, inputs=outputs, mix=inputs_from == "mix", form=form
    )
    if not ex.train:
        raise FslmError(f"no usable training examples for {final!r} on the student's outputs")
    log.info(
        "%s: reads the student's own earlier stages (%s; %d generated, %d cached)",
        final,
        summary.get("backend"),
        summary.get("generated", 0),
        summary.get("cached", 0),
    )
    return base, ex, summary


def _distill_recipe(data: Path) -> dict[str, Any] | None:
    """The distillation recipe of the data (from the manifest `fslm distill` wrote beside it), for the record."""
    manifest = data.with_name(data.name + ".manifest.json")
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {"teacher": (info.get("teacher") or {}).get("id"), **(info.get("options") or {})}


def _names(config: StackConfig, options: TrainOptions) -> list[str]:
    """The adapters this call trains, in stack order."""
    if options.single and options.multitask:
        raise FslmError("--single and --multitask train different baselines: choose one per call")
    if options.single:
        return [SINGLE]
    if options.multitask:
        return [MULTITASK]
    names = options.stages or config.stage_names
    unknown = [n for n in names if n not in config.stage_names]
    if unknown:
        raise FslmError(
            f"--stages: no stage named {', '.join(map(repr, unknown))} (stages: {', '.join(config.stage_names)})"
        )
    return [n for n in config.stage_names if n in names]
