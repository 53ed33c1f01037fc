"""`fslm train`: one fresh LoRA adapter per stage on the stack's shared base, with the transformers Trainer.

Why the stock Trainer: it already does gradient accumulation, schedules with warm-up, checkpoints with optimizer,
scheduler and RNG state, exact resume (it skips the batches already seen), and data parallelism through
accelerate (DDP over gloo or NCCL, FSDP, DeepSpeed). fslm adds what is specific to stacks: examples rendered by
`Stack.render_prompt` (the inference prompt), loss only on target tokens, length-grouped batches with dynamic
padding and a per-epoch seeded order (so a resumed run sees the same batches), atomic adapter writes, and the
per-stage training record in stack.yaml.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fslm import heap
from fslm.config import StageTraining
from fslm.distilled import Problem, read_distilled
from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import atomic_replace_dir, atomic_write_text, exclusive, sha256_file
from fslm.options import Options, comma_list
from fslm.precision import resolve as resolve_precision
from fslm.provenance import versions
from fslm.stackdir import BASELINES, MULTITASK, SINGLE, StackDir

if TYPE_CHECKING:
    from fslm.steps.train.examples import Examples

log = logging.getLogger("fslm")
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
LOCK = ".fslm-train.lock"  # in the stack directory: one training at a time


class TrainOptions(Options):
    """Everything `fslm train` can be told besides its two paths; the CLI's flags and defaults come from here."""

    stages: list[str] | None = Field(None, description="Stages to train (default: all).")
    single: bool = Field(False, description="Train only the single-adapter baseline (adapters/single/).")
    multitask: bool = Field(
        False,
        description="Train only the multitask baseline (adapters/multitask/): every stage's targets + the answer.",
    )
    answer_inputs: Literal["auto", "student", "teacher", "mix"] = Field(
        "auto",
        description="What the final stage reads in training: student (the trained earlier stages' own outputs), "
        "teacher (the distilled targets) or mix (both); auto: student when every earlier stage is trained.",
    )
    student_backend: Literal["auto", "torch", "llamacpp"] = Field(
        "auto", description="Where the student's earlier-stage outputs are generated (auto: llama.cpp when it can)."
    )
    epochs: float = Field(3.0, ge=0.01, description="Epochs per stage.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps per stage (overrides --epochs).")
    lr: float = Field(2e-4, ge=0.0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Examples per batch per process.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="cosine, linear or constant_with_warmup."
    )
    warmup: float = Field(0.05, ge=0.0, description="Warm-up: a fraction of the steps (<1) or steps (>=1).")
    seed: int = Field(0, description="Seed for LoRA init, data order, dropout and the validation split.")
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="Records held out for validation.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    max_length: int | None = Field(None, ge=8, description="Skip examples longer than this (default: the context).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bfloat16 autocast where the hardware computes it natively (AMX, AVX-512-BF16, CUDA), "
        "else float32; LoRA weights, optimizer state and saved adapters stay float32.",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Keep only each layer's input for the backward pass and recompute the rest: about a third "
        "more compute for a fraction of the activation memory (same loss and gradients).",
    )
    strict: bool = Field(False, description="Stop on the first bad record instead of skipping.")
    resume: bool = Field(False, description="Continue an interrupted run from its checkpoints.")
    fresh: bool = Field(False, description="Discard an interrupted run's checkpoints and start over.")
    keep_checkpoints: bool = Field(False, description="Keep DIR/.fslm-train/ after a finished run.")
    # For benchmarks/train_throughput.py: False + pad_to=N is the naive baseline.
    group_by_length: bool = True
    pad_to: int | None = None
    eval_each_epoch: bool = True  # False: validation loss only at the end (outside the timed training loop)

    _stages = field_validator("stages", mode="before")(comma_list)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the result: a resumed run must match them."""
        skip = {"resume", "fresh", "keep_checkpoints", "strict", "save_steps", "eval_each_epoch"}
        skip.add("gradient_checkpointing")  # recomputes the same activations: the result does not depend on it
        return self.model_dump(mode="json", exclude=skip)


class TrainedAdapter(BaseModel):
    """One adapter written by this call: where, and what `fslm train` recorded about it in stack.yaml."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    path: Path
    training: StageTraining
    log_history: list[dict[str, Any]] = Field(default_factory=list)


