"""The `fslm` command line: small commands that compose, one clear line and exit code 2 on bad input."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table

from fslm.errors import FslmError

app = typer.Typer(
    name="fslm",
    help="Fine-tune and run stacks of small language models (intent -> plan -> reasoning -> answer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()  # results (stdout)
err = Console(stderr=True)  # progress, warnings, errors (stderr)

F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn FslmError into one red line and exit code 2; never a traceback for input the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except FslmError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging() -> None:
    logger = logging.getLogger("fslm")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=err, show_time=False, show_path=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False


StackDir = Annotated[Path, typer.Argument(help="Stack directory (holds stack.yaml).")]


@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the stack.")],
    recipe: Annotated[str, typer.Option(help="Shipped recipe name or path to a recipe YAML.")] = "paper4",
    base: Annotated[str, typer.Option(help="Base model: alias, local HF directory, .gguf file or hub id.")] = (
        "smollm2-135m-instruct"
    ),
    force: Annotated[bool, typer.Option(help="Overwrite an existing stack.yaml.")] = False,
) -> None:
    """Create a stack directory: stack.yaml, adapters/, README.md."""
    from fslm.init import init_stack

    config = init_stack(directory, recipe=recipe, base=base, force=force)
    out.print(
        f"Created stack [bold]{config.name}[/] in {directory} "
        f"({len(config.stages)} stages: {' -> '.join(config.stage_names)}; base {config.base.model})"
    )
    out.print(f'Next: fslm run {directory} "Give three tips for staying healthy."')


@app.command()
@friendly
def info(directory: StackDir) -> None:
    """Show a stack's base model, stages, adapters and parameter counts."""
    from fslm import models
    from fslm.config import load_config
    from fslm.stack import Stack

    config = load_config(directory)
    ref = models.resolve(config.base.model, directory)
    base_params = models.count_parameters(ref)
    out.print(f"[bold]{config.name}[/]  {config.description}".rstrip())
    out.print(
        f"base: {config.base.model} ({ref.kind}: {ref.location}), {models.architecture(ref)}, "
        f"{base_params / 1e6:.1f} M parameters, {config.base.dtype}"
    )
    table = Table("#", "stage", "reads", "adapter", "adapter params", "max new tokens", "val loss")
    total = 0
    for i, s in enumerate(config.stages, 1):
        path = Stack.adapter_dir(directory, s.name)
        weights = path / "adapter_model.safetensors"
        n = models.safetensors_parameters(weights) if weights.is_file() else 0
        total += n
        val = s.training.val_loss if s.training and s.training.val_loss is not None else None
        table.add_row(
            str(i),
            s.name,
            ", ".join(s.reads) or "-",
            f"adapters/{s.name}" if n else "none (base)",
            f"{n / 1e6:.2f} M" if n else "-",
            str(s.generation.max_new_tokens),
            f"{val:.3f}" if val is not None else "-",
        )
    out.print(table)
    out.print(f"resident parameters: {(base_params + total) / 1e6:.1f} M (base + {len(config.stages)} stages)")


