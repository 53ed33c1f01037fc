"""Experiment 2's plan: the expected wall time of every step left, from rates measured in a minute or two.

`python benchmarks/experiment2.py ... --plan` calls `plan` before anything long starts: it distils a few questions
(an empty cache, so the teacher is timed), trains a few steps, scores a few questions per system and prints the
hours per step and in all (OUT/plan.md, OUT/plan.json). Steps the ledger has finished are left out.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from exp2_sync import BORROWABLE

ADAPTERS = ("stages", "single", "multitask")
LORA_OVERHEAD = 1.2  # a system with a LoRA adapter scores ~1.2x the bare base's time (README, "Measured")


def done_so_far(out: Path, sources: dict[str, Any]) -> dict[str, int]:
    """Questions of each source already distilled (written or rejected), from OUT's files."""
    done = {}
    for name in sources:
        part = out / f"distilled-{name}.jsonl"
        rows = [part, part.with_name(part.name + ".rejected.jsonl")]
        done[name] = len({json.loads(x)["id"] for f in rows if f.is_file() for x in f.read_text().splitlines() if x})
    return done


def distill_options(args: argparse.Namespace, policy: str, fmt: str, limit: int, seed: int, **more: Any) -> Any:
    """The campaign's distillation settings, one place for the run and the plan's probe (which must time the same)."""
    from fslm.steps.distill import DistillOptions
    from fslm.teachers import TeacherSpec

    return DistillOptions(
        teacher=TeacherSpec(backend=args.teacher_backend, model=args.teacher, batch_size=args.teacher_batch),
        teacher_mode=args.teacher_mode,
        options=args.options,
        reference=policy,
        samples=args.samples,
        filters=args.filters,
        word_limits=args.word_limits,
        fit_overlong=args.fit_overlong,
        format=fmt,
        limit=limit,
        seed=seed,
        **more,
    )


def probe_teacher(args: argparse.Namespace, out: Path, stack: Any, sources: dict[str, Any], policy: str) -> dict:
    """Distil `--plan-questions` questions of the first source (own files and cache): seconds a question, kept share."""
    from fslm.steps.distill import distill

    name, (path, fmt, _) = next(iter(sources.items()))
    target = out / "plan" / f"probe-{name}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    options = distill_options(
        args, policy, fmt, args.plan_questions, args.seed + 7919, overwrite=True
    )  # another sample
    r = distill(path, stack.root, target, options)
    return {
        "source": name,
        "questions": r.selected - r.resumed,
        "seconds": round(r.seconds, 1),
        "seconds_per_question": round(r.seconds / max(r.selected - r.resumed, 1), 2),
        "kept_share": round(r.written_records / max(r.selected, 1), 3),
        "cache_hits": r.cache_hits,  # 0: every question was timed
        "file": target,
    }


