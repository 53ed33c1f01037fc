"""`fslm train`: one fresh LoRA adapter per stage on the stack's shared base, with the transformers Trainer.

Why the stock Trainer: it already does gradient accumulation, schedules with warm-up, checkpoints with optimizer,
scheduler and RNG state, exact resume (it skips the batches already seen), and data parallelism through
accelerate (DDP over gloo or NCCL, FSDP, DeepSpeed). fslm adds what is specific to stacks: examples rendered by
`Stack.render_prompt` (the inference prompt), loss only on target tokens, length-grouped batches with dynamic
padding and a per-epoch seeded order (so a resumed run sees the same batches), atomic adapter writes, and the
per-stage training record in stack.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from fslm.config import StageTraining, load_config, save_config
from fslm.errors import FslmError
from fslm.files import atomic_replace_dir, atomic_write_text, sha256_file
from fslm.train_data import (
    SINGLE,
    Examples,
    PadCollator,
    Problem,
    build_examples,
    read_records,
    single_prompt,
    split_validation,
)

__all__ = ["TrainOptions", "TrainedAdapter", "train_stack", "single_prompt", "load_single", "launch", "SINGLE"]

log = logging.getLogger("fslm")
STATE_DIR = ".fslm-train"  # inside the stack directory: checkpoints and the resumable run's state
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")


@dataclass
class TrainOptions:
    stages: list[str] | None = None  # None: every stage
    single: bool = False  # train only the single-adapter baseline (adapters/single/)
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps per stage; overrides epochs
    lr: float = 2e-4
    batch_size: int = 4  # per process
    grad_accum: int = 1
    scheduler: str = "cosine"
    warmup: float = 0.05  # < 1: fraction of the steps; >= 1: a number of steps
    seed: int = 0
    val_fraction: float = 0.1
    save_steps: int = 50
    max_length: int | None = None  # cap on prompt + target tokens (default: the model's context)
    strict: bool = False
    resume: bool = False
    keep_checkpoints: bool = False
    group_by_length: bool = True  # False + pad_to=N is the naive baseline of benchmarks/train_throughput.py
    pad_to: int | None = None
    eval_each_epoch: bool = True  # False: validation loss only at the end (outside the timed training loop)
    progress: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the result: a resumed run must match them."""
        skip = {"resume", "keep_checkpoints", "progress", "strict", "save_steps", "eval_each_epoch"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class TrainedAdapter:
    name: str
    path: Path
    training: StageTraining
    log_history: list[dict[str, Any]] = field(default_factory=list)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("fslm", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


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

    def __init__(self, directory: Path, identity: dict[str, Any]) -> None:
        self.root = directory / STATE_DIR
        self.path = self.root / "run.json"
        self.identity = identity
        self.done: list[str] = []

    def start(self, resume: bool, is_main: bool) -> None:
        if resume:
            if not self.path.is_file():
                raise FslmError(f"{self.root}: no interrupted run to resume; run without --resume")
            saved = json.loads(self.path.read_text())
            for key, value in self.identity.items():
                if saved.get("identity", {}).get(key) != value:
                    raise FslmError(
                        f"{self.path}: cannot resume: {key} differs from the interrupted run "
                        f"({saved.get('identity', {}).get(key)!r} then, {value!r} now); run without --resume"
                    )
            self.done = list(saved.get("done", []))
        elif is_main:
            if self.root.exists():
                if self.path.is_file() and any(self.root.glob("*/checkpoint-*")):
                    log.warning(
                        "discarding the checkpoints of an interrupted run in %s (--resume continues it)", self.root
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


def _detach_adapters(stack: Any) -> Any:
    """The bare base model: drop every attached adapter's LoRA layers (weights untouched, nothing merged),
    so each stage trains a fresh LoRA on the base, never on top of an old adapter."""
    backend = stack.backend
    if not hasattr(backend, "base_model") or not hasattr(backend, "adapters"):
        raise FslmError(f"training needs the torch backend (this stack uses {backend.name!r})")
    model = backend.model
    if hasattr(model, "peft_config"):
        model = model.unload()
    backend.model = model
    backend.adapters = {}
    return model


def _reattach(stack: Any) -> None:
    """Attach every adapter on disk again, so the returned Stack runs the trained stack."""
    for stage in stack.config.stages:
        path = stack.adapter_path(stage.name)
        if path is not None and (path / "adapter_config.json").is_file():
            stack.backend.add_adapter(stage.name, path)
    stack.backend.model.eval()


def _make_trainer(
    model: Any, examples: Examples, options: TrainOptions, output_dir: Path, callbacks: list[Any], pad_id: int
) -> Any:
    import torch
    from transformers import Trainer, TrainingArguments

    from fslm.train_data import EpochLengthGroupedSampler

    class StackTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if not options.group_by_length:
                return super()._get_train_sampler(train_dataset)
            # Group by the global batch (all processes, all accumulation steps): the sampler's order then depends
            # only on the global batch, so N processes x batch B draw the examples 1 process x batch N*B would.
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            lengths = [len(e["input_ids"]) for e in self.train_dataset]
            return EpochLengthGroupedSampler(size, lengths, options.seed)

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
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
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


def train_stack(
    directory: str | Path, data: str | Path, options: TrainOptions | None = None, stack: Any = None
) -> dict[str, TrainedAdapter]:
    """Train the requested stage adapters (or the single baseline) of the stack in `directory` on `data`.

    Returns what was trained in this call; `stack` (loaded here through `Stack.load` when not given) ends with
    the new adapters attached.
    """
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from fslm.card import write_model_card
    from fslm.stack import Stack

    options = options or TrainOptions()
    directory, data = Path(directory), Path(data)
    config = load_config(directory)
    if options.scheduler not in SCHEDULERS:
        raise FslmError(f"--scheduler {options.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if SINGLE in config.stage_names:
        raise FslmError(f"a stage is named {SINGLE!r}, which is reserved for the single-adapter baseline")
    if options.single:
        names = [SINGLE]
    else:
        names = options.stages or config.stage_names
        unknown = [n for n in names if n not in config.stage_names]
        if unknown:
            raise FslmError(
                f"--stages: no stage named {', '.join(map(repr, unknown))} (stages: {', '.join(config.stage_names)})"
            )
        names = [n for n in config.stage_names if n in names]  # stack order

    records, parse_problems = read_records(data)
    if not records:
        first = f" (first problem: {parse_problems[0]})" if parse_problems else ""
        raise FslmError(f"{data}: no usable records{first}")
    data_sha = sha256_file(data)
    train_recs, val_recs = split_validation(records, options.val_fraction, options.seed)

    import torch

    # cpu=True matters: without it accelerate sees no GPU and ignores the torchrun environment (no gloo group).
    state = PartialState(cpu=not torch.cuda.is_available())
    is_main = state.is_main_process
    stack = stack if stack is not None else Stack.load(directory, backend="torch")
    examples = {n: build_examples(stack, train_recs, val_recs, n, options.max_length) for n in names}
    # Every process sees the same data and stops on the same bad record; only the main one prints warnings.
    problems = {n: e.problems for n, e in examples.items()}
    skipped = _report_problems(data, problems, parse_problems, options.strict, quiet=not is_main)
    for n, e in examples.items():
        if not e.train:
            raise FslmError(f"{data}: no usable training examples for {n!r} (see the warnings above)")

    run = RunState(directory, {"data_sha256": data_sha, "names": names, "options": options.fingerprint()})
    run.start(options.resume, is_main)
    state.wait_for_everyone()
    if skipped and is_main:
        log.warning("%d bad record(s) skipped; --strict makes them fatal", skipped)

    base = _detach_adapters(stack)
    tok = stack.backend.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lora = config.lora
    results: dict[str, TrainedAdapter] = {}
    try:
        for name in names:
            if name in run.done:
                if is_main:
                    log.info("%s: already trained in the interrupted run; skipping", name)
                continue
            ex = examples[name]
            set_seed(options.seed)  # the fresh LoRA's initial weights depend only on the seed
            peft_config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(base, peft_config)
            resume_from = None
            if options.resume:
                if is_main:
                    run.drop_incomplete(name)
                state.wait_for_everyone()
                resume_from = run.last_checkpoint(name)
            progress = _RichProgress(name, names.index(name) + 1, len(names)) if options.progress and is_main else None
            trainer = _make_trainer(
                model, ex, options, run.checkpoint_dir(name), [progress] if progress else [], pad_id
            )
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
                versions=versions(),
                val_examples=len(ex.val),
                skipped_records=len({p.line for p in ex.problems}),
                val_losses=[round(float(h["eval_loss"]), 5) for h in history if "eval_loss" in h],
                tokens_per_second=round(session_tokens / runtime, 1) if runtime > 0 else None,
                input_tokens=tokens,
                lr=options.lr,
                batch_size=options.batch_size,
                grad_accum=options.grad_accum,
                processes=state.num_processes,
                scheduler=options.scheduler,
                warmup=options.warmup,
                seed=options.seed,
                resumed=resume_from is not None,
                lora={"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules},
            )
            target = Stack.adapter_dir(directory, name)
            if is_main:
                staging = target.with_name(f".{name}.{os.getpid()}.tmp")
                if staging.exists():
                    shutil.rmtree(staging)
                model.save_pretrained(str(staging), safe_serialization=True)
                atomic_replace_dir(staging, target)
                _record(directory, name, training)
                run.mark_done(name)
            state.wait_for_everyone()
            results[name] = TrainedAdapter(name, target, training, history)
            del trainer
            base = model.unload()
    finally:
        stack.backend.model = base
        stack.backend.adapters = {}
    _reattach(stack)
    if is_main:
        write_model_card(directory, load_config(directory))
        if not options.keep_checkpoints and set(names) <= set(run.done):
            shutil.rmtree(run.root, ignore_errors=True)
    return results


def _record(directory: Path, name: str, training: StageTraining) -> None:
    """Write the training record into stack.yaml (re-read first, so concurrent manifest edits survive)."""
    config = load_config(directory)
    if name == SINGLE:
        config.metadata["single_training"] = training.model_dump(mode="json", exclude_none=True)
    else:
        config.stage(name).training = training
    save_config(config, directory)


def load_single(stack: Any) -> str:
    """Attach adapters/single/ (the baseline of `fslm train --single`) to a loaded stack; returns its adapter name.

    Use it with `single_prompt(stack, instruction, input)` and `stack.backend.generate(prompts, "single", ...)`.
    """
    path = stack.adapter_path(SINGLE)
    if path is None or not (path / "adapter_config.json").is_file():
        raise FslmError(f"{path}: no single-adapter baseline; train it with `fslm train DIR --data D --single`")
    if SINGLE not in stack.backend.adapters:
        stack.backend.add_adapter(SINGLE, path)
    return SINGLE


# --- progress -------------------------------------------------------------------------------------


class _RichProgress(TrainerCallback):
    """A rich progress bar per stage with the latest loss and tokens/s (input tokens without padding)."""

    def __init__(self, name: str, index: int, total: int) -> None:
        self.name, self.index, self.total = name, index, total
        self.loss: float | None = None
        self._progress: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from fslm.cli import err

        self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen or 0
        self._progress = Progress(
            TextColumn(f"[bold]{self.name}[/] ({self.index}/{self.total})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.name, total=state.max_steps, completed=state.global_step, loss="-", tps="-"
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
        if logs and "eval_loss" in logs and self._progress is not None:
            self._progress.console.print(
                f"{self.name}: epoch {state.epoch:.2f} validation loss {logs['eval_loss']:.4f}", highlight=False
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._progress is None:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        tps = ((state.num_input_tokens_seen or 0) - self._tok0) / dt
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        self._progress.update(self._task, completed=state.global_step, loss=loss, tps=f"{tps:,.0f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# --- multi-process ---------------------------------------------------------------------------------


def launch(argv: Sequence[str], processes: int) -> int:
    """Re-run `fslm train ARGV` under `accelerate launch` with N data-parallel processes on this machine.

    CPU: gloo; GPU: one process per GPU (NCCL). For multi-node, FSDP or DeepSpeed call `accelerate launch`
    yourself with an accelerate config (docs/train.md).
    """
    import torch

    # `--multi_gpu` selects accelerate's torchrun launcher, which is also the one that starts N CPU processes
    # (its `--cpu` flag starts a single process unless run under MPI); without a GPU each process uses gloo.
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise FslmError(f"--processes {processes}: only {torch.cuda.device_count()} GPU(s) visible")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "fslm", "train", *argv]
    return subprocess.call(cmd)


def strip_processes(argv: Sequence[str]) -> list[str]:
    """argv without its --processes option (the launched processes must not launch again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out.append(a)
    return out
