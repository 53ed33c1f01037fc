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


@app.command()
@friendly
def distill(
    dataset: Annotated[Path, typer.Argument(help="Dataset: Alpaca JSON/JSONL, CSV, Parquet, Self-Instruct or GSM8K.")],
    stack: Annotated[
        Path, typer.Option(help="Stack directory: its stages' roles and templates are the teacher's tasks.")
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Output JSONL (a <out>.manifest.json is written beside it).")],
    teacher_model: Annotated[
        str | None,
        typer.Option(help="Teacher: alias, HF dir or .gguf (torch/llamacpp; default the stack's base) or served name."),
    ] = None,
    teacher_backend: Annotated[
        str | None, typer.Option(help="torch, llamacpp or openai (default: openai with --teacher-url, else torch).")
    ] = None,
    teacher_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1.")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the server's API key.")
    ] = "FSLM_API_KEY",
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Requests in flight (openai teacher).")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per request before it is retried (openai).")] = 120.0,
    max_retries: Annotated[int, typer.Option(min=0, max=50, help="Retries with exponential backoff (openai).")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per batched generate call (torch teacher).")] = 8,
    final_from: Annotated[
        str, typer.Option(help="Final stage target: reference (when the record has one) or teacher.")
    ] = ("reference"),
    show_reference: Annotated[
        bool, typer.Option(help="Show the reference output to the teacher when it writes earlier stages.")
    ] = True,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Override every stage's budget for the teacher.")
    ] = None,
    filters: Annotated[str, typer.Option(help="Quality filters: comma list of empty,overlong,repetition, or none.")] = (
        "empty,overlong,repetition"
    ),
    overlong_factor: Annotated[
        float, typer.Option(min=0.0, help="overlong: more student tokens than factor x the stage's max_new_tokens.")
    ] = 1.0,
    trim_cut: Annotated[
        bool, typer.Option(help="Trim a teacher output cut at the token limit to its last full sentence or line.")
    ] = True,
    format: Annotated[str, typer.Option(help="auto, alpaca, self-instruct or gsm8k.")] = "auto",
    instruction_field: Annotated[str | None, typer.Option(help="Field holding the instruction.")] = None,
    input_field: Annotated[str | None, typer.Option(help="Field holding the optional input.")] = None,
    output_field: Annotated[str | None, typer.Option(help="Field holding the reference output.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Distil a reproducible random sample of N records.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 0,
    strict: Annotated[bool, typer.Option(help="Bad rows and benchmark contamination are fatal (exit 2).")] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Benchmark data directory: warn when instructions appear in a test split.")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Teacher cache (default <out>.cache.jsonl); share it across runs.")
    ] = (None),
    overwrite: Annotated[bool, typer.Option(help="Replace an output written by a different distill run.")] = False,
) -> None:
    """Teacher-written training targets for every stage of a stack (resumable: rerun the same command)."""
    from fslm.distill import FILTERS, DistillOptions, run_command

    if final_from not in ("reference", "teacher"):
        raise FslmError(f"--final-from must be reference or teacher, not {final_from!r}")
    chosen = tuple(f.strip() for f in filters.split(",") if f.strip() and f.strip() != "none")
    unknown = [f for f in chosen if f not in FILTERS]
    if unknown:
        raise FslmError(f"--filters: unknown filter {', '.join(unknown)} (known: {', '.join(FILTERS)}, none)")
    options = DistillOptions(final_from, show_reference, max_new_tokens, chosen, overlong_factor, trim_cut)  # type: ignore[arg-type]
    r = run_command(
        dataset,
        stack,
        out_path,
        console=err,
        teacher_backend=teacher_backend,
        teacher_model=teacher_model,
        teacher_url=teacher_url,
        api_key_env=api_key_env,
        concurrency=concurrency,
        timeout=timeout,
        max_retries=max_retries,
        batch_size=batch_size,
        options=options,
        format=format,
        instruction_field=instruction_field,
        input_field=input_field,
        output_field=output_field,
        limit=limit,
        seed=seed,
        strict=strict,
        data_dir=data_dir,
        cache=cache,
        overwrite=overwrite,
    )
    dropped = ", ".join(f"{n} {k}" for k, n in r.filtered.items() if n) or "none"
    rate = (
        f"{(r.selected - r.resumed) / r.seconds:.2f} records/s, {r.output_tokens / r.seconds:.1f} tokens/s"
        if r.seconds
        else "-"
    )
    out.print(
        f"{r.written} of {r.selected} records written to {r.out} (filtered: {dropped}; lost: {r.lost}); "
        f"{r.resumed} resumed, {r.teacher_calls} teacher calls, {r.cache_hits} cache hits; {rate}"
    )
    out.print(f"manifest: {r.manifest}")