class TrainResult(BaseModel):
    """The adapters trained by this call (those already trained by an interrupted run are not repeated)."""

    adapters: dict[str, TrainedAdapter] = Field(default_factory=dict)
    skipped_records: int = 0


# --- data ---------------------------------------------------------------------------------------


def _report_problems(
    data: Path, per_name: dict[str, list[Problem]], parse: list[Problem], strict: bool, quiet: bool = False
) -> int:
    """One line per bad record (naming the stages it was skipped for); fatal under --strict."""
    grouped: dict[tuple[int, str], list[str]] = {}
    for p in parse:
        grouped.setdefault((p.line, p.message), [])
    for name, problems in per_name.items():
        for p in problems:
            grouped.setdefault((p.line, p.message), []).append(name)
    lines = []
    for (line, message), names in sorted(grouped.items()):
        where = f" (skipped for {', '.join(names)})" if names else " (skipped)"
        lines.append(f"{data}:{line}: {message}{where}")
    if not lines:
        return 0
    if strict:
        more = f" (and {len(lines) - 1} more bad record(s))" if len(lines) > 1 else ""
        raise FslmError(f"{lines[0].replace(' (skipped', ' (').replace(' ()', '')}{more}; fix it or drop --strict")
    for text in lines[:20] if not quiet else []:
        log.warning("%s", text)
    if len(lines) > 20 and not quiet:
        log.warning("... and %d more bad record(s)", len(lines) - 20)
    return len(lines)


# --- the resumable run ----------------------------------------------------------------------------


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


# --- training -------------------------------------------------------------------------------------


def lora_config(lora: Any) -> Any:
    """The PEFT config of a fresh stage adapter from the manifest's `lora` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _make_trainer(
    model: Any,
    examples: Examples,
    options: TrainOptions,
    output_dir: Path,
    callbacks: list[Any],
    pad_id: int,
    precision: str = "fp32",
) -> Any:
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from fslm.steps.train.examples import EpochLengthGroupedSampler, PadCollator, target_token_loss

    class StackTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if not options.group_by_length:
                return super()._get_train_sampler(train_dataset)
            # Group by the global batch (all processes, all accumulation steps): the sampler's order then depends
            # only on the global batch, so N processes x batch B draw the examples 1 process x batch N*B would.
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            lengths = [len(e["input_ids"]) for e in self.train_dataset]
            return EpochLengthGroupedSampler(size, lengths, options.seed)

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            # The stock loss, but with logits only at the positions that predict a target token (loss.py's
            # target_token_loss): full-vocabulary logits at every prompt position dominated training's memory.
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            loss, outputs = target_token_loss(model, head, inputs, num_items_in_batch)
            # As Trainer.compute_loss: the loss is divided by the target count of all processes, so scale it back
            # up by their number (DDP averages the gradients).
            accepts = self.model_accepts_loss_kwargs
            if self.args.average_tokens_across_devices and accepts and num_items_in_batch is not None:
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

    has_val = bool(examples.val)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        lr_scheduler_type=options.scheduler,
        warmup_steps=options.warmup,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=2,
        eval_strategy="epoch" if has_val and options.eval_each_epoch else "no",
        seed=options.seed,
        data_seed=options.seed,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        label_names=["labels"],
        prediction_loss_only=True,  # validation needs the loss; gathering its logits would hold them all in memory
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",  # autocast: bf16 matmuls, float32 master weights and optimizer state
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        activation_checkpointing=options.gradient_checkpointing,
        # Non-reentrant: works with frozen embeddings (no inputs that require grad) and restores the RNG state, so
        # the recomputed dropout masks are the ones of the first pass.
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    collator = PadCollator(pad_id, fixed_length=options.pad_to)
    trainer = StackTrainer(
        model=model,
        args=args,
        train_dataset=examples.train,
        eval_dataset=examples.val or None,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout, which is for results
    return trainer


def _final_train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean of the last 5 logged step losses (one step alone is too noisy to record)."""
    losses = [h["loss"] for h in history if "loss" in h]
    return float(sum(losses[-5:]) / len(losses[-5:])) if losses else None


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
    from accelerate import PartialState

    from fslm.steps.train.examples import split_validation

    options = options or TrainOptions()
    directory, data = StackDir(stack), Path(data)
    config = directory.load()
    reserved = [n for n in config.stage_names if n in BASELINES]
    if reserved:
        raise FslmError(f"a stage is named {reserved[0]!r}, which is reserved for a baseline adapter")
    names = _names(config, options)
    records, parse_problems = read_distilled(data)
    if not records:
        first = f" (first problem: {parse_problems[0]})" if parse_problems else ""
        raise FslmError(f"{data}: no usable records{first}")
    data_sha = sha256_file(data)
    train_recs, val_recs = split_validation(records, options.val_fraction, options.seed)

    import torch

    # cpu=True matters: without it accelerate sees no GPU and ignores the torchrun environment (no gloo group).
    state = PartialState(cpu=not torch.cuda.is_available())
    is_main = state.is_main_process
    lock = exclusive(directory.root / LOCK, f"the stack {directory.root}") if is_main else contextlib.nullcontext()
    with lock:
        return _train(
            directory, data, options, on_event, loaded, state, names, parse_problems, data_sha, train_recs, val_recs
        )