def probe_train(stack: Any, data: Path, batch_size: int, steps: int = 3, form: str = "full") -> dict:
    """Example lengths per adapter (from the probe's records) and seconds of one optimizer step on the answer stage's
    longest examples, as `fslm train` takes it (LoRA, the sliced loss, and the micro-batches and checkpointing its
    default `--gradient-checkpointing auto` picks at the default memory budget), on PyTorch."""
    import time

    import torch
    from peft import get_peft_model

    from fslm import heap
    from fslm.distilled import read_distilled
    from fslm.errors import FslmError
    from fslm.stack import Stack
    from fslm.stackdir import MULTITASK, SINGLE
    from fslm.steps.train.batches import PadCollator
    from fslm.steps.train.examples import build_examples
    from fslm.steps.train.loss import target_token_loss
    from fslm.steps.train.memory import plan_step
    from fslm.steps.train.options import TrainOptions
    from fslm.steps.train.trainer import lora_config

    loaded = Stack.load(stack.root, backend="torch")
    records, _ = read_distilled(data)
    lengths = {}
    for name in [*loaded.config.stage_names, SINGLE, MULTITASK]:
        examples = build_examples(loaded, records, [], name, form=form).train
        lengths[name] = {"examples_per_record": round(len(examples) / max(len(records), 1), 2),
                         "tokens_per_example": round(sum(len(e["input_ids"]) for e in examples) / max(len(examples), 1), 1)}  # fmt: skip
    examples = build_examples(loaded, records, [], loaded.config.final_stage.name, form=form).train
    if not examples:
        raise FslmError(f"{data}: the teacher probe kept no record to time training on; raise --plan-questions")
    batch_examples = sorted(examples, key=lambda e: -len(e["input_ids"]))[:batch_size]
    while len(batch_examples) < batch_size:  # fewer records than a batch: repeat them
        batch_examples += batch_examples[: batch_size - len(batch_examples)]
    tok = loaded.backend.tokenizer
    batch = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)(batch_examples)
    model = get_peft_model(loaded.backend.release_adapters(), lora_config(loaded.config.lora))
    heap.return_free_memory()
    budget = TrainOptions().memory_budget
    plan = plan_step(
        model.config, [len(e["input_ids"]) for e in examples], batch_size, budget, loaded.config.lora.dropout
    )
    if plan.every_n_layers is not None:
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=plan.every_n_layers)
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    head = model.get_output_embeddings()
    micro = [{k: v[i : i + plan.micro_batch] for k, v in batch.items()} for i in range(0, batch_size, plan.micro_batch)]
    targets = int(batch["labels"][:, 1:].ne(-100).sum())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        for part in micro:  # gradients accumulate to the whole batch's, as the Trainer's
            loss, _ = target_token_loss(model, head, part, num_items_in_batch=targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    step = sum(seconds[1:]) / max(len(seconds) - 1, 1)
    return {"lengths": lengths, "batch_tokens": tokens, "seconds_per_step": round(step, 2),
            "tokens_per_second": round(tokens / step, 1), "step_plan": plan.describe(batch_size)}  # fmt: skip


def probe_eval(args: argparse.Namespace, out: Path, stack: Any, stage_tokens: int) -> dict:
    """Seconds a question of the base and of the (untrained) stack's chain on a few ARC-Easy items, stages capped at
    the distilled targets' mean length (a trained stage stops about there). Only the time is kept."""
    from fslm.steps.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        data_dir=args.data_dir, tasks=["arc_easy"], systems=["base", "stack"], limit=8, seed=args.eval_seed + 1,
        stage_tokens=stage_tokens, stage_check=0,
    )  # fmt: skip
    rows = evaluate(stack.root, out / "plan" / "eval", options).results["systems"]
    return {
        "base_seconds_per_question": rows["base"]["seconds_per_query"],
        "stack_seconds_per_question": rows["stack"]["seconds_per_query"],
        "stage_tokens": stage_tokens,
    }


def probe_teacher_row(args: argparse.Namespace, out: Path) -> dict:
    """Seconds a question of the teacher's own row (the campaign's teacher stack, its backend) on the same few
    ARC-Easy items as `probe_eval`."""
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.init import InitOptions, init

    teacher_stack = out / "teacher-stack"
    if not (teacher_stack / "stack.yaml").is_file():
        init(teacher_stack, InitOptions(base=args.teacher))
    backend = teacher_scoring(args)
    options = EvalOptions(data_dir=args.data_dir, tasks=["arc_easy"], systems=["base"], limit=8,
                          seed=args.eval_seed + 1, backend=backend)  # fmt: skip
    row = evaluate(teacher_stack, out / "plan" / "eval-teacher", options).results["systems"]["base"]
    return {"teacher_seconds_per_question": row["seconds_per_query"], "teacher_backend": backend}


def eval_items(args: argparse.Namespace, tasks: str | None = None) -> dict[str, int]:
    """Test items per task the eval will score (its seeded subset, or the whole split when smaller)."""
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "mmlu": 14079}
    return {t: min(args.eval_limit, sizes.get(t, args.eval_limit)) for t in (tasks or args.tasks).split(",")}


def torch_threads() -> tuple[int, int]:
    """PyTorch's intra-op threads and the cores this process may run on. MKL_NUM_THREADS=1 beside OMP_NUM_THREADS=2
    (a common way to quiet numpy) also holds PyTorch to one thread: a campaign sitting once trained at half speed so."""
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads(), cores