@app.command()
@friendly
def run(
    directory: StackDir,
    instruction: Annotated[str, typer.Argument(help="The instruction to answer.")],
    input: Annotated[str | None, typer.Option("--input", help="Optional input/context for the instruction.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (the trace).")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Override every stage's max_new_tokens.")] = None,
    prompts: Annotated[bool, typer.Option("--prompts", help="Also show each stage's full prompt.")] = False,
    backend: Annotated[
        str | None, typer.Option(help="Backend: torch, llamacpp or openai (default: the manifest's base.backend).")
    ] = None,
) -> None:
    """Answer an instruction through every stage and show the trace."""
    from fslm.config import load_config
    from fslm.stack import Stack

    if not instruction.strip():
        raise FslmError("the instruction is empty")
    config = load_config(directory)  # validate before the (slow) model load
    names = config.stage_names
    with err.status(f"loading {config.base.model}") as status:
        stack = Stack.load(directory, backend=backend)

        def on_stage(_: int, r: Any) -> None:
            if not as_json:
                used = f"adapter {r.adapter}" if r.adapter else "base model"
                title = f"[bold]{r.name}[/] · {used} · {r.output_tokens} tokens · {r.seconds:.1f}s"
                if prompts:
                    out.print(Panel(r.prompt, title=f"{r.name} prompt", border_style="dim"))
                out.print(Panel(r.output or "[dim](empty)[/]", title=title, title_align="left"))
            nxt = names.index(r.name) + 1
            if nxt < len(names):
                status.update(f"stage {nxt + 1}/{len(names)}: {names[nxt]}")

        status.update(f"stage 1/{len(names)}: {names[0]}")
        trace = stack.run(instruction, input, on_stage=on_stage, max_new_tokens=max_new_tokens)
    if as_json:
        sys.stdout.write(json.dumps(trace.to_dict(prompts=prompts), ensure_ascii=False) + "\n")
    else:
        out.print(Panel(trace.answer, title="[bold green]answer[/]", title_align="left", border_style="green"))


@app.command()
@friendly
def train(
    directory: StackDir,
    data: Annotated[Path, typer.Option("--data", help="Distilled JSONL (docs/formats.md), e.g. from fslm distill.")],
    stages: Annotated[str | None, typer.Option(help="Comma-separated stages to train (default: all).")] = None,
    single: Annotated[
        bool, typer.Option("--single", help="Train only the single-adapter baseline (adapters/single/).")
    ] = False,
    epochs: Annotated[float, typer.Option(min=0.01, help="Epochs per stage.")] = 3.0,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps per stage (overrides --epochs).")
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per batch per process.")] = 4,
    grad_accum: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = 1,
    scheduler: Annotated[str, typer.Option(help="cosine, linear or constant_with_warmup.")] = "cosine",
    warmup: Annotated[
        float, typer.Option(min=0.0, help="Warm-up: a fraction of the steps (<1) or steps (>=1).")
    ] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed for LoRA init, data order, dropout and the validation split.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Records held out for validation.")] = 0.1,
    save_steps: Annotated[int, typer.Option(min=1, help="Checkpoint every N optimizer steps.")] = 50,
    max_length: Annotated[
        int | None, typer.Option(min=8, help="Skip examples longer than this (default: the context).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoints.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop on the first bad record instead of skipping.")] = False,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep DIR/.fslm-train/ after a finished run.")] = False,
    processes: Annotated[
        int, typer.Option(min=1, help="Data-parallel processes on this machine (via accelerate launch).")
    ] = 1,
) -> None:
    """Train one LoRA adapter per stage (or --single: the one-adapter baseline) on distilled data."""
    import os

    from fslm import train as training

    if processes > 1 and "LOCAL_RANK" not in os.environ:
        code = training.launch(training.strip_processes(sys.argv[2:]), processes)
        raise typer.Exit(code)
    options = training.TrainOptions(
        stages=[s.strip() for s in stages.split(",") if s.strip()] if stages else None,
        single=single,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        scheduler=scheduler,
        warmup=warmup,
        seed=seed,
        val_fraction=val_fraction,
        save_steps=save_steps,
        max_length=max_length,
        strict=strict,
        resume=resume,
        keep_checkpoints=keep_checkpoints,
    )
    results = training.train_stack(directory, data, options)
    if os.environ.get("RANK", "0") != "0":
        return
    table = Table("adapter", "examples", "val", "epochs", "steps", "train loss", "val loss", "tok/s", "seconds")
    for name, r in results.items():
        t = r.training
        extra = t.model_extra or {}
        table.add_row(
            f"adapters/{name}",
            str(t.examples),
            str(extra.get("val_examples", "-")),
            f"{t.epochs:.2f}",
            str(t.steps),
            f"{t.train_loss:.4f}" if t.train_loss is not None else "-",
            f"{t.val_loss:.4f}" if t.val_loss is not None else "-",
            f"{extra.get('tokens_per_second') or 0:,.0f}",
            f"{t.seconds:.1f}",
        )
    out.print(table)
    if not results:
        out.print("nothing left to train (every adapter of this run was already written)")
    elif single:
        out.print(f"Wrote {directory}/adapters/single (the single-adapter baseline)")
    else:
        out.print(f'Next: fslm run {directory} "Give three tips for staying healthy."')


def main() -> None:
    app()


if __name__ == "__main__":
    main()
