"""The `fslm` command line: small commands that compose, one clear line and exit code 2 on bad input.

Every command builds a step's options object from its flags (defaults and help text come from that class, written
once), calls the library step, and prints the result. Progress arrives as events (`fslm.events`) and is drawn here;
no other module of fslm draws on the terminal.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.logging import RichHandler
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text
from typer.core import TyperGroup

from fslm import heap, models
from fslm.config import ServerSettings, load_config
from fslm.contamination import BenchmarkIndex
from fslm.data import read_dataset
from fslm.errors import FslmError
from fslm.events import Progress as ProgressEvent
from fslm.options import comma_list
from fslm.stack import Stack, StageResult, Trace
from fslm.stackdir import StackDir as Layout
from fslm.steps.distill import DistillOptions, DistillResult
from fslm.steps.distill import distill as distill_step
from fslm.steps.evaluate import EvalOptions, evaluate
from fslm.steps.evaluate.harness import DATA_DIR_ENV, TASKS_DIR, check_lm_eval_args, only_fslm_tasks
from fslm.steps.evaluate.stats import METRICS, compare_runs, format_p
from fslm.steps.export import ExportOptions
from fslm.steps.export import export as export_step
from fslm.steps.init import InitOptions
from fslm.steps.init import init as init_step
from fslm.steps.quickstart import QuickstartOptions
from fslm.steps.quickstart import quickstart as quickstart_step
from fslm.steps.serve import serve as serve_step
from fslm.steps.train import TrainOptions
from fslm.steps.train import train as train_step
from fslm.teachers import TeacherSpec
from fslm.trust import Trust, grant
from fslm.web.options import ServeOptions, default_allowed_hosts

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


def print_table(table: Table) -> None:
    """A result table on stdout. Not on a terminal (a log, a pipe), rich assumes 80 columns and crops every cell to
    fit; there the table is printed at its natural width instead, so each row says in full what it is about."""
    if out.is_terminal:
        out.print(table)
        return
    natural = out.measure(table, options=out.options.update_width(1_000)).maximum
    Console(width=max(out.width, natural), highlight=False).print(table)


def _say_error(e: FslmError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)


def friendly(fn: F) -> F:
    """Turn FslmError into one red line and exit code 2; never a traceback for input the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            # A context of its own: the trust a command grants (its flags) ends with the command.
            return contextvars.copy_context().run(fn, *args, **kwargs)
        except FslmError as e:
            _say_error(e)
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


def flag(model: type[BaseModel], field: str, *decls: str, **kwargs: Any) -> Any:
    """A typer option whose default and help text are the options class's own (comma lists shown as text)."""
    info = model.model_fields[field]
    default = info.get_default(call_default_factory=True)
    if default is PydanticUndefined:
        default = ...
    elif isinstance(default, (list, tuple)):
        default = ",".join(map(str, default)) if default else None  # empty: a repeatable option, given or not
    return typer.Option(default, *decls, help=info.description, **kwargs)


class EventView:
    """Rich progress bars drawn from step events: one bar per (step, task); quickstart's steps as headlines."""

    def __init__(self) -> None:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=err, transient=False)
        self.tasks: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> EventView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        if event.step == "quickstart":
            times = ", ".join(f"{v} {k}" for k, v in event.info.items())
            if event.task == "done":
                err.print(f"[bold green]done[/] in {event.info.get('elapsed', '?')}")
            else:
                err.print(f"[bold cyan]step {event.done}/{event.total}[/] {event.task}  [dim]({times})[/]")
            return
        key = (event.step, event.task)
        info = " · ".join(event.info.values())
        if key not in self.tasks:
            label = event.task if event.step in ("train", "eval") else f"{event.step}: {event.task}"
            self.tasks[key] = self.progress.add_task(label, total=event.total, info=info)
        self.progress.update(self.tasks[key], completed=event.done, total=event.total, info=info)