def _train(
    directory: StackDir,
    data: Path,
    options: TrainOptions,
    on_event: EventHandler | None,
    loaded: Any,
    state: Any,
    names: list[str],
    parse_problems: list[Problem],
    data_sha: str,
    train_recs: list[Any],
    val_recs: list[Any],
) -> TrainResult:
    """Everything after the checks, under the stack's lock (the main process holds it)."""
    from peft import get_peft_model
    from transformers import set_seed

    from fslm.backends import TRAIN
    from fslm.card import write_model_card
    from fslm.stack import Stack
    from fslm.steps.train.examples import build_examples

    config = directory.load()
    is_main = state.is_main_process
    stack_obj = loaded if loaded is not None else Stack.load(directory.root, backend="torch")
    backend = stack_obj.backend
    backend.require(TRAIN, "training")
    final = config.final_stage.name
    inputs_from = _answer_inputs(directory, config, names, options)
    # The final stage on the student's own outputs is built after the earlier stages are trained (in the loop).
    examples = {n: build_examples(stack_obj, train_recs, val_recs, n, options.max_length) for n in names}
    # Every process sees the same data and stops on the same bad record; only the main one prints warnings.
    problems = {n: e.problems for n, e in examples.items()}
    skipped = _report_problems(data, problems, parse_problems, options.strict, quiet=not is_main)
    for n, e in examples.items():
        if not e.train:
            raise FslmError(f"{data}: no usable training examples for {n!r} (see the warnings above)")

    identity = {
        "data_sha256": data_sha,
        "names": names,
        "options": options.fingerprint(),
        "manifest": _manifest_hash(config),
    }
    run = RunState(directory, identity)
    run.start(options.resume, options.fresh, is_main)
    state.wait_for_everyone()
    if skipped and is_main:
        log.warning("%d bad record(s) skipped; --strict makes them fatal", skipped)

    # Each adapter trains fresh on the bare base, never on top of an old adapter.
    base = backend.release_adapters()
    precision = resolve_precision(options.precision, "training")
    pad_id = backend.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else backend.tokenizer.eos_token_id
    lora = config.lora
    result = TrainResult(skipped_records=skipped)
    try:
        for index, name in enumerate(names, 1):
            if name in run.done:
                if is_main:
                    log.info("%s: already trained in the interrupted run; skipping", name)
                continue
            ex = examples[name]
            student: dict[str, Any] | None = None
            if name == final and inputs_from != "teacher":
                base, ex, student = _on_policy_examples(
                    stack_obj, directory, train_recs, val_recs, options, inputs_from, state, on_event
                )
            set_seed(options.seed)  # the fresh LoRA's initial weights depend only on the seed
            model = get_peft_model(base, lora_config(lora))
            resume_from = None
            if options.resume:
                if is_main:
                    run.drop_incomplete(name)
                state.wait_for_everyone()
                resume_from = run.last_checkpoint(name)
            label = f"{name} ({index}/{len(names)})"
            callbacks = [_release_heap()] + (
                [_progress_events(label, on_event)] if on_event is not None and is_main else []
            )
            trainer = _make_trainer(model, ex, options, run.checkpoint_dir(name), callbacks, pad_id, precision)
            if is_main:
                where = f" from {resume_from.name}" if resume_from else ""
                log.info(
                    "%s: %d training / %d validation examples, %d target tokens%s",
                    name,
                    len(ex.train),
                    len(ex.val),
                    ex.target_tokens,
                    where,
                )
            training, history = _fit(trainer, ex, resume_from, data, data_sha, options, state.num_processes, lora)
            training.precision = precision  # type: ignore[attr-defined]
            if name == final:
                training.answer_inputs = inputs_from  # type: ignore[attr-defined]  # (extra fields are allowed)
                training.student = student  # type: ignore[attr-defined]
            training.distill = _distill_recipe(data)  # type: ignore[attr-defined]
            target = directory.adapter(name)
            if is_main:
                staging = target.with_name(f".{name}.{os.getpid()}.tmp")
                if staging.exists():
                    shutil.rmtree(staging)
                model.save_pretrained(str(staging), safe_serialization=True)
                atomic_replace_dir(staging, target)
                directory.record_training(name, training)
                run.mark_done(name)
            state.wait_for_everyone()
            result.adapters[name] = TrainedAdapter(name=name, path=target, training=training, log_history=history)
            del trainer
            base = model.unload()
            heap.release()
            if options.gradient_checkpointing:  # the Trainer turned it on; inference on the base must not see it
                base.activation_checkpointing_disable()
                base.disable_input_require_grads()
    finally:
        backend.take_model(base)
    stack_obj.attach_adapters()
    if is_main:
        write_model_card(directory.root, directory.load())
        if not options.keep_checkpoints and set(names) <= set(run.done):
            shutil.rmtree(run.root, ignore_errors=True)
    return result


