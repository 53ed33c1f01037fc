"""`fslm export --format gguf`: read the written GGUF files back and check what llama.cpp will read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_adapter, make_model_dir
from gguf import GGUFReader
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fslm.cli import app
from fslm.errors import FslmError
from fslm.stackdir import StackDir
from fslm.steps.export import export_gguf, rope_permute
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
    import shutil

    shutil.rmtree(StackDir(llama_stack).adapter("intent"))
    manifest = export_gguf(llama_stack, "f16")
    assert set(manifest["adapters"]) == {"answer"}
    assert not (llama_stack / "gguf" / "intent.lora.gguf").exists()


def test_refuses_gpt_neox_and_bad_quant(tmp_path, models_root):
    neox = make_model_dir(models_root, "gpt_neox", chat=False)
    directory = tmp_path / "neox"
    init(directory, InitOptions(base=str(neox)))
    with pytest.raises(FslmError, match="gpt_neox"):
        export_gguf(directory, "f16")
    result = CliRunner().invoke(app, ["export", str(directory), "--quant", "q3"])
    assert result.exit_code == 2
    assert "q3" in result.output


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