StackDir = Annotated[Path, typer.Argument(help="Stack directory (holds stack.yaml).")]
# The manifest is untrusted input (docs/formats.md, "Trust"): what it asks for beyond loading weights needs a flag.
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Let the model run Python code it ships (only if stack.yaml asks for it too)."
    ),
]
AllowServer = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-server",
        help="Allow base.server.url to be this URL (or origin) off this machine (repeat; also $FSLM_TRUSTED_SERVERS).",
    ),
]
ApiKeyEnv = Annotated[
    str | None,
    typer.Option(
        "--api-key-env",
        help="Read the stage server's API key from this variable, whatever stack.yaml's api_key_env says.",
    ),
]


def _grant(remote_code: bool = False, servers: list[str] | None = None, api_key_env: str | None = None) -> None:
    """The user's consent for this command: its flags plus $FSLM_TRUSTED_SERVERS / $FSLM_TRUSTED_KEY_ENVS."""
    grant(Trust.from_user(remote_code, tuple(servers or ()), api_key_env))


@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the stack.")],
    recipe: str = flag(InitOptions, "recipe"),
    base: str = flag(InitOptions, "base"),
    force: bool = flag(InitOptions, "force"),
) -> None:
    """Create a stack directory: stack.yaml, adapters/, README.md."""
    config = init_step(directory, InitOptions.build(recipe=recipe, base=base, force=force)).config
    out.print(
        f"Created stack [bold]{config.name}[/] in {directory} "
        f"({len(config.stages)} stages: {' -> '.join(config.stage_names)}; base {config.base.model})"
    )
    out.print(f'Next: fslm run {directory} "Give three tips for staying healthy."')


@app.command()
@friendly
def info(directory: StackDir) -> None:
    """Show a stack's base model, stages, adapters and parameter counts."""
    layout = Layout(directory)
    config = layout.load()
    ref = models.resolve_base(config.base, directory)
    base_params = models.count_parameters(ref)
    out.print(f"[bold]{config.name}[/]  {config.description}".rstrip())
    out.print(
        f"base: {config.base.model} ({ref.kind}: {ref.location}), {models.architecture(ref)}, "
        f"{base_params / 1e6:.1f} M parameters, {config.base.dtype}"
    )
    table = Table("#", "stage", "reads", "adapter", "adapter params", "max new tokens", "val loss")
    total, problems = 0, []
    for i, s in enumerate(config.stages, 1):
        problem = layout.adapter_problem(s.name)
        weights = layout.weights(s.name)
        n = models.safetensors_parameters(weights) if layout.is_trained(s.name) and weights.is_file() else 0
        total += n
        problems += [problem] if problem else []
        val = s.training.val_loss if s.training and s.training.val_loss is not None else None
        table.add_row(
            str(i),
            s.name,
            ", ".join(s.reads) or "-",
            "broken (see below)" if problem else f"adapters/{s.name}" if n else "none (base)",
            f"{n / 1e6:.2f} M" if n else "-",
            str(s.generation.max_new_tokens),
            f"{val:.3f}" if val is not None else "-",
        )
    print_table(table)
    out.print(f"resident parameters: {(base_params + total) / 1e6:.1f} M (base + {len(config.stages)} stages)")
    for name, t in config.baselines.items():
        val = f", val loss {t.val_loss:.3f}" if t.val_loss is not None else ""
        out.print(f"baseline {name}: adapters/{name} ({t.examples or '?'} examples, {t.steps or '?'} steps{val})")
    for problem in problems:
        err.print(f"[yellow]warning:[/] {problem}", highlight=False, soft_wrap=True)


