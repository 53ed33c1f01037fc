"""The stack manifest (`stack.yaml`) as pydantic models, with errors that name the file, line and field."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from fslm.errors import FslmError
from fslm.files import atomic_write_text
from fslm.prompts import template_variables
from fslm.trust import DEFAULT_API_KEY_ENV, TRUST_FIELDS

MANIFEST = "stack.yaml"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Fields of `base` whose line later errors name besides the trust fields (a base model that does not resolve, a
# server without the models it needs are found only when a backend loads).
ORIGIN_FIELDS = ("model", "backend", "server")
# Variables every stage template may use, besides the outputs of the stages it reads.
BUILTIN_VARIABLES = ("instruction", "input")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSettings(_Strict):
    """How a stage decodes. temperature 0 means greedy (reproducible)."""

    max_new_tokens: int = Field(128, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=3.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None  # sampling seed (temperature > 0): the same seed draws the same text

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class ServerSettings(_Strict):
    """An OpenAI-compatible server that serves the stages (backend: openai), e.g. vLLM with --enable-lora."""

    url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1.")
    api_key_env: str = Field(
        DEFAULT_API_KEY_ENV, description="Environment variable holding the server's API key (never the key itself)."
    )
    base_model: str | None = None  # served model name for stages without an adapter
    models: dict[str, str] = Field(default_factory=dict)  # stage name -> served model (LoRA) name
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight.")
    timeout: float = Field(120.0, gt=0, description="Seconds per request before it is retried.")
    max_retries: int = Field(5, ge=0, le=50, description="Retries with exponential backoff.")


class _Origins(dict[str, str]):
    """Field -> "file:line" it was read from: metadata for messages, so never part of a config's equality (pydantic
    compares private attributes; two configs with the same fields are equal wherever they were read from)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Origins)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]


class BaseModelSettings(_Strict):
    """Which base model every stage shares, and how to load it."""

    model: str = "smollm2-135m-instruct"
    # Where stages run: torch (transformers + PEFT), llamacpp (after `fslm export`), openai (a remote server).
    backend: Literal["torch", "llamacpp", "openai"] = "torch"
    server: ServerSettings | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # auto: the tokenizer's chat template when it has one, else a plain text format.
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    # Where each trust-sensitive field (and ORIGIN_FIELDS) was read from ("stack.yaml:7"), for messages; empty when
    # built in code.
    _origin: _Origins = PrivateAttr(default_factory=_Origins)


class LoraSettings(_Strict):
    """LoRA hyper-parameters for every stage adapter; target modules are always written out."""

    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


class StageTraining(BaseModel):
    """What `fslm train` recorded about a stage's adapter (reproducibility)."""

    model_config = ConfigDict(extra="allow")

    data_file: str | None = None
    data_sha256: str | None = None
    examples: int | None = None
    epochs: float | None = None
    steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    seconds: float | None = None
    prompt: str | None = None  # the prompt form the adapter was trained on (PROMPT_FORMS; None: full)
    versions: dict[str, str] = Field(default_factory=dict)


class StageConfig(_Strict):
    """One step of the stack: a role, a prompt template, the earlier stages it reads, and decoding settings."""

    name: str
    role: str = Field(min_length=1, description="What this stage does; used as the system message.")
    template: str = Field(min_length=1, description="Jinja2 template of the user message.")
    reads: list[str] = Field(default_factory=list)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    brief: str | None = Field(
        None, description="What the stage writes, in a line: its section's description for the joint teacher."
    )
    training: StageTraining | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid stage name (lower-case letters, digits, _; starts with a letter)")
        if v in BUILTIN_VARIABLES:
            raise ValueError(f"{v!r} is reserved for the template variable of the same name")
        return v


class StackConfig(_Strict):
    """The whole manifest."""

    format_version: int = FORMAT_VERSION
    name: str = "stack"
    description: str = ""
    recipe: str | None = None
    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    lora: LoraSettings
    prompt: Literal["full", "compact"] = Field(
        "full",
        description="The prompt form `fslm train` trains new adapters on: full (each stage's role and template) or "
        "compact (the stage's name, the instruction and the earlier stages' text). Each adapter records its own.",
    )
    stages: list[StageConfig] = Field(min_length=1)
    # Training records of the baseline adapters beside the stages (adapters/single/, adapters/multitask/).
    baselines: dict[str, StageTraining] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """Manifests written before `baselines:` kept the single baseline's record in metadata.single_training."""
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict) and "single_training" in data["metadata"]:
            data = dict(data)
            metadata = dict(data["metadata"])
            baselines = dict(data.get("baselines") or {})
            baselines.setdefault("single", metadata.pop("single_training"))
            data.update(metadata=metadata, baselines=baselines)
        return data

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(f"format_version {v} is newer than this fslm understands ({FORMAT_VERSION}); upgrade fslm")
        return v

    @model_validator(mode="after")
    def _check_stage_graph(self) -> StackConfig:
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: duplicate stage name {stage.name!r}")
            for r in stage.reads:
                if r not in seen:
                    why = "is not an earlier stage" if r not in [s.name for s in self.stages] else "comes later"
                    raise ValueError(f"stages[{i}].reads: {r!r} {why} (earlier stages: {', '.join(seen) or 'none'})")
            known = set(BUILTIN_VARIABLES) | set(stage.reads)
            try:
                used = template_variables(stage.template)
            except SyntaxError as e:  # a broken template: prompts.template_variables names the line
                raise ValueError(f"stages[{i}].template: {e}") from None
            unknown = sorted(used - known)
            if unknown:
                raise ValueError(
                    f"stages[{i}].template: unknown variable {', '.join(map(repr, unknown))} "
                    f"(known: {', '.join(sorted(known))}; add a stage to `reads` to use its output)"
                )
            seen.append(stage.name)
        return self

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise FslmError(f"no stage named {name!r} (stages: {', '.join(self.stage_names)})")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def final_stage(self) -> StageConfig:
        return self.stages[-1]