@app.command("check-contamination")
@friendly
def check_contamination(
    train: Annotated[Path, typer.Argument(help="Training data: distilled JSONL or any dataset fslm distill reads.")],
    data_dir: Annotated[Path, typer.Option(help="Benchmark data directory (test splits, see docs/distill.md).")],
    strict: Annotated[bool, typer.Option(help="Exit 2 when any training instruction is in a test split.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Count training instructions that appear (normalised) in a benchmark test split."""
    from fslm.contamination import BenchmarkIndex
    from fslm.data import read_dataset

    dataset = read_dataset(train)
    report = BenchmarkIndex.load(data_dir).check((r.id, r.instruction, r.input) for r in dataset.records)
    if as_json:
        sys.stdout.write(json.dumps({"train": str(train), **report.to_dict()}) + "\n")
    else:
        table = Table("test split", "items", "training instructions found in it")
        for split, n in report.per_split.items():
            table.add_row(split, str(report.split_sizes[split]), str(n))
        out.print(table)
        if report.missing:
            err.print(f"[yellow]not found under {data_dir}:[/] {', '.join(report.missing)}")
        out.print(report.summary())
    if strict and report.total:
        raise FslmError(f"{train}: {report.summary()}")


@app.command()
@friendly
def serve(
    directory: StackDir,
    host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="FSLM_API_KEY", help="Require Authorization: Bearer KEY (env FSLM_API_KEY).")
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests in flight before answering 503.")] = 64,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests generated together at one stage.")] = 32,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 4096,
    max_body: Annotated[int, typer.Option(min=1, help="Largest request body in bytes (413 beyond).")] = 1 << 20,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a request may take, queueing included.")] = 300.0,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="Allow browser calls from this origin (repeat).")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Backend: torch, llamacpp or openai (default: llamacpp when the GGUF export is current and the "
            "manifest says torch, else the manifest's base.backend)."
        ),
    ] = None,
) -> None:
    """Serve the stack: OpenAI-compatible API (/v1/chat/completions), per-stage streaming, and a web page at /."""
    from fslm.config import load_config
    from fslm.serve import ServeOptions
    from fslm.serve import serve as run_server
    from fslm.stack import Stack

    config = load_config(directory)  # validate before the (slow) model load
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")
    if backend is None and config.base.backend == "torch":  # the fast path whenever the export is current
        from fslm.backends.llamacpp import export_problem

        problem = export_problem(directory, config)
        if problem is None:
            backend = "llamacpp"
        elif problem != "no GGUF export":
            err.print(f"[yellow]warning:[/] not serving the GGUF export ({problem}); re-run fslm export to use it")
    with err.status(f"loading {config.base.model}"):
        stack = Stack.load(directory, backend=backend)
    err.print(f"backend: {stack.backend.name}")
    options = ServeOptions(
        api_key=api_key or None,
        max_body=max_body,
        max_queue=max_queue,
        max_batch=max_batch,
        max_tokens=max_tokens,
        timeout=timeout,
        cors_origins=tuple(cors_origin or ()),
    )
    err.print(f"serving [bold]{config.name}[/] on http://{host}:{port}/ (OpenAI base_url http://{host}:{port}/v1)")
    run_server(stack, host=host, port=port, options=options)


@app.command()
@friendly
def export(
    directory: StackDir,
    format: Annotated[str, typer.Option("--format", help="Export format (only gguf: llama.cpp).")] = "gguf",
    quant: Annotated[
        str | None,
        typer.Option(help="Base weights: q8_0, q4_1, f16 or f32 (default: reuse a GGUF base as is, else f16)."),
    ] = None,
) -> None:
    """Write DIR/gguf/: the base model and one GGUF LoRA adapter per stage, for `fslm run --backend llamacpp`."""
    from fslm.export import export_gguf

    if format != "gguf":
        raise FslmError(f"--format {format!r}: only gguf is supported")
    with err.status("exporting") as status:
        manifest = export_gguf(directory, quant, on_step=lambda msg: status.update(f"exporting {msg}"))
    out.print(
        f"Exported to {directory / 'gguf'}: base ({manifest['base']['quant']}) + "
        f"{len(manifest['adapters'])} adapter(s) ({', '.join(manifest['adapters']) or 'none'})"
    )


