"""`fslm export --format gguf`: the base model and one LoRA adapter per stage (and per baseline) as GGUF files for
llama.cpp.

Layout of `DIR/gguf/` (see docs/export.md):
- `base.gguf` (or a link to the shipped GGUF of the embedded model when it already has the requested type),
- `<name>.lora.gguf` per stage and per baseline (`single`, `multitask`) that has a PEFT adapter,
- `manifest.json`: what was written, from which source files (sha256), with which library versions.

Written from the GGUF format itself with the `gguf` package (its `TensorNameMap` gives llama.cpp's tensor names),
not with llama.cpp's converter scripts (docs/export.md says why). What differs per architecture is the row order
llama.cpp expects, applied alike to a base weight, its bias and the LoRA B matrix (B's rows are output rows):
- Llama: q/k rows from HF's rotate-half layout to llama.cpp's adjacent pairs (`rope_permute`);
- GPT-NeoX (Pythia): the fused `query_key_value` from per-head [q|k|v] to [all q|all k|all v] (`qkv_regroup`);
  partial rotary, parallel residual and LayerNorm biases are hyperparameters and plain tensors;
- Qwen2: nothing (llama.cpp uses the same rotate-half rope); its q/k/v biases are plain tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from fslm import models
from fslm.backends.choose import export_is_current
from fslm.config import load_config
from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import atomic_write_text, sha256_file
from fslm.models import GGUF_ARCH
from fslm.options import Options, Result
from fslm.provenance import versions
from fslm.stackdir import BASELINES, StackDir

log = logging.getLogger("fslm")
BASE_FILE = "base.gguf"
QUANTS = ("f32", "f16", "q8_0", "q4_1")
SUPPORTED_TEXT = "llama (Llama, SmolLM2, TinyLlama), qwen2 (Qwen2, Qwen2.5), gpt_neox (Pythia, GPT-NeoX)"
# Buffers some checkpoints carry that are not weights (rotary frequencies, GPT-NeoX's causal mask).
NOT_WEIGHTS = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")


class ExportOptions(Options):
    """What `fslm export` can be told besides the directory; the CLI's flags and defaults come from here."""

    format: str = Field("gguf", description="Export format (only gguf: llama.cpp).")
    quant: str | None = Field(
        None,
        description="Base weights: f16 (default), q8_0, q4_1 or f32; a GGUF base of that type is linked as is.",
    )


class ExportResult(Result):
    """Where the export went (DIR/gguf) and its manifest.json."""

    directory: Path
    manifest: dict[str, Any]


def export(
    stack: str | Path, options: ExportOptions | None = None, on_event: EventHandler | None = None
) -> ExportResult:
    """Write DIR/gguf/: the base model and one GGUF LoRA adapter per trained stage and baseline, for llama.cpp."""
    options = options or ExportOptions()
    if options.format != "gguf":
        raise FslmError(f"--format {options.format!r}: only gguf is supported")
    done = 0

    def step(message: str) -> None:
        nonlocal done
        done += 1
        emit(on_event, Progress("export", message, done))

    manifest = export_gguf(stack, options.quant, on_step=step)
    return ExportResult(directory=StackDir(stack).gguf, manifest=manifest)


def refresh(stack: str | Path) -> None:
    """Export again when DIR/gguf/ is missing or older than an adapter: what the llama.cpp stages of `fslm eval` and
    of train's student outputs run on (the base is rewritten only when its source changed)."""
    if not export_is_current(StackDir(stack)):
        log.info("exporting %s to GGUF for the llama.cpp backend", stack)
        export(stack)


def adapter_file(stage: str) -> str:
    return f"{stage}.lora.gguf"