def utf8(text: str | None, what: str) -> str | None:
    """Text from the command line, refused in one line when it is not UTF-8: Python hands bytes that are not on to
    us as lone surrogates, which no tokenizer or terminal takes (the server answers 400 for the same text)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what_byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise FslmError(
            f"{what}: not UTF-8 text ({what_byte} at character {e.start + 1}); give the text in UTF-8"
        ) from None
    return text


def print_stage(r: StageResult, prompts: bool = False) -> None:
    """One finished stage as a panel (what `fslm run` shows). Prompts and outputs are plain Text, not rich markup:
    a user's "[/x]" or a model's "[bold]" is shown as written instead of failing or styling the panel."""
    used = f"adapter {r.adapter}" if r.adapter else "base model"
    title = f"[bold]{r.name}[/] · {used} · {r.output_tokens} tokens · {r.seconds:.1f}s"
    if prompts:
        out.print(Panel(Text(r.prompt), title=f"{r.name} prompt", border_style="dim"))
    out.print(Panel(Text(r.output) if r.output else "[dim](empty)[/]", title=title, title_align="left"))


def print_answer(trace: Trace) -> None:
    out.print(Panel(Text(trace.answer), title="[bold green]answer[/]", title_align="left", border_style="green"))


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
    system: Annotated[
        str, typer.Option(help="stack (every stage), or one direct answer: base, single or multitask.")
    ] = "stack",
    precision: Annotated[
        str, typer.Option(help="PyTorch compute: fp32, bf16, or auto (bf16 where the hardware runs it natively).")
    ] = "fp32",
    trust_remote_code: TrustRemoteCode = False,
    allow_server: AllowServer = None,
    api_key_env: ApiKeyEnv = None,
) -> None:
    """Answer an instruction through every stage and show the trace."""
    _grant(trust_remote_code, allow_server, api_key_env)
    instruction, input = utf8(instruction, "INSTRUCTION"), utf8(input, "--input")
    if not instruction.strip():
        raise FslmError("the instruction is empty")
    config = load_config(directory)  # validate before the (slow) model load
    names = config.stage_names if system == "stack" else [system]
    with err.status(f"loading {config.base.model}") as status:
        stack = Stack.load(directory, backend=backend)
        if precision != "fp32":
            stack.backend.set_precision(precision, "run")

        def on_stage(_: int, r: Any) -> None:
            if not as_json:
                print_stage(r, prompts)
            nxt = names.index(r.name) + 1
            if nxt < len(names):
                status.update(f"stage {nxt + 1}/{len(names)}: {names[nxt]}")

        status.update(f"stage 1/{len(names)}: {names[0]}")
        (trace,) = stack.answer([(instruction, input)], system, on_stage=on_stage, max_new_tokens=max_new_tokens)
    if as_json:
        sys.stdout.write(json.dumps(trace.to_dict(prompts=prompts), ensure_ascii=False) + "\n")
    else:
        print_answer(trace)


@app.command()
@friendly
def train(
    directory: StackDir,
    data: Path = typer.Option(..., "--data", help="Distilled JSONL (docs/formats.md), e.g. from fslm distill."),
    stages: str | None = flag(TrainOptions, "stages"),
    single: bool = flag(TrainOptions, "single", "--single"),
    multitask: bool = flag(TrainOptions, "multitask", "--multitask"),
    prompt: str | None = flag(TrainOptions, "prompt"),
    answer_inputs: str = flag(TrainOptions, "answer_inputs"),
    student_backend: str = flag(TrainOptions, "student_backend"),
    epochs: float = flag(TrainOptions, "epochs", min=0.01),
    max_steps: int | None = flag(TrainOptions, "max_steps", min=1),
    lr: float = flag(TrainOptions, "lr", min=0.0),
    batch_size: int = flag(TrainOptions, "batch_size", min=1),
    grad_accum: int = flag(TrainOptions, "grad_accum", min=1),
    scheduler: str = flag(TrainOptions, "scheduler"),
    warmup: float = flag(TrainOptions, "warmup", min=0.0),
    seed: int = flag(TrainOptions, "seed"),
    val_fraction: float = flag(TrainOptions, "val_fraction", min=0.0, max=0.5),
    save_steps: int = flag(TrainOptions, "save_steps", min=1),
    max_length: int | None = flag(TrainOptions, "max_length", min=8),
    resume: bool = flag(TrainOptions, "resume", "--resume"),
    fresh: bool = flag(TrainOptions, "fresh", "--fresh"),
    strict: bool = flag(TrainOptions, "strict", "--strict"),
    precision: str = flag(TrainOptions, "precision"),
    gradient_checkpointing: str = flag(TrainOptions, "gradient_checkpointing"),
    memory_budget: float = flag(TrainOptions, "memory_budget", min=0.1),
    keep_checkpoints: bool = flag(TrainOptions, "keep_checkpoints"),
    processes: Annotated[
        int, typer.Option(min=1, help="Data-parallel processes on this machine (via accelerate launch).")
    ] = 1,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train one LoRA adapter per stage (or --single: the one-adapter baseline) on distilled data.

    Runs under tcmalloc when it is installed (less memory; FSLM_ALLOCATOR=system keeps glibc's malloc).
    """
    _grant(trust_remote_code)
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(launch(strip_processes(sys.argv[2:]), processes))
    options = TrainOptions.pick(locals())
    main_process = os.environ.get("RANK", "0") == "0"
    with EventView() if main_process else _nothing() as view:
        result = train_step(directory, data, options, on_event=view)
    if not main_process:
        return
    # the adapter's name is what tells the rows apart: never cropped, even in a narrow terminal
    adapter = Column("adapter", no_wrap=True, min_width=max((len(f"adapters/{n}") for n in result.adapters), default=0))
    table = Table(adapter, "examples", "val", "epochs", "steps", "train loss", "val loss", "tok/s", "seconds")
    for name, r in result.adapters.items():
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
    print_table(table)
    if not result.adapters:
        out.print("nothing left to train (every adapter of this run was already written)")
    elif single or multitask:
        name = "single" if single else "multitask"
        out.print(f"Wrote {directory}/adapters/{name} (the {name} baseline; fslm run {directory} ... --system {name})")
    else:
        out.print(f'Next: fslm run {directory} "Give three tips for staying healthy."')