def plan(args: argparse.Namespace, out: Path, stack: Any, sources: dict[str, Any], policy: str, ledger: dict) -> dict:
    """Expected wall time of every step left, from rates measured now (module docstring: --plan)."""
    import shutil

    from fslm.files import atomic_write_text
    from fslm.steps.evaluate import EvalOptions

    shutil.rmtree(
        out / "plan", ignore_errors=True
    )  # every rate measured now: an earlier plan's caches would time nothing
    done = done_so_far(out, sources)
    teacher = probe_teacher(args, out, stack, sources, policy)
    kept_share = args.kept_share if args.kept_share is not None else max(teacher["kept_share"], 0.05)
    train = probe_train(stack, teacher["file"], args.batch_size, form=args.prompt)
    manifest = json.loads(teacher["file"].with_name(teacher["file"].name + ".manifest.json").read_text())
    targets = manifest.get("target_tokens") or {}
    earlier = [s for s in stack.load().stage_names[:-1] if s in targets]
    stage_tokens = max(8, round(sum(targets[s]["mean"] for s in earlier) / max(len(earlier), 1)))
    ev = probe_eval(args, out, stack, stage_tokens)
    lent = {r for r in BORROWABLE if args.rows_from is not None and (args.rows_from / r).is_file()}
    if args.teacher_row and args.teacher and "eval-teacher/systems/base.json" not in lent:
        ev.update(probe_teacher_row(args, out))

    rows = []
    questions = sum(n for _, _, n in sources.values())
    left = {name: max(0, n - done.get(name, 0)) for name, (_, _, n) in sources.items()}
    finished = ledger.get("steps", {})
    distill_h = sum(left.values()) * teacher["seconds_per_question"] / 3600
    rows.append(
        (
            "distill",
            f"{sum(left.values())} of {questions} questions left",
            f"{teacher['seconds_per_question']} s/question",
            distill_h,
        )
    )
    kept = round(questions * kept_share)
    train_records = math.floor(kept * 0.9)  # 10 % held out for validation
    steps = math.ceil(args.epochs * train_records / args.batch_size)
    step_tokens = args.batch_size * train["lengths"][stack.load().final_stage.name]["tokens_per_example"]
    train_h = 0.0
    for name, length in train["lengths"].items():
        per_step = args.batch_size * length["tokens_per_example"] / train["tokens_per_second"]
        hours = steps * per_step / 3600
        train_h += hours
        rows.append(
            (
                f"train {name}",
                f"{steps} steps x {args.batch_size} examples of ~{length['tokens_per_example']:.0f} tokens",
                f"{train['tokens_per_second']} tokens/s",
                hours,
            )
        )
    student_h = kept * (ev["stack_seconds_per_question"] - ev["base_seconds_per_question"]) / 3600
    rows.append(
        (
            "train: student's earlier stages",
            f"{kept} records",
            f"{ev['stack_seconds_per_question'] - ev['base_seconds_per_question']:.2f} s/record",
            student_h,
        )
    )
    items = eval_items(args)
    per_system = {"base": ev["base_seconds_per_question"], "single": ev["base_seconds_per_question"] * LORA_OVERHEAD,
                  "multitask": ev["base_seconds_per_question"] * LORA_OVERHEAD,
                  "stack": ev["stack_seconds_per_question"] + ev["base_seconds_per_question"] * (LORA_OVERHEAD - 1)}  # fmt: skip
    n_items = sum(items.values())
    eval_h = 0.0
    for system in args.systems.split(","):
        sec = per_system.get(system, per_system["stack"])
        reused = system == "base" and "eval/systems/base.json" in lent
        hours = 0.0 if reused else n_items * sec / 3600
        eval_h += hours
        rows.append(
            (
                f"eval {system}",
                f"{n_items} test items ({', '.join(f'{t} {n}' for t, n in items.items())})"
                + (f"; reused from {args.rows_from} where its key matches" if reused else ""),
                f"{sec:.2f} s/question",
                hours,
            )
        )
    if args.gate:
        # Test items: direct scoring, and scoring after the chain for the unsure share (here: all); the chains
        # themselves come from the eval step (--chains-from). Dev items that tune τ: direct + a chain generated.
        sec = 2 * per_system["single"]
        tune = EvalOptions.model_fields["tune_limit"].default * len(items)
        tune_sec = per_system["single"] + per_system["stack"]
        rows.append(
            (
                "gate stack",
                f"{n_items} test items, the eval step's chains reused; {tune} dev items tune τ",
                f"<= {sec:.2f} s/test question, {tune_sec:.2f} s/dev question",
                (n_items * sec + tune * tune_sec) / 3600,
            )
        )
    if args.teacher_row and args.teacher and "eval-teacher/systems/base.json" in lent:
        rows.append(
            ("teacher row", f"{n_items} test items, reused from {args.rows_from} where its key matches", "-", 0.0)
        )
    elif args.teacher_row and args.teacher:
        sec = ev["teacher_seconds_per_question"]
        rows.append(
            (
                "teacher row",
                f"{n_items} test items, the teacher on {ev['teacher_backend']}",
                f"{sec:.2f} s/question",
                n_items * sec / 3600,
            )
        )
    if args.ablate_limit > 0:
        stages = stack.load().stage_names
        ablate_items = sum(min(args.ablate_limit, n) for n in eval_items(args, args.ablate_tasks).values())
        # Each row borrows the eval's chain up to its ablated stage: stage k of n generates n-1-k of the n-1 earlier
        # stages (the answer's ablation none): the n rows generate n/2 whole chains a question and score n times.
        earlier = max(len(stages) - 1, 1)
        chains = sum(earlier - k for k in range(earlier)) / earlier
        generate = per_system["stack"] - per_system["single"]
        rows.append(
            (
                "ablate stages",
                f"{len(stages)} rows x {ablate_items} test items ({args.ablate_tasks}), the eval's chains borrowed "
                f"up to the ablated stage: {chains:g} chains generated a question",
                f"{per_system['single']:.2f} s/question scoring, {generate:.2f} a chain",
                ablate_items * (len(stages) * per_system["single"] + chains * generate) / 3600,
            )
        )
    for name, step in finished.items():  # the ledger's steps
        if step.get("finished"):
            rows = [r for r in rows if not r[0].startswith(name)]
    total = sum(r[3] for r in rows)
    lines = [
        f"Plan of `experiment2.py --regime {args.regime}` (measured {teacher['questions']} teacher questions, "
        f"{train['batch_tokens']}-token training steps ({train['step_plan']}), 8 eval questions per system on this machine, PyTorch on {torch_threads()[0]} threads; kept share "
        f"{kept_share:.0%} {'given' if args.kept_share is not None else 'from the probe'}; {steps} optimizer steps "
        f"per adapter = {args.epochs} epoch of {train_records} records):",
        "",
        "| step | work | rate | hours |",
        "|---|---|---|---:|",
        *(f"| {a} | {b} | {c} | {h:.2f} |" for a, b, c, h in rows),
        f"| **total** | | | **{total:.1f}** |",
    ]
    report = {
        "rows": [{"step": a, "work": b, "rate": c, "hours": round(h, 3)} for a, b, c, h in rows],
        "total_hours": round(total, 4),
        "teacher": {k: v for k, v in teacher.items() if k != "file"},
        "train": train,
        "eval": ev,
        "done": done,
        "kept_share": kept_share,
        "steps_per_adapter": steps,
        "step_tokens": step_tokens,
        "markdown": "\n".join(lines),
    }
    atomic_write_text(out / "plan.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "plan.md", report["markdown"] + "\n")
    return report


def teacher_scoring(args: argparse.Namespace) -> str:
    """The backend that scores the teacher's row: the one it distilled on where that can score (llama.cpp scores
    the GGUF in its own quantisation, the model that wrote the targets; PyTorch would run it de-quantised to fp32)."""
    return "llamacpp" if args.teacher_backend == "llamacpp" else "torch"