def _manifest_hash(config: Any) -> str:
    """What of stack.yaml shapes an adapter (base, LoRA, stages' prompts and decoding), without the training records
    train itself writes: a resumed run must find it unchanged."""
    import hashlib

    data = config.model_dump(mode="json", exclude={"baselines", "metadata", "description", "name"})
    for stage in data["stages"]:
        stage.pop("training", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _answer_inputs(directory: StackDir, config: Any, names: list[str], options: TrainOptions) -> str:
    """What the final stage reads in this call: `auto` is student when every earlier stage will be trained."""
    if options.answer_inputs != "auto":
        return options.answer_inputs
    upstream = [s.name for s in config.stages[:-1]]
    ready = all(n in names or directory.is_trained(n) for n in upstream)
    return "student" if upstream and ready else "teacher"


def _on_policy_examples(
    stack: Any,
    directory: StackDir,
    train_recs: list[Any],
    val_recs: list[Any],
    options: TrainOptions,
    inputs_from: str,
    state: Any,
    on_event: EventHandler | None,
) -> tuple[Any, Any, dict[str, Any]]:
    """The final stage's examples over the trained earlier stages' own outputs (generated by the main process
    first; the others then find them in the cache). Returns (the bare base again, the examples, a summary)."""
    from fslm.steps.train.examples import build_examples
    from fslm.steps.train.student import student_outputs

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
    records = train_recs + val_recs
    summary: dict[str, Any] = {}
    if state.is_main_process:
        outputs, summary = student_outputs(directory, records, options.student_backend, stack, on_event)
    state.wait_for_everyone()
    if not state.is_main_process:
        outputs, summary = student_outputs(directory, records, options.student_backend, stack)
    base = backend.release_adapters()
    ex = build_examples(
        stack, train_recs, val_recs, final, options.max_length, inputs=outputs, mix=inputs_from == "mix"
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


def _names(config: Any, options: TrainOptions) -> list[str]:
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


def _fit(
    trainer: Any,
    ex: Examples,
    resume_from: Path | None,
    data: Path,
    data_sha: str,
    options: TrainOptions,
    processes: int,
    lora: Any,
) -> tuple[StageTraining, list[dict[str, Any]]]:
    """Train, take the validation loss, and write down everything needed to reproduce the adapter."""
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    val_loss = None
    history = list(trainer.state.log_history)
    if ex.val:
        step = trainer.state.global_step
        done = [h for h in history if "eval_loss" in h and h.get("step") == step]
        if done:
            val_loss = float(done[-1]["eval_loss"])
        else:
            val_loss = float(trainer.evaluate()["eval_loss"])
            history = list(trainer.state.log_history)
    seconds = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    runtime = float(out.metrics.get("train_runtime", 0) or 0)  # this session only (after a resume)
    session_tokens = tokens - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    training = StageTraining(
        data_file=str(data.resolve()),
        data_sha256=data_sha,
        examples=len(ex.train),
        epochs=round(float(trainer.state.epoch or 0), 4),
        steps=int(trainer.state.global_step),
        train_loss=_final_train_loss(history),
        val_loss=val_loss,
        seconds=round(seconds, 2),
        versions=versions(("fslm", "torch", "transformers", "peft", "accelerate")),
        val_examples=len(ex.val),
        skipped_records=len({p.line for p in ex.problems}),
        val_losses=[round(float(h["eval_loss"]), 5) for h in history if "eval_loss" in h],
        tokens_per_second=round(session_tokens / runtime, 1) if runtime > 0 else None,
        input_tokens=tokens,
        lr=options.lr,
        batch_size=options.batch_size,
        grad_accum=options.grad_accum,
        processes=processes,
        scheduler=options.scheduler,
        warmup=options.warmup,
        seed=options.seed,
        resumed=resume_from is not None,
        lora={"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules},
    )
    return training, history


# --- progress -------------------------------------------------------------------------------------


def _release_heap() -> Any:
    """A trainer callback that hands the heap's free pages back after every optimizer step (fslm.heap): each step's
    activations differ in size with the batch's length, and glibc kept the freed ones resident."""
    from transformers import TrainerCallback

    class ReleaseHeap(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            heap.release()

    return ReleaseHeap()


def _progress_events(label: str, on_event: EventHandler | None) -> Any:
    """A trainer callback that reports each optimizer step as a `Progress` event: steps done, the latest loss and
    tokens/s (input tokens, no padding). Built here so that importing this module does not import transformers."""
    from transformers import TrainerCallback

    class ProgressEvents(TrainerCallback):
        def __init__(self) -> None:
            self.loss: float | None = None
            self._t0, self._tok0 = time.perf_counter(), 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen or 0
            emit(on_event, Progress("train", label, state.global_step, state.max_steps, self._info(0.0)))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
            if logs and "eval_loss" in logs:
                log.info("%s: epoch %.2f validation loss %.4f", label, state.epoch, logs["eval_loss"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            tps = ((state.num_input_tokens_seen or 0) - self._tok0) / dt
            emit(on_event, Progress("train", label, state.global_step, state.max_steps, self._info(tps)))

        def _info(self, tps: float) -> dict[str, str]:
            loss = f"{self.loss:.4f}" if self.loss is not None else "-"
            return {"loss": f"loss {loss}", "rate": f"{tps:,.0f} tok/s"}

    return ProgressEvents()