class _nothing:
    """A context that draws nothing (ranks other than the first of a data-parallel run stay quiet)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


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
    out_args: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out_args.append(a)
    return out_args


@app.command()
@friendly
def distill(
    dataset: Annotated[Path, typer.Argument(help="Dataset: Alpaca JSON/JSONL, CSV, Parquet, Self-Instruct or GSM8K.")],
    stack: Annotated[
        Path, typer.Option(help="Stack directory: its stages' roles and templates are the teacher's tasks.")
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Output JSONL (a <out>.manifest.json is written beside it).")],
    teacher_model: str | None = flag(TeacherSpec, "model", "--teacher-model"),
    teacher_backend: str | None = flag(TeacherSpec, "backend", "--teacher-backend"),
    teacher_url: str | None = typer.Option(None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1."),
    api_key_env: str = flag(ServerSettings, "api_key_env"),
    concurrency: int = flag(ServerSettings, "concurrency", min=1, max=256),
    timeout: float = flag(ServerSettings, "timeout", min=0.1),
    max_retries: int = flag(ServerSettings, "max_retries", min=0, max=50),
    batch_size: int = flag(TeacherSpec, "batch_size", min=1),
    teacher_mode: str = flag(DistillOptions, "teacher_mode"),
    options: str = flag(DistillOptions, "options"),
    reference: str = flag(DistillOptions, "reference"),
    final_from: str = flag(DistillOptions, "final_from"),
    samples: int = flag(DistillOptions, "samples", min=1, max=16),
    sample_temperature: float = flag(DistillOptions, "sample_temperature"),
    sample_top_p: float = flag(DistillOptions, "sample_top_p"),
    word_limits: bool = flag(DistillOptions, "word_limits"),
    max_new_tokens: int | None = flag(DistillOptions, "max_new_tokens", min=1),
    filters: str = flag(DistillOptions, "filters"),
    overlong_factor: float = flag(DistillOptions, "overlong_factor", min=0.0),
    trim_cut: bool = flag(DistillOptions, "trim_cut"),
    fit_overlong: bool = flag(DistillOptions, "fit_overlong"),
    format: str = flag(DistillOptions, "format"),
    instruction_field: str | None = flag(DistillOptions, "instruction_field"),
    input_field: str | None = flag(DistillOptions, "input_field"),
    output_field: str | None = flag(DistillOptions, "output_field"),
    limit: int | None = flag(DistillOptions, "limit", min=1),
    seed: int = flag(DistillOptions, "seed"),
    strict: bool = flag(DistillOptions, "strict"),
    data_dir: Path | None = flag(DistillOptions, "data_dir", envvar=DATA_DIR_ENV),
    cache: Path | None = flag(DistillOptions, "cache"),
    overwrite: bool = flag(DistillOptions, "overwrite"),
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Teacher-written training targets for every stage of a stack (resumable: rerun the same command)."""
    _grant(trust_remote_code)
    server = None
    if teacher_url:
        server = ServerSettings(
            url=teacher_url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout, max_retries=max_retries
        )
    teacher = TeacherSpec.build(backend=teacher_backend, model=teacher_model, server=server, batch_size=batch_size)
    chosen = DistillOptions.pick({**locals(), "teacher": teacher})
    with EventView() as view:
        r = distill_step(dataset, stack, out_path, chosen, on_event=view)
    print_distill_result(r)
    why = r.nothing_kept(chosen)
    if why:  # a run that keeps nothing is no success: say why and what to try, exit 2
        raise FslmError(why)


