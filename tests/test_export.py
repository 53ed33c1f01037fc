"""`fslm export --format gguf`: read the written GGUF files back and check what llama.cpp will read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import LORA_TARGETS, make_adapter
from gguf import GGUFReader
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fslm.cli import app
from fslm.errors import FslmError
from fslm.stackdir import StackDir
from fslm.steps.export import _hf_tensors, export_gguf, qkv_regroup, rope_permute, write_base_gguf
from fslm.steps.init import InitOptions, init


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture
def llama_stack(tmp_path, tiny_llama) -> Path:
    """A paper4 stack over the tiny Llama with random adapters on two stages (the others run the bare base)."""
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    for seed, stage in enumerate(("intent", "answer")):
        make_adapter(tiny_llama, "llama", StackDir(directory).adapter(stage), seed=seed)
    return directory


def test_adapter_round_trip(llama_stack: Path, tiny_llama: Path):
    manifest = export_gguf(llama_stack, "f32")
    out = llama_stack / "gguf"
    assert set(manifest["adapters"]) == {"intent", "answer"}
    assert not (out / "plan.lora.gguf").exists()
    hf_cfg = json.loads((tiny_llama / "config.json").read_text())
    for stage in ("intent", "answer"):
        src = StackDir(llama_stack).adapter(stage)
        peft_cfg = json.loads((src / "adapter_config.json").read_text())
        peft = load_file(str(src / "adapter_model.safetensors"))
        reader = GGUFReader(out / f"{stage}.lora.gguf")
        assert _field(reader, "general.type") == "adapter"
        assert _field(reader, "general.architecture") == "llama"
        assert _field(reader, "adapter.type") == "lora"
        assert _field(reader, "adapter.lora.alpha") == pytest.approx(peft_cfg["lora_alpha"])
        tensors = {t.name: t for t in reader.tensors}
        # 2 layers x 7 target modules x (A, B), under llama.cpp's names
        assert len(tensors) == len(peft) == 2 * 7 * 2
        for layer in range(2):
            for hf, gg in (
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("mlp.down_proj", "ffn_down"),
            ):
                key = f"base_model.model.model.layers.{layer}.{hf}"
                a = tensors[f"blk.{layer}.{gg}.weight.lora_a"]
                b = tensors[f"blk.{layer}.{gg}.weight.lora_b"]
                pa, pb = peft[f"{key}.lora_A.weight"], peft[f"{key}.lora_B.weight"]
                # GGUF lists dims innermost first: lora_a is [in, r], lora_b is [r, out]
                assert list(a.shape) == [pa.shape[1], pa.shape[0]]
                assert list(b.shape) == [pb.shape[1], pb.shape[0]]
                np.testing.assert_array_equal(np.asarray(a.data).reshape(pa.shape), pa)
                heads = {"attn_q": hf_cfg["num_attention_heads"], "attn_k": hf_cfg["num_key_value_heads"]}
                expect_b = rope_permute(pb, heads[gg]) if gg in heads else pb
                np.testing.assert_array_equal(np.asarray(b.data).reshape(pb.shape), expect_b)
                if gg in heads:  # the permutation really moves rows
                    assert not np.array_equal(expect_b, pb)
    base = GGUFReader(out / "base.gguf")
    assert _field(base, "general.architecture") == "llama"
    assert _field(base, "tokenizer.ggml.model") == "gpt2"
    assert _field(base, "llama.rope.freq_base") == pytest.approx(hf_cfg["rope_parameters"]["rope_theta"])
    assert _field(base, "llama.attention.head_count_kv") == hf_cfg["num_key_value_heads"]
    assert len(_field(base, "tokenizer.ggml.tokens")) == hf_cfg["vocab_size"]
    assert len(_field(base, "tokenizer.ggml.merges")) > 0
    names = {t.name for t in base.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= names


def test_rope_permute_pairs_halves():
    # one head of dim 4: HF rows (0, 1 | 2, 3) rotate 0 with 2 and 1 with 3; llama.cpp wants pairs adjacent
    w = np.arange(8).reshape(4, 2)
    np.testing.assert_array_equal(rope_permute(w, 1)[:, 0], [0, 4, 2, 6])


def test_quantised_base_and_stale_adapter_removed(llama_stack: Path):
    export_gguf(llama_stack, "q8_0")
    reader = GGUFReader(llama_stack / "gguf" / "base.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    # the intent adapter goes away; a re-export must not leave its old GGUF behind
    shutil.rmtree(StackDir(llama_stack).adapter("intent"))
    manifest = export_gguf(llama_stack, "f16")
    assert set(manifest["adapters"]) == {"answer"}
    assert not (llama_stack / "gguf" / "intent.lora.gguf").exists()


def test_a_second_export_reuses_the_base_it_wrote(llama_stack: Path, tiny_llama: Path):
    """Training's student phase and eval export before every llama.cpp run: the same base is not written again,
    but a different quant or a changed source file is."""
    base = llama_stack / "gguf" / "base.gguf"

    def export(quant: str) -> tuple[list[str], int]:
        steps: list[str] = []
        export_gguf(llama_stack, quant, on_step=steps.append)
        return [s for s in steps if s.startswith("base:")], base.stat().st_mtime_ns

    first, written = export("f16")
    assert first[0].startswith("base: writing f16")
    again, mtime = export("f16")
    assert again[0].startswith("base: reusing base.gguf (f16") and mtime == written
    other, _ = export("q8_0")
    assert other[0].startswith("base: writing q8_0")
    export("q8_0")
    config = tiny_llama / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the source changed
    changed, _ = export("q8_0")
    assert changed[0].startswith("base: writing q8_0")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_base_tensors_read_without_a_memory_map_equal_safetensors(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.weight": torch.randn(7, generator=g)}
    save_file({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    got = dict(_hf_tensors(tmp_path))
    assert list(got) == ["a.weight", "b.weight"]
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v.to(getattr(torch, dtype)).float().numpy())
        assert got[k].dtype == np.float32


def test_refuses_unsupported_architecture_and_bad_quant(tmp_path, tiny_llama):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama, other)
    directory = tmp_path / "other"
    init(directory, InitOptions(base=str(other)))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3"}))
    with pytest.raises(FslmError, match=r"supports llama .*qwen2 .*gpt_neox .*not 'phi3'"):
        export_gguf(directory, "f16")
    result = CliRunner().invoke(app, ["export", str(directory)])
    assert result.exit_code == 2 and "gpt_neox (Pythia" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", str(directory), "--quant", "q3"])
    assert result.exit_code == 2
    assert "choose one of f32, f16, q8_0, q4_1" in result.output  # the refusal names the choices, not just "q3"


@pytest.mark.parametrize(
    ("arch", "change", "message"),
    [
        ("qwen2", {"use_sliding_window": True}, "sliding-window"),
        ("gpt_neox", {"hidden_act": "relu"}, "GELU only"),
        ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope type"),
    ],
)
def test_refuses_what_llamacpp_would_run_differently(arch, change, message, tmp_path, request):
    model_dir = tmp_path / "model"
    shutil.copytree(request.getfixturevalue({"gpt_neox": "tiny_neox", "qwen2": "tiny_qwen2"}[arch]), model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(FslmError, match=message):
        write_base_gguf(model_dir, tmp_path / "base.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))  # nothing half-written


def test_qkv_regroup_orders_all_q_then_k_then_v():
    # 2 heads of dim 1: GPT-NeoX's fused rows are q0 k0 v0 q1 k1 v1; llama.cpp wants q0 q1 k0 k1 v0 v1
    rows = np.array(["q0", "k0", "v0", "q1", "k1", "v1"])
    assert list(qkv_regroup(rows, 2)) == ["q0", "q1", "k0", "k1", "v0", "v1"]
    w = np.arange(12 * 3).reshape(12, 3)  # 2 heads of dim 2, 3 inputs: whole rows move
    np.testing.assert_array_equal(qkv_regroup(w, 2)[2:4], w[6:8])  # q of head 1 right after q of head 0


def test_pythia_config_of_transformers_4(tmp_path, tiny_neox):
    """Pythia's own config.json (transformers 4 keys: rotary_pct, rotary_emb_base, no rope_parameters)."""
    pythia = tmp_path / "pythia-style"
    shutil.copytree(tiny_neox, pythia)
    cfg = json.loads((pythia / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=False)
    (pythia / "config.json").write_text(json.dumps(cfg))
    write_base_gguf(pythia, tmp_path / "base.gguf", "f16")
    base = GGUFReader(tmp_path / "base.gguf")
    assert _field(base, "gptneox.rope.dimension_count") == 8  # 0.5 x head dim 16
    assert _field(base, "gptneox.rope.freq_base") == 5000
    assert _field(base, "gptneox.use_parallel_residual") is False


def _neox_qkv_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's fused qkv order, spelled out head by head (independently of qkv_regroup)."""
    head_dim = w.shape[0] // (3 * n_head)
    part = [[w[(3 * h + j) * head_dim : (3 * h + j + 1) * head_dim] for h in range(n_head)] for j in range(3)]
    return np.concatenate([np.concatenate(p) for p in part])


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_neox_and_qwen2_round_trip(arch, tmp_path, request):
    """Every HF tensor lands under its llama.cpp name with llama.cpp's row order; the adapters follow the base."""
    model_dir = request.getfixturevalue({"gpt_neox": "tiny_neox", "qwen2": "tiny_qwen2"}[arch])
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(model_dir)))
    make_adapter(model_dir, arch, StackDir(directory).adapter("plan"), seed=3)
    manifest = export_gguf(directory, "f32")
    assert manifest["architecture"] == arch
    gguf_arch = {"gpt_neox": "gptneox", "qwen2": "qwen2"}[arch]
    hf_cfg = json.loads((model_dir / "config.json").read_text())
    hf = load_file(str(model_dir / "model.safetensors"))
    base = GGUFReader(directory / "gguf" / "base.gguf")
    assert _field(base, "general.architecture") == gguf_arch
    got = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in base.tensors}
    n_head = hf_cfg["num_attention_heads"]
    head_dim = hf_cfg["hidden_size"] // n_head
    if arch == "gpt_neox":
        assert _field(base, "gptneox.rope.dimension_count") == head_dim // 4  # rotary_pct 0.25
        assert _field(base, "gptneox.use_parallel_residual") is True
        assert _field(base, "gptneox.attention.layer_norm_epsilon") == pytest.approx(hf_cfg["layer_norm_eps"])
        assert len(got) == len(hf)  # the untied embed_out is output.weight
        qkv = "gpt_neox.layers.1.attention.query_key_value"
        for suffix in ("weight", "bias"):
            expect = _neox_qkv_rows(hf[f"{qkv}.{suffix}"], n_head)
            np.testing.assert_array_equal(got[f"blk.1.attn_qkv.{suffix}"], expect)
        for hf_name, name in (
            ("gpt_neox.layers.0.input_layernorm.bias", "blk.0.attn_norm.bias"),
            ("gpt_neox.layers.0.mlp.dense_4h_to_h.bias", "blk.0.ffn_down.bias"),
            ("gpt_neox.final_layer_norm.weight", "output_norm.weight"),
            ("embed_out.weight", "output.weight"),
        ):
            np.testing.assert_array_equal(got[name], hf[hf_name])
    else:
        assert _field(base, "qwen2.attention.head_count_kv") == hf_cfg["num_key_value_heads"]
        assert _field(base, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(hf_cfg["rms_norm_eps"])
        assert "output.weight" not in got and len(got) == len(hf)  # tied: llama.cpp reuses token_embd
        for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            for suffix in ("weight", "bias"):  # same rotate-half rope as HF: no row permutation
                np.testing.assert_array_equal(
                    got[f"blk.1.{name}.{suffix}"], hf[f"model.layers.1.self_attn.{proj}.{suffix}"]
                )
    lora = GGUFReader(directory / "gguf" / "plan.lora.gguf")
    assert _field(lora, "general.architecture") == gguf_arch and _field(lora, "general.type") == "adapter"
    peft = load_file(str(StackDir(directory).adapter("plan") / "adapter_model.safetensors"))
    tensors = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in lora.tensors}
    assert len(tensors) == len(peft) == 2 * len(LORA_TARGETS[arch]) * 2
    if arch == "gpt_neox":
        key = "base_model.model.gpt_neox.layers.0.attention.query_key_value"
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight.lora_a"], peft[f"{key}.lora_A.weight"])
        expect_b = _neox_qkv_rows(peft[f"{key}.lora_B.weight"], n_head)
        assert not np.array_equal(expect_b, peft[f"{key}.lora_B.weight"])
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight.lora_b"], expect_b)
    else:
        key = "base_model.model.model.layers.0.self_attn.k_proj"
        np.testing.assert_array_equal(tensors["blk.0.attn_k.weight.lora_b"], peft[f"{key}.lora_B.weight"])