@app.command("eval")
@friendly
def eval_cmd(
    directory: StackDir,
    data_dir: Annotated[Path, typer.Option(help="Benchmark data directory (layout: docs/eval.md).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (results.json, report.md, PNG).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: arc_easy, arc_challenge, mmlu, hellaswag, ...")] = (
        "arc_easy,arc_challenge,mmlu"
    ),
    systems: Annotated[str, typer.Option(help="Comma-separated: base, single, stack.")] = "base,single,stack",
    limit: Annotated[int | None, typer.Option(min=1, help="Items per task (a seeded random subset).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the subset and of lm-eval.")] = 1234,
    ablate: Annotated[bool, typer.Option(help="Add one stack row per stage, that stage on the bare base.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Pinned scoring batch size.")] = 8,
    stage_tokens: Annotated[
        int | None, typer.Option(min=1, help="Cap new tokens of stages 1..N-1 (default: the manifest's).")
    ] = None,
) -> None:
    """Score base model vs single adapter vs stack on offline benchmarks (lm-evaluation-harness)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fslm.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        tasks=[t.strip() for t in tasks.split(",") if t.strip()],
        data_dir=data_dir,
        systems=[s.strip() for s in systems.split(",") if s.strip()],
        limit=limit,
        seed=seed,
        ablate=ablate,
        batch_size=batch_size,
        stage_tokens=stage_tokens,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False) as bar:
        ids: dict[str, Any] = {}

        def progress(system: str, what: str, done: int, total: int) -> None:
            label = f"{system}: {what}"
            if label not in ids:
                ids[label] = bar.add_task(label, total=total)
            bar.update(ids[label], completed=done, total=total)

        results = evaluate(directory, out_dir, options, progress=progress)
    table = Table("system", *options.tasks, "s/query")
    for name, s in results["systems"].items():
        cells = [f"{s['tasks'][t]['accuracy']:.3f} ± {s['tasks'][t]['stderr'] or 0:.3f}" for t in options.tasks]
        table.add_row(name, *cells, f"{s['seconds_per_query']:.3f}")
    out.print(table)
    for w in results["contamination_warnings"]:
        err.print(f"[yellow]warning:[/] {w}")
    out.print(f"report: {out_dir / 'report.md'}")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
@friendly
def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own CLI with fslm's model (`--model fslm`) and offline tasks (fslm_*) registered."""
    import fslm.lm_eval_model  # noqa: F401  registers --model fslm
    from fslm.evaluate import TASKS_DIR

    argv = list(ctx.args)
    if argv and argv[0] not in ("run", "ls", "validate", "-h", "--help"):
        argv = ["run", *argv]  # lm-eval's legacy form (bare options) means `run`; be explicit
    if argv[:1] and argv[0] != "-h" and argv[0] != "--help" and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]  # fslm's offline tasks (fslm_arc_easy, ...)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


@app.command()
@friendly
def quickstart(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the stack, data and report.")] = Path(
        "fslm-quickstart"
    ),
) -> None:
    """The whole pipeline on the embedded model, offline, in minutes: init, distill, train, run, eval."""
    import fslm.cli as commands
    from fslm.quickstart import Budget
    from fslm.quickstart import quickstart as run_quickstart

    paths = run_quickstart(out_dir, Budget(), say=lambda text: err.print(text), commands=commands)
    out.print("\n[bold]Written:[/]")
    for what, path in paths.items():
        out.print(f"  {what:<10} {path}")
    stack_dir, report = paths["stack"], paths["report"]
    out.print(
        "\n[bold]Next:[/]\n"
        f"  fslm info {stack_dir}                      # stages, adapters, training losses\n"
        f'  fslm run {stack_dir} "Explain photosynthesis in two sentences." --prompts\n'
        f"  fslm serve {stack_dir}                     # chat UI at http://127.0.0.1:8000\n"
        f"  open {report}/report.md                  # the accuracy table"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