@app.command("check-contamination")
@friendly
def check_contamination(
    train: Annotated[Path, typer.Argument(help="Training data: distilled JSONL or any dataset fslm distill reads.")],
    data_dir: Annotated[
        Path, typer.Option(help="Benchmark data directory (test splits, see docs/distill.md).", envvar=DATA_DIR_ENV)
    ],
    strict: Annotated[bool, typer.Option(help="Exit 2 when any training instruction is in a test split.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Count training instructions that appear (normalised) in a benchmark test split."""
    dataset = read_dataset(train)
    report = BenchmarkIndex.load(data_dir).check((r.id, r.instruction, r.input) for r in dataset.records)
    if as_json:
        sys.stdout.write(json.dumps({"train": str(train), **report.to_dict()}) + "\n")
    else:
        table = Table("test split", "items", "training instructions found in it")
        for split, n in report.per_split.items():
            table.add_row(split, str(report.split_sizes[split]), str(n))
        print_table(table)
        if report.missing:
            err.print(f"[yellow]not found under {data_dir}:[/] {', '.join(report.missing)}")
        out.print(report.summary())
    if strict and report.total:
        raise FslmError(f"{train}: {report.summary()}")


@app.command()
@friendly
def serve(
    directory: StackDir,
    host: str = flag(ServeOptions, "host"),
    port: int = flag(ServeOptions, "port", min=0, max=65535),
    api_key: str | None = flag(ServeOptions, "api_key", envvar="FSLM_API_KEY"),
    max_queue: int = flag(ServeOptions, "max_queue", min=1),
    max_batch: int = flag(ServeOptions, "max_batch", min=1),
    max_tokens: int = flag(ServeOptions, "max_tokens", min=1),
    max_body: int = flag(ServeOptions, "max_body", min=1),
    timeout: float = flag(ServeOptions, "timeout", min=0.1),
    cors_origin: list[str] | None = flag(ServeOptions, "cors_origins", "--cors-origin"),
    backend: str | None = flag(ServeOptions, "backend"),
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Accept requests whose Host header names this host (repeat; default: 127.0.0.1, localhost, ::1 "
            "and --host; * accepts any). Guards against DNS rebinding."
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_server: AllowServer = None,
    api_key_env: ApiKeyEnv = None,
) -> None:
    """Serve the stack: OpenAI-compatible API (/v1/chat/completions), per-stage streaming, and a web page at /."""
    _grant(trust_remote_code, allow_server, api_key_env)
    config = load_config(directory)  # validate before the (slow) model load
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")
    if host in ("0.0.0.0", "::", "") and not allowed_host:
        err.print(
            "[yellow]note:[/] requests must name this machine as 127.0.0.1/localhost; add --allowed-host NAME for "
            "each host name clients use to reach it (Host header check, against DNS rebinding)"
        )
    given = {
        "api_key": api_key or None,
        "cors_origins": tuple(cors_origin or ()),
        "allowed_hosts": (*default_allowed_hosts(host), *(allowed_host or ())),
    }
    options = ServeOptions.pick({**locals(), **given})
    with err.status(f"loading {config.base.model}") as status:

        def serving(event: ProgressEvent) -> None:
            status.stop()
            url = event.info["url"]
            err.print(f"backend: {event.info['backend']}")
            err.print(f"serving [bold]{config.name}[/] on {url} (OpenAI base_url {url}v1)")

        serve_step(directory, options, on_event=serving)


@app.command()
@friendly
def export(
    directory: StackDir,
    format: str = flag(ExportOptions, "format", "--format"),
    quant: str | None = flag(ExportOptions, "quant"),
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Write DIR/gguf/: the base model and one GGUF LoRA adapter per stage and baseline, for `--backend llamacpp`."""
    _grant(trust_remote_code)
    with err.status("exporting") as status:
        result = export_step(
            directory,
            ExportOptions.build(format=format, quant=quant),
            on_event=lambda e: status.update(f"exporting {e.task}"),
        )
    manifest = result.manifest
    out.print(
        f"Exported to {result.directory}: base ({manifest['base']['quant']}) + "
        f"{len(manifest['adapters'])} adapter(s) ({', '.join(manifest['adapters']) or 'none'})"
    )


def print_distill_result(r: DistillResult) -> None:
    """What a distill run wrote, what its checks found, and where its manifest is."""
    dropped = ", ".join(f"{n} {k}" for k, n in r.filtered.items() if n) or "none"
    rate = (
        f"{(r.selected - r.resumed) / r.seconds:.2f} records/s, {r.output_tokens / r.seconds:.1f} tokens/s"
        if r.seconds
        else "-"
    )
    out.print(
        f"{r.written_records} of {r.selected} records written to {r.out} ({r.written} chains; rejected: {dropped}; "
        f"lost: {r.lost}); {r.resumed} resumed, {r.teacher_calls} teacher calls, {r.cache_hits} cache hits; {rate}"
    )
    c = r.checks
    if c.get("checked_records"):
        out.print(
            f"teacher answers checked: {c['teacher_blind_correct']} of {c['checked_records']} right blind "
            f"({c['teacher_blind_accuracy']:.0%}); {c['correct_after_hint']} of {c['retried_with_hint']} right after a hint"
        )
    if c.get("leak_rate_all_intermediate") is not None:
        rates = ", ".join(f"{k} {v['rate']:.0%}" for k, v in c["leaks"].items())
        out.print(f"earlier-stage targets that contain the reference: {c['leak_rate_all_intermediate']:.1%} ({rates})")
    pointing = c.get("option_references") or {}
    if pointing.get("chains"):
        out.print(
            f"chains whose earlier stages point at the options: {pointing['chains']} of {pointing['of']} "
            f"({pointing['in_written_rows']} of them written)"
        )
    out.print(f"manifest: {r.manifest}")


def print_eval_table(results: dict[str, Any]) -> None:
    tasks = results["tasks"]
    table = Table("system", *tasks, "s/query")
    for name, s in results["systems"].items():
        cells = [f"{s['tasks'][t]['accuracy']:.3f} ± {s['tasks'][t]['stderr'] or 0:.3f}" for t in tasks]
        table.add_row(name, *cells, f"{s['seconds_per_query']:.3f}")
    print_table(table)
    acc_pairs = [r for r in results.get("paired", []) if r["metric"] == "acc"]
    if acc_pairs:
        print_paired(acc_pairs, "paired differences (acc, same items)")
    for w in results["contamination_warnings"]:
        err.print(f"[yellow]warning:[/] {w}")


def print_paired(rows: list[dict[str, Any]], title: str) -> None:

    table = Table("task", "metric", "A", "B", "n", "A − B (95% CI)", "A only / B only", "McNemar p", title=title)
    for r in rows:
        diff = f"{100 * r['diff']:+.1f} pts ({100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f})"
        table.add_row(
            r["task"],
            r["metric"],
            r["a"],
            r["b"],
            str(r["n"]),
            diff,
            f"{r['a_only']} / {r['b_only']}",
            format_p(r["p_value"]),
        )
    print_table(table)


class EvalGroup(TyperGroup):
    """`fslm eval DIR ...` runs an evaluation (the `run` subcommand, implied); `fslm eval compare A B` compares runs."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=EvalGroup,
    no_args_is_help=True,
    help="Score base model vs baselines vs stack on offline benchmarks (`fslm eval DIR ...` = `fslm eval run DIR ...`); "
    "compare two runs item by item (`fslm eval compare A B`).",
)
app.add_typer(eval_app, name="eval")


@eval_app.command("run")
@friendly
def eval_cmd(
    directory: StackDir,
    data_dir: Path = flag(EvalOptions, "data_dir", envvar=DATA_DIR_ENV),
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (results.json, report.md, PNG).")] = ...,  # type: ignore[assignment]
    tasks: str = flag(EvalOptions, "tasks"),
    systems: str = flag(EvalOptions, "systems"),
    limit: int | None = flag(EvalOptions, "limit", min=1),
    split: str = flag(EvalOptions, "split"),
    seed: int = flag(EvalOptions, "seed"),
    ablate: bool = flag(EvalOptions, "ablate"),
    batch_size: int = flag(EvalOptions, "batch_size", min=1),
    stage_tokens: int | None = flag(EvalOptions, "stage_tokens", min=1),
    trust_remote_code: TrustRemoteCode = False,
    stage_backend: str = flag(EvalOptions, "stage_backend"),
    stage_batch: int | None = flag(EvalOptions, "stage_batch", min=1),
    stage_check: int = flag(EvalOptions, "stage_check", min=0),
    stack_scoring: str = flag(EvalOptions, "stack_scoring"),
    chains: int = flag(EvalOptions, "chains", min=1),
    chain_temperature: float = flag(EvalOptions, "chain_temperature", min=0.0),
    ensemble_weight: float | None = flag(EvalOptions, "ensemble_weight", min=0.0, max=1.0),
    gate_threshold: float | None = flag(EvalOptions, "gate_threshold", min=0.0, max=1.0),
    gate_max_chain_rate: float | None = flag(EvalOptions, "gate_max_chain_rate", min=0.0, max=1.0),
    tune_limit: int = flag(EvalOptions, "tune_limit", min=1),
    generative: bool = flag(EvalOptions, "generative"),
    gen_tokens: int | None = flag(EvalOptions, "gen_tokens", min=1),
    bootstrap: int = flag(EvalOptions, "bootstrap", min=100),
    precision: str = flag(EvalOptions, "precision"),
    backend: str | None = flag(EvalOptions, "backend"),
    chains_from: Path | None = flag(EvalOptions, "chains_from"),
) -> None:
    """Score base model vs single adapter vs stack on offline benchmarks (lm-evaluation-harness)."""
    _grant(trust_remote_code)
    options = EvalOptions.pick(locals())
    with EventView() as view:
        result = evaluate(directory, out_dir, options, on_event=view)
    print_eval_table(result.results)
    out.print(f"report: {result.report}")


@eval_app.command("compare")
@friendly
def eval_compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="An `fslm eval --out` directory (or its results.json).")],
    run_b: Annotated[Path, typer.Argument(help="Another one, scored on overlapping items.")],
    systems_a: Annotated[
        str | None, typer.Option(help="Systems of run A to compare (default: the names both runs have).")
    ] = None,
    systems_b: Annotated[str | None, typer.Option(help="Systems of run B to compare.")] = None,
    metric: Annotated[str, typer.Option(help="Comma list of metrics: acc, acc_norm, gen.")] = "acc,acc_norm,gen",
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples.", min=100)] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 1234,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Paired comparison of two eval runs on the items both scored (matched by item id)."""
    metrics = comma_list(metric)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise FslmError(f"--metric: unknown {', '.join(unknown) or '(none)'} (known: {', '.join(METRICS)})")
    report = compare_runs(
        run_a,
        run_b,
        comma_list(systems_a) if systems_a else None,
        comma_list(systems_b) if systems_b else None,
        metrics,
        bootstrap,
        seed,
    )
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    print_paired(report["rows"], f"A = {run_a}, B = {run_b}")
    dropped = {t: n for t, n in report["unmatched_items"].items() if n}
    if dropped:
        err.print(
            "[yellow]items scored in only one run (left out):[/] " + ", ".join(f"{t} {n}" for t, n in dropped.items())
        )


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
@friendly
def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own CLI with fslm's model (`--model fslm`) and offline tasks (fslm_*) registered."""
    import fslm.steps.evaluate.lm_eval_model  # noqa: F401  registers --model fslm (imports lm-eval: only here)

    argv = list(ctx.args)
    if argv and argv[0] not in ("run", "ls", "validate", "-h", "--help"):
        argv = ["run", *argv]  # lm-eval's legacy form (bare options) means `run`; be explicit
    if argv[:1] and argv[0] != "-h" and argv[0] != "--help" and "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]  # fslm's offline tasks (fslm_arc_easy, ...)
    if argv[:1] == ["run"]:
        check_lm_eval_args(argv)  # before lm-eval loads a model
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        with only_fslm_tasks(argv):
            cli_evaluate()
    except ValueError as e:  # lm-eval's own "Tasks not found: x" is input the user can fix: one line, not a traceback
        if not str(e).startswith("Tasks not found"):
            raise
        raise FslmError(f"--tasks: {e} (lm-eval's tasks: fslm lm-eval ls tasks)") from None


@app.command()
@friendly
def quickstart(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the stack, data and report.")] = Path(
        "fslm-quickstart"
    ),
    records: int = flag(QuickstartOptions, "records", min=1),
    teacher_tokens: int = flag(QuickstartOptions, "teacher_tokens", min=1),
    train_steps: int = flag(QuickstartOptions, "train_steps", min=1),
    batch_size: int = flag(QuickstartOptions, "batch_size", min=1),
    eval_items: int = flag(QuickstartOptions, "eval_items", min=1),
    stage_tokens: int = flag(QuickstartOptions, "stage_tokens", min=1),
    base: str = flag(QuickstartOptions, "base"),
    teacher_backend: str = flag(QuickstartOptions, "teacher_backend"),
    filters: str = flag(QuickstartOptions, "filters"),
) -> None:
    """The whole pipeline on the embedded model, offline: init, distill, train, run, eval (6-7 min on 2 CPU cores)."""
    # The figure is the README's, measured there; tests/test_new_user.py keeps the two equal.
    options = QuickstartOptions.pick(locals())
    with EventView() as view:
        result = quickstart_step(out_dir, options, on_event=view)
    out.print(f"\n[bold]{result.trace.instruction}[/]")
    for stage in result.trace.stages:
        print_stage(stage)
    print_answer(result.trace)
    print_eval_table(result.evaluation.results)
    out.print("\n[bold]Written:[/]")
    for what, path in result.paths.items():
        out.print(f"  {what:<10} {path}")
    out.print(
        "\n[bold]Next:[/]\n"
        f"  fslm info {result.stack}                      # stages, adapters, training losses\n"
        f'  fslm run {result.stack} "Explain photosynthesis in two sentences." --prompts\n'
        f"  fslm serve {result.stack}                     # chat UI at http://127.0.0.1:8000\n"
        f"  open {result.report}/report.md                  # the accuracy table\n"
        "\nThese sizes show the pipeline, not a useful model. A useful stack learns from a stronger teacher's data:\n"
        "docs/experiments.md, section 2, distils it from a 1.5B model, and the fslm repository's data/exp2-mc/ holds\n"
        "what that run has distilled so far, gold-checked, so training needs no teacher:\n"
        "  fslm init my-stack && fslm train my-stack --data data/exp2-mc/distilled-arc_easy_train.jsonl"
    )


def main() -> None:
    try:
        heap.preload_allocator(sys.argv[1:])  # training commands restart under tcmalloc when it is installed
    except FslmError as e:
        _say_error(e)
        raise SystemExit(e.exit_code) from None
    app()


if __name__ == "__main__":
    main()
