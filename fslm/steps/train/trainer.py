"""The transformers Trainer as `fslm train` uses it: a fresh LoRA per adapter, the target-token loss, the
length-grouped order, one set of training arguments, and callbacks for progress events and the heap.

Imported only when a training runs: it imports PyTorch, transformers and PEFT.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fslm import heap
from fslm.config import StageTraining
from fslm.events import EventHandler, Progress, emit
from fslm.provenance import versions
from fslm.steps.train.batches import EpochLengthGroupedSampler, PadCollator
from fslm.steps.train.examples import Examples
from fslm.steps.train.loss import target_token_loss
from fslm.steps.train.memory import StepPlan
from fslm.steps.train.options import TrainOptions

log = logging.getLogger("fslm")


def lora_config(lora: Any) -> Any:
    """The PEFT config of a fresh stage adapter from the manifest's `lora` section."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


class StackTrainer(Trainer):
    """The stock Trainer with fslm's batch order (`group_by_length`, seeded by `order_seed`) and loss."""

    def __init__(self, *args: Any, group_by_length: bool = True, order_seed: int = 0, **kwargs: Any) -> None:
        self.length_grouped, self.order_seed = group_by_length, order_seed
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The stock schedule, but warm-up's first step learns: transformers' warm-up gives step 1 a learning rate of
        0 (step/W), so a run lost its first step (and `--max-steps 1` wrote a no-op adapter); here step k of W warm-up
        steps runs at k/(W+1) of the rate, the steps after as the stock schedule has them."""
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        if fresh and warmup > 0 and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                scheduler.optimizer, [warm_from_first_step(f, warmup) for f in scheduler.lr_lambdas]
            )
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if not self.length_grouped:
            return super()._get_train_sampler(train_dataset)
        # Group by the global batch (all processes, all accumulation steps): the sampler's order then depends
        # only on the global batch, so N processes x batch B draw the examples 1 process x batch N*B would.
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        lengths = [len(e["input_ids"]) for e in self.train_dataset]
        return EpochLengthGroupedSampler(size, lengths, self.order_seed)

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


def warm_from_first_step(stock: Any, warmup: int) -> Any:
    """A schedule's multiplier whose warm-up ramps over steps 1..W as k/(W+1) instead of (k-1)/W (never 0)."""

    def multiplier(step: int) -> float:  # step: optimizer steps already taken
        return (step + 1) / (warmup + 1) if step < warmup else stock(step)

    return multiplier


def make_trainer(
    model: Any,
    examples: Examples,
    options: TrainOptions,
    output_dir: Path,
    callbacks: list[Any],
    pad_id: int,
    precision: str = "fp32",
    step: StepPlan | None = None,
) -> StackTrainer:
    """A Trainer for one adapter's examples, saving its checkpoints into `output_dir`; `step`: its micro-batches and
    gradient checkpointing (memory.py; None: whole batches, every layer checkpointed)."""
    trainer = StackTrainer(
        model=model,
        args=training_arguments(options, output_dir, bool(examples.val), precision, step),
        train_dataset=examples.train,
        eval_dataset=examples.val or None,
        data_collator=PadCollator(pad_id, fixed_length=options.pad_to),
        callbacks=callbacks,
        group_by_length=options.group_by_length,
        order_seed=options.seed,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout, which is for results
    return trainer


def training_arguments(
    options: TrainOptions, output_dir: Path, has_val: bool, precision: str, step: StepPlan | None = None
) -> TrainingArguments:
    micro, every = (step.micro_batch, step.every_n_layers) if step else (options.batch_size, 1)
    return TrainingArguments(
        output_dir=str(output_dir),
        # micro-batches whose gradients add up to one --batch-size batch: the same update (the loss is divided by
        # the whole batch's target tokens), and the batch order is drawn per whole batch (StackTrainer)
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=options.grad_accum * (options.batch_size // micro),
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
        activation_checkpointing=every is not None,
        # Non-reentrant: works with frozen embeddings (no inputs that require grad) and restores the RNG state, so
        # the recomputed dropout masks are the ones of the first pass.
        activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": every or 1},
    )


def fit(
    trainer: Any,
    ex: Examples,
    resume_from: Path | None,
    data: Path,
    data_sha: str,
    options: TrainOptions,
    processes: int,
    lora: Any,
    prompt_form: str = "full",
) -> tuple[StageTraining, list[dict[str, Any]]]:
    """Train, take the validation loss, and write down everything needed to reproduce the adapter (with the prompt
    form it trained on, which inference then renders)."""
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
        prompt=prompt_form,
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


def _final_train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean of the last 5 logged step losses (one step alone is too noisy to record)."""
    losses = [h["loss"] for h in history if "loss" in h]
    return float(sum(losses[-5:]) / len(losses[-5:])) if losses else None


def release_heap() -> Any:
    """A trainer callback that hands the heap's free pages back after every optimizer step (fslm.heap): each step's
    activations differ in size with the batch's length, and glibc kept the freed ones resident."""

    class ReleaseHeap(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            heap.release()

    return ReleaseHeap()


def progress_events(label: str, on_event: EventHandler | None) -> Any:
    """A trainer callback that reports each optimizer step as a `Progress` event: steps done, the latest loss and
    tokens/s (input tokens, no padding)."""

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