# --- reading and writing -------------------------------------------------------------------------


def _yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic error location through the composed YAML tree to a 1-based line number."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
            if nxt is None:  # missing field: point at the mapping that should hold it
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _key_line(node: yaml.Node | None, loc: tuple[str, ...]) -> int | None:
    """The 1-based line of the key a path of mapping keys ends at (`server:`, not the first line of its block)."""
    line = None
    for key in loc:
        pair = next((p for p in node.value if p[0].value == key), None) if isinstance(node, yaml.MappingNode) else None
        if pair is None:
            break
        line, node = pair[0].start_mark.line + 1, pair[1]
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(text: str, source: str = MANIFEST) -> StackConfig:
    """Parse and validate manifest text; raise FslmError naming `source`, the line and the field."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        ctx = ""
        if e.context and e.context_mark:
            ctx = f" ({e.context} started at line {e.context_mark.line + 1})"
        raise FslmError(f"{where}: malformed YAML: {e.problem}{ctx}") from None
    except yaml.YAMLError as e:
        raise FslmError(f"{source}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise FslmError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        config = StackConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        # Graph errors raised by the model validator carry their own location in the message.
        m = re.match(r"stages\[(\d+)\]\.(\w+): (.*)", msg, re.S)
        if not loc and m:
            loc, msg = ("stages", int(m.group(1)), m.group(2)), m.group(3)
        line = _yaml_line(root, loc)
        where = f"{source}:{line}" if line else source
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise FslmError(f"{where}: {_format_loc(loc)}: {msg}{more}") from None
    for key in (*TRUST_FIELDS, *ORIGIN_FIELDS):
        loc = ("base", *key.split("."))
        line = _key_line(root, loc) if _has_path(data, loc) else None
        config.base._origin[key] = f"{source}:{line}" if line else source
    return config


def load_config(directory: str | Path) -> StackConfig:
    """Read DIR/stack.yaml."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise FslmError(f"{directory}: no such directory (create a stack with `fslm init {directory}`)")
    if not directory.is_dir():
        raise FslmError(f"{directory}: not a directory")
    if not path.is_file():
        raise FslmError(f"{directory}: not a stack directory (no {MANIFEST}; create one with `fslm init`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FslmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_config(text, str(path))


def dump_config(config: StackConfig) -> str:
    return dump_yaml(config.model_dump(mode="json", exclude_none=True))


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True, width=100)


def save_config(config: StackConfig, directory: str | Path) -> Path:
    """Write DIR/stack.yaml atomically (a reader never sees half a manifest)."""
    path = Path(directory) / MANIFEST
    atomic_write_text(path, dump_config(config))
    return path


def update_config(directory: str | Path, edit: Any) -> StackConfig:
    """Change DIR/stack.yaml in place, keeping the user's comments and layout (round-trip YAML), validated before it
    is written atomically. `edit` receives the document as nested mappings and lists and changes it."""
    from ruamel.yaml import YAML  # only here: the rest of fslm reads YAML with PyYAML

    path = Path(directory) / MANIFEST
    load_config(directory)  # the file as it is must be valid (names file, line and field otherwise)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap the user's lines
    rt.indent(mapping=2, sequence=2, offset=0)
    document = rt.load(path.read_text(encoding="utf-8"))
    edit(document)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    text = buffer.getvalue()
    config = parse_config(text, str(path))
    atomic_write_text(path, text)
    return config


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (prompt templates) as `|` blocks so stack.yaml stays pleasant to edit."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


def _list_presenter(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(x, (str, int, float)) and "\n" not in str(x) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_LiteralDumper.add_representer(str, _str_presenter)
_LiteralDumper.add_representer(list, _list_presenter)


def _has_path(data: Any, loc: tuple[str, ...]) -> bool:
    for key in loc:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True