def test_cli_export(llama_stack: Path):
    result = CliRunner().invoke(app, ["export", str(llama_stack), "--quant", "f16"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((llama_stack / "gguf" / "manifest.json").read_text())
    assert manifest["base"]["quant"] == "f16"
    assert manifest["adapters"]["intent"]["r"] == 4
    assert len(manifest["adapters"]["intent"]["source_sha256"]) == 64


def test_a_gguf_base_loads_for_training_not_marked_quantized(llama_stack: Path, tmp_path, monkeypatch):
    """transformers de-quantises a GGUF base on load but marks the model quantized, and its Trainer then refuses
    to fine-tune it; fslm clears the marker (the first `fslm train` on the embedded GGUF died of this)."""
    from transformers.trainer_utils import validate_quantization_for_training

    from fslm import models
    from fslm.config import BaseModelSettings

    monkeypatch.setenv("FSLM_CACHE", str(tmp_path / "cache"))
    export_gguf(llama_stack, "f32")
    ref = models.resolve(str(llama_stack / "gguf" / "base.gguf"))
    assert ref.kind == "gguf"
    for load in ("from the GGUF file", "from the de-quantised cache"):
        model, _ = models.load_base(ref, BaseModelSettings(model=ref.location))
        assert not getattr(model, "is_quantized", False), load
        assert getattr(model, "hf_quantizer", None) is None, load
        validate_quantization_for_training(model)  # raised on the marked model
        # named after its safetensors copy, so adapters record a base with a config.json (peft warned otherwise)
        assert (Path(model.name_or_path) / "config.json").is_file(), load
    assert any((tmp_path / "cache" / "gguf").iterdir())