def unsupported(arch: str, where: str) -> FslmError:
    return FslmError(f"{where}: GGUF export supports {SUPPORTED_TEXT}; not {arch!r}")


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to llama.cpp's adjacent-pair layout.

    HF rotates dimension i with i + d/2 within each head; llama.cpp's Llama rope rotates 2i with 2i+1. The same row
    order must apply to the base weight and to the LoRA B matrix (delta = B A, rows of B are output rows).
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qkv_regroup(w: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's fused query_key_value rows, per head [q|k|v], to llama.cpp's [all q | all k | all v].

    For the weight, its bias, and the LoRA B matrix alike (rows are output rows); LoRA A is untouched.
    """
    head_dim = w.shape[0] // (3 * n_head)
    return w.reshape(n_head, 3, head_dim, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def llamacpp_rows(arch: str, name: str, w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """The row order llama.cpp expects for tensor `name` (a llama.cpp name; weight, bias or LoRA B)."""
    stem = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    if arch == "llama" and stem.endswith(".attn_q"):
        return rope_permute(w, n_head)
    if arch == "llama" and stem.endswith(".attn_k"):
        return rope_permute(w, n_kv)
    if arch == "gpt_neox" and stem.endswith(".attn_qkv"):
        return qkv_regroup(w, n_head)
    return w


def tensor_namer(arch: str, n_blocks: int) -> Callable[[str], str | None]:
    """HF tensor name (`...weight`/`...bias`) -> llama.cpp's name, from the gguf package's own name map."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[GGUF_ARCH[arch]]
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)

    def name(hf: str) -> str | None:
        return names.get_name(hf, try_suffixes=(".weight", ".bias"))

    return name


# --- the base model ---------------------------------------------------------------------------------------------


def _hf_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """All tensors of a safetensors model as float32 numpy arrays, one at a time.

    Read with plain file reads rather than through safetensors' memory map: every page of a mapped file stays in the
    process's resident set until it is unmapped, so exporting the embedded base from its 540 MB float32 copy held all
    of it (training's student phase exports with the torch base loaded beside). The format is a length, a JSON
    header of dtype / shape / byte offsets, then the raw little-endian data.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FslmError(f"{model_dir}: no *.safetensors weights to export")
    for f in files:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(size))
            except ValueError as e:
                raise FslmError(f"{f}: not a safetensors file ({e})") from None
            start = 8 + size
            for key in sorted(k for k in header if k != "__metadata__"):
                if key.endswith(NOT_WEIGHTS):
                    continue
                info = header[key]
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise FslmError(f"{f}: tensor {key!r} has dtype {info['dtype']}, not a float type to export")
                begin, end = info["data_offsets"]
                fh.seek(start + begin)
                data = np.frombuffer(fh.read(end - begin), dtype=np.dtype(dtype).newbyteorder("<"))
                if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                    data = (data.astype(np.uint32) << 16).view(np.float32)
                yield key, data.astype(np.float32, copy=False).reshape(info["shape"])


def _encode(data: np.ndarray, quant: str, name: str) -> tuple[np.ndarray, Any]:
    """(data, raw type) for a tensor: norms and 1-D tensors stay f32, matrices take the requested type."""
    import gguf

    if data.ndim == 1 or quant == "f32" or name.endswith("_norm.weight"):
        return data.astype(np.float32), None
    if quant == "f16":
        return data.astype(np.float16), None
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:  # llama.cpp quantises whole rows of blocks; a ragged row stays f16
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def _tokenizer_fields(writer: Any, model_dir: Path, cfg: dict[str, Any], copy_from: Path | None) -> None:
    """gpt2-style BPE vocabulary + merges (what llama.cpp loads for byte-level BPE tokenizers)."""
    import gguf

    if copy_from is not None:  # the shipped GGUF's tokenizer is exactly what llama.cpp already accepts
        reader = gguf.GGUFReader(copy_from)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                vtype = field.types[0]
                if vtype == gguf.GGUFValueType.ARRAY:
                    writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
                else:
                    writer.add_key_value(key, field.contents(), vtype)
        return
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        raise FslmError(f"{model_dir}: no tokenizer.json; only byte-level BPE tokenizers can be exported")
    data = json.loads(tj.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise FslmError(f"{tj}: tokenizer model {model.get('type')!r} is not BPE; cannot export it to GGUF")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n_vocab = max(int(cfg.get("vocab_size", 0)), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = (
            gguf.TokenType.NORMAL
            if t is None
            else gguf.TokenType.CONTROL
            if t.get("special")
            else gguf.TokenType.USER_DEFINED
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            add(value)


def _hyperparameters(w: Any, cfg: dict[str, Any], arch: str, model_dir: Path) -> tuple[int, int]:
    """Write the architecture's llama.cpp keys; returns (heads, KV heads). Refuses what llama.cpp would run
    differently from transformers (scaled rope, sliding-window attention, a non-GELU GPT-NeoX)."""
    n_head = int(cfg["num_attention_heads"])
    n_kv = n_head if arch == "gpt_neox" else int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 | 4
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise FslmError(f"{model_dir}: rope type {rope} is not supported by the GGUF export (only default rope)")
    theta = rope.get("rope_theta") or cfg.get("rope_theta") or cfg.get("rotary_emb_base") or 10000.0
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_rope_freq_base(float(theta))
    if arch == "gpt_neox":
        act = cfg.get("hidden_act", "gelu")
        if not str(act).startswith("gelu"):
            raise FslmError(f"{model_dir}: hidden_act {act!r}: llama.cpp's GPT-NeoX runs GELU only")
        partial = rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or cfg.get("rotary_pct")
        w.add_rope_dimension_count(int(float(partial or 1.0) * head_dim))
        w.add_parallel_residual(bool(cfg.get("use_parallel_residual", True)))
        w.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-5)))
        return n_head, n_kv
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        raise FslmError(f"{model_dir}: use_sliding_window is on; llama.cpp's qwen2 has no sliding-window attention")
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    return n_head, n_kv


def write_base_gguf(model_dir: Path, out: Path, quant: str, tokenizer_from: Path | None = None) -> None:
    """Write an HF safetensors model (a supported architecture) as one GGUF file (atomically)."""
    import gguf

    cfg = _hf_config(model_dir)
    arch = cfg.get("model_type", "unknown")
    if arch not in GGUF_ARCH:
        raise unsupported(arch, str(model_dir))
    with _gguf_file(out, arch) as w:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_dir.name)
        n_head, n_kv = _hyperparameters(w, cfg, arch, model_dir)
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            }[quant]
        )
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_fields(w, model_dir, cfg, tokenizer_from)
        name_of = tensor_namer(arch, int(cfg["num_hidden_layers"]))
        # Two passes, so that no more than one tensor is in memory: the first learns each encoded tensor's shape and
        # type for the header, the second encodes them again and writes them in the same order.
        for name, data, raw in _gguf_tensors(model_dir, arch, quant, name_of, n_head, n_kv):
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw)
        _write(w, (data for _, data, _ in _gguf_tensors(model_dir, arch, quant, name_of, n_head, n_kv)))


def _gguf_tensors(
    model_dir: Path, arch: str, quant: str, name_of: Callable[[str], str | None], n_head: int, n_kv: int
) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, encoded data, raw type) of every tensor of the base, in file order."""
    written: set[str] = set()
    embeddings: np.ndarray | None = None
    for hf, data in _hf_tensors(model_dir):
        name = name_of(hf)
        if name is None:
            raise FslmError(f"{model_dir}: tensor {hf!r} has no llama.cpp name; cannot export this model")
        data = llamacpp_rows(arch, name, data, n_head, n_kv)
        if name == "token_embd.weight" and arch == "gpt_neox":
            embeddings = data
        encoded, raw = _encode(data, quant, name)
        yield name, encoded, raw
        written.add(name)
    if arch == "gpt_neox" and "output.weight" not in written and embeddings is not None:
        # tied embeddings: llama.cpp's GPT-NeoX requires output.weight (Llama and Qwen2 fall back to token_embd)
        encoded, raw = _encode(embeddings, quant, "output.weight")
        yield "output.weight", encoded, raw


@contextlib.contextmanager
def _gguf_file(out: Path, arch: str) -> Iterator[Any]:
    """A GGUFWriter over a temporary sibling of `out`, moved onto `out` once the block has written it (`_write`);
    on any failure nothing is left behind."""
    import gguf

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH[arch])
    try:
        yield writer
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _write(writer: Any, tensors: Iterable[np.ndarray] | None = None) -> None:
    """Header, metadata, then the tensors: the writer's own (add_tensor), or `tensors` streamed one at a time in the
    order their infos were added (add_tensor_info)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if tensors is None:
        writer.write_tensors_to_file()
        return
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data)


# --- adapters ---------------------------------------------------------------------------------------------------


def _peft_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise FslmError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FslmError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise FslmError(f"{path}: {key} is set; GGUF LoRA has one alpha per file, cannot export it")
    if cfg.get("use_dora"):
        raise FslmError(f"{path}: DoRA adapters cannot be exported to GGUF")
    if cfg.get("bias", "none") != "none":
        raise FslmError(f"{path}: bias={cfg['bias']!r}: a GGUF LoRA holds only A and B matrices, cannot export it")
    return cfg


def write_adapter_gguf(adapter_dir: Path, base_cfg: dict[str, Any], out: Path, dtype: str = "f32") -> dict[str, Any]:
    """Convert one PEFT LoRA adapter to a llama.cpp GGUF LoRA adapter for the base `base_cfg` describes
    (`architecture`, `num_attention_heads`, `num_key_value_heads`, `num_hidden_layers`); returns a summary.

    Tensor pairs are `blk.N.<name>.weight.lora_a` (numpy shape (r, in)) and `.lora_b` ((out, r)); llama.cpp scales
    B·A by alpha / r with r read from the tensors, so rsLoRA's alpha / sqrt(r) is written as alpha·sqrt(r).
    """
    import gguf
    from safetensors import safe_open

    cfg = _peft_config(adapter_dir)
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(r)
    arch = base_cfg.get("architecture", "llama")
    if arch not in GGUF_ARCH:
        raise unsupported(arch, str(adapter_dir))
    n_head = int(base_cfg["num_attention_heads"])
    n_kv = int(base_cfg.get("num_key_value_heads") or n_head)
    name_of = tensor_namer(arch, int(base_cfg.get("num_hidden_layers") or 1000))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FslmError(f"{adapter_dir}: no adapter_model.safetensors")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(weights), framework="pt") as st:
        for key in st.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                raise FslmError(f"{weights}: tensor {key!r} is not a LoRA A/B matrix (modules_to_save?); cannot export")
            module, ab = key.rsplit(".lora_", 1)
            name = name_of(module.removeprefix("base_model.model.") + ".weight")
            if name is None:
                raise FslmError(f"{weights}: LoRA on {module!r} has no llama.cpp tensor name ({arch} base)")
            pairs.setdefault(name, {})[ab[0]] = st.get_tensor(key).float().numpy()
    np_dtype = np.float16 if dtype == "f16" else np.float32
    with _gguf_file(out, arch) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(f"{adapter_dir.name} LoRA")
        for name in sorted(pairs):
            ab = pairs[name]
            if set(ab) != {"A", "B"}:
                raise FslmError(f"{weights}: {name} has only lora_{''.join(ab)}")
            b = llamacpp_rows(arch, name, ab["B"], n_head, n_kv)
            w.add_tensor(f"{name}.lora_a", ab["A"].astype(np_dtype))
            w.add_tensor(f"{name}.lora_b", b.astype(np_dtype))
        _write(w)
    return {"r": r, "alpha": alpha, "tensors": 2 * len(pairs)}


# --- the command ------------------------------------------------------------------------------------------------


def _base_source(ref: models.BaseRef, settings: Any) -> Path:
    """An HF safetensors directory for the base (the de-quantised cache for a GGUF base)."""
    if ref.kind == "dir":
        return Path(ref.location)
    if ref.kind == "gguf":
        cache = models.gguf_cache_dir(ref, settings)
        if not (cache / "config.json").is_file():
            models.load_base(ref, settings)  # de-quantises once into the cache
        if not (cache / "config.json").is_file():
            raise FslmError(f"could not de-quantise {ref.location} into {cache}")
        return cache
    raise FslmError(f"{ref.location}: export needs a local base model (a directory or .gguf file), not a hub id")


def _source_stamp(source: Path, ref: models.BaseRef) -> list[list[Any]]:
    """What the base GGUF was written from: name, size and mtime of each source file (and of a GGUF base's own file,
    which supplies the tokenizer), cheap to compare where hashing would read every weight again."""
    files = sorted([*source.glob("*.safetensors"), *source.glob("*.json")])
    if ref.kind == "gguf":
        files.append(Path(ref.location))
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _written_base(out: Path, base_path: Path, quant: str, source: str, stamp: list[list[Any]]) -> bool:
    """True when DIR/gguf/base.gguf is what this export would write: the manifest of the last export says it was
    written at this quant from these very source files, and the file is still there."""
    try:
        base = json.loads((out / "manifest.json").read_text())["base"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    same = base.get("quant") == quant and base.get("source") == source and base.get("source_stamp") == stamp
    return same and base_path.is_file() and not base_path.is_symlink()


def _gguf_heads(path: Path) -> dict[str, Any]:
    """Architecture, block and head counts of a GGUF base (what the adapters' names and row orders need)."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    n_head = int(fields[f"{arch}.attention.head_count"].contents())
    kv = fields.get(f"{arch}.attention.head_count_kv")
    return {
        "architecture": {v: k for k, v in GGUF_ARCH.items()}.get(arch, arch),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(kv.contents()) if kv else n_head,
        "num_hidden_layers": int(fields[f"{arch}.block_count"].contents()),
    }


def _gguf_file_type(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    return {0: "f32", 1: "f16", 3: "q4_1", 7: "q8_0"}.get(int(field.contents()))


def export_gguf(
    directory: str | Path,
    quant: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write DIR/gguf/ (base + one adapter per stage or baseline with a PEFT adapter) and return the manifest."""
    stack_dir = StackDir(directory)
    config = load_config(stack_dir.root)
    if quant is not None and quant not in QUANTS:
        raise FslmError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    ref = models.resolve_base(config.base, stack_dir.root)
    arch = models.architecture(ref)
    if arch not in GGUF_ARCH:
        raise unsupported(arch, config.base.model)
    out = stack_dir.gguf
    out.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda _: None)
    base = _export_base(ref, config.base, out, quant, step)
    adapter_dtype = "f32" if base["quant"] == "f32" else "f16"
    adapters = _export_adapters(stack_dir, config, _gguf_heads(out / BASE_FILE), adapter_dtype, step)
    manifest = {
        "format": "gguf",
        "architecture": arch,
        "base": base,
        "adapters": adapters,
        "adapter_dtype": adapter_dtype,
        "versions": versions(("gguf", "llama_cpp_python")),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _export_base(
    ref: models.BaseRef, settings: Any, out: Path, quant: str | None, step: Callable[[str], None]
) -> dict[str, Any]:
    """DIR/gguf/base.gguf: linked when the shipped GGUF already has the type asked for, kept when the last export
    wrote it at this type from the same source files, else written; returns its manifest entry."""
    base_path = out / BASE_FILE
    shipped_type = _gguf_file_type(Path(ref.location)) if ref.kind == "gguf" else None
    tmp_link = base_path.with_name(f".{BASE_FILE}.{os.getpid()}.tmp")
    # f16 by default, even over a quantised GGUF base: llama.cpp then multiplies the very weights PyTorch de-quantised
    # in f16, not Q4 weights by 8-bit-quantised activations, so the fast path writes PyTorch's text, and batched
    # prompts run faster (docs/export.md, "Base weights", has the figures).
    quant = quant or "f16"
    if ref.kind == "gguf" and quant == shipped_type:
        step(f"base: linking {Path(ref.location).name} ({shipped_type})")
        tmp_link.unlink(missing_ok=True)
        try:
            tmp_link.symlink_to(ref.location)
        except OSError:
            shutil.copyfile(ref.location, tmp_link)
        os.replace(tmp_link, base_path)
        return _base_entry(shipped_type or "unknown", ref.location, settings.model, None)
    source = _base_source(ref, settings)
    stamp = _source_stamp(source, ref)
    if _written_base(out, base_path, quant, str(source), stamp):
        # eval and train's student outputs export before every llama.cpp run: the same base is not written again
        # (every weight read as float32 costs time and memory; docs/export.md)
        step(f"base: reusing {BASE_FILE} ({quant}, written from {source})")
    else:
        step(f"base: writing {quant} GGUF from {source}")
        tokenizer_from = Path(ref.location) if ref.kind == "gguf" else None
        write_base_gguf(source, base_path, quant, tokenizer_from=tokenizer_from)
    return _base_entry(quant, str(source), settings.model, stamp)


def _base_entry(quant: str, source: str, model: str, stamp: list[list[Any]] | None) -> dict[str, Any]:
    """The manifest's `base`: the file, its type, what it was written from (the stamp: what a reuse compares)."""
    return {"file": BASE_FILE, "quant": quant, "source": source, "model": model, "source_stamp": stamp}


def _export_adapters(
    stack_dir: StackDir, config: Any, base_cfg: dict[str, Any], dtype: str, step: Callable[[str], None]
) -> dict[str, Any]:
    """`<name>.lora.gguf` for every stage and baseline (`single`, `multitask`) with a PEFT adapter (a stale one of a
    name without is removed); returns their manifest entries."""
    adapters: dict[str, Any] = {}
    for name in [*config.stage_names, *BASELINES]:
        target = stack_dir.gguf / adapter_file(name)
        src = stack_dir.adapter(name)
        if not (src / "adapter_model.safetensors").is_file():
            target.unlink(missing_ok=True)  # a stale adapter from an earlier export would be wrong now
            continue
        step(f"adapter: {name}")
        info = write_adapter_gguf(src, base_cfg, target, dtype)
        adapters[name] = {
            "file": target.name,
            "source_sha256": sha256_file(src / "adapter_model.safetensors"),
            **info,
        }
    return adapters
