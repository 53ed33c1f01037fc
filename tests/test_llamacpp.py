"""The llamacpp backend agrees with the PyTorch backend on the same stack (f32 export, so no quantisation blur)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, make_adapter
from typer.testing import CliRunner

from fslm.backends.llamacpp import LlamaCppBackend
from fslm.cli import app
from fslm.config import GenerationSettings, load_config
from fslm.errors import FslmError
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps.export import export_gguf
from fslm.steps.init import InitOptions, init

STAGES = ("intent", "plan", "reasoning", "answer")


# max |logit diff| allowed, f32 export and f32 KV cache. GPT-NeoX's is wider: llama.cpp's GELU rounds its input to
# f16 and looks the result up in an f16 table (ggml-cpu's GGML_GELU_FP16), where transformers computes erf in f32.
LOGIT_TOLERANCE = {"llama": 5e-3, "qwen2": 5e-3, "gpt_neox": 0.1}
MODEL_FIXTURE = {"llama": "tiny_llama", "gpt_neox": "tiny_neox", "qwen2": "tiny_qwen2"}


def _export_with_adapters(directory: Path, model_dir: Path, arch: str) -> Path:
    """A stack with a random, non-trivial adapter on every stage, exported as f32 GGUF."""
    init(directory, InitOptions(base=str(model_dir)))
    for seed, stage in enumerate(STAGES):
        make_adapter(model_dir, arch, StackDir(directory).adapter(stage), seed=seed)
    export_gguf(directory, "f32")
    return directory


def _llama_stack(directory: Path) -> Stack:
    """The llamacpp stack with an f32 KV cache (the default f16 cache flips near-ties of a random model)."""
    config = load_config(directory)
    return Stack(config, LlamaCppBackend.from_settings(config.base, directory, type_k=0, type_v=0), directory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama) -> Path:
    """A tiny Llama stack with a random, non-trivial adapter on every stage, exported as f32 GGUF."""
    return _export_with_adapters(tmp_path_factory.mktemp("llamacpp") / "stack", tiny_llama, "llama")


@pytest.fixture(scope="module")
def torch_stack(exported) -> Stack:
    return Stack.load(exported, backend="torch")


@pytest.fixture(scope="module")
def llama_stack(exported) -> Stack:
    return _llama_stack(exported)


@pytest.fixture(scope="module", params=list(MODEL_FIXTURE))
def arch_stacks(request, tmp_path_factory) -> tuple[str, Path, Stack, Stack]:
    """(architecture, export directory, torch stack, llamacpp stack) for Llama, GPT-NeoX and Qwen2 in turn."""
    arch = request.param
    if arch == "llama":  # the module's Llama stacks, not a second export
        stacks = [request.getfixturevalue(n) for n in ("exported", "torch_stack", "llama_stack")]
        yield arch, *stacks
        return
    model_dir = request.getfixturevalue(MODEL_FIXTURE[arch])
    directory = _export_with_adapters(tmp_path_factory.mktemp(f"llamacpp-{arch}") / "stack", model_dir, arch)
    llama = _llama_stack(directory)
    yield arch, directory, Stack.load(directory, backend="torch"), llama
    llama.backend.close()


def _token_ids(tokenizer, n: int = 64) -> list[int]:
    ids = tokenizer(" ".join(CORPUS))["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def test_top1_agrees_on_token_ids(arch_stacks, record_property):
    """Same token ids through both backends: top-1 agrees at every position, logits within rounding.

    Measured (64 positions, bare base and each of 4 random adapters, logits up to ~10-12): top-1 agrees on 100%
    everywhere; max |logit diff| Llama <= 9e-4, Qwen2 <= 5e-4, GPT-NeoX <= 0.045 (its f16 GELU table, see
    LOGIT_TOLERANCE). Each adapter moves the logits by several units.
    """
    arch, exported, torch_stack, _ = arch_stacks
    tb = torch_stack.backend
    lb = LlamaCppBackend.from_gguf(
        exported / "gguf" / "base.gguf",
        tb.tokenizer,
        {s: exported / "gguf" / f"{s}.lora.gguf" for s in STAGES},
        logits_all=True,
        type_k=0,  # an f32 KV cache: the default f16 cache alone moves random-model logits by ~0.3
        type_v=0,
    )
    ids = _token_ids(tb.tokenizer)
    worst = 0.0
    try:
        base_logits = None
        for adapter in (None, *STAGES):
            with torch.inference_mode(), tb.use_adapter(adapter):
                expect = tb.model(torch.tensor([ids])).logits[0].float().numpy()
            got = lb.logits(ids, adapter)
            agree = float((expect.argmax(-1) == got.argmax(-1)).mean())
            diff = float(np.abs(expect - got).max())
            scale = float(np.abs(expect).max())
            worst = max(worst, diff)
            assert agree == 1.0, f"{arch} {adapter}: top-1 agrees on {agree:.0%} of {len(ids)} positions"
            assert diff < LOGIT_TOLERANCE[arch], f"{arch} {adapter}: max |logit diff| {diff:.5f} (scale {scale:.1f})"
            if adapter is None:
                base_logits = got
            else:  # the adapter really changes what llama.cpp computes
                assert float(np.abs(got - base_logits).max()) > 1.0
    finally:
        lb.close()
    record_property("max_logit_diff", worst)
    print(f"{arch}: top-1 agrees on all {len(ids)} positions x 5; max |logit diff| {worst:.2g}")


def test_greedy_stack_run_matches_torch(arch_stacks):
    """The 4-stage trace: same shape, same adapters, same prompt token counts, same greedy outputs."""
    arch, _, torch_stack, llama_stack = arch_stacks
    instruction = "What is the capital of France?"
    expect = torch_stack.run(instruction, max_new_tokens=8).to_dict()
    got = llama_stack.run(instruction, max_new_tokens=8).to_dict()
    assert [s["name"] for s in got["stages"]] == list(STAGES)
    for e, g in zip(expect["stages"], got["stages"], strict=True):
        assert set(e) == set(g)
        assert (g["adapter"], g["prompt_tokens"], g["output_tokens"]) == (
            e["adapter"],
            e["prompt_tokens"],
            e["output_tokens"],
        ), arch
        assert g["output"] == e["output"], arch
        assert g["output_tokens"] > 0


def test_streaming_concatenates_to_output(llama_stack):
    backend = llama_stack.backend
    prompt = llama_stack.render_prompt(llama_stack.config.stages[0], "Explain why the sky is blue.", None, {})
    deltas: list[str] = []
    [completion] = backend.generate(
        [prompt], "intent", GenerationSettings(max_new_tokens=12), on_text=lambda row, d: deltas.append(d)
    )
    assert completion.output_tokens > 0
    assert len(deltas) > 1
    assert "".join(deltas).strip() == completion.text


def test_bare_gguf_without_adapters(exported, torch_stack):
    """from_gguf with no adapters: the bare base model (e.g. a fast teacher), greedy text equal to torch's base."""
    tb = torch_stack.backend
    lb = LlamaCppBackend.from_gguf(exported / "gguf" / "base.gguf", tb.tokenizer)
    try:
        prompt = tb.format_prompt("You are helpful.", "Give three tips for staying healthy.")
        settings = GenerationSettings(max_new_tokens=8)
        [expect] = tb.generate([prompt], None, settings)
        [got] = lb.generate([prompt], None, settings)
        assert got.text == expect.text
        assert (got.prompt_tokens, got.output_tokens) == (expect.prompt_tokens, expect.output_tokens)
        with pytest.raises(FslmError, match="not loaded"):
            lb.generate([prompt], "intent", settings)
    finally:
        lb.close()


def test_changed_adapter_and_missing_export(tmp_path, exported, tiny_llama):
    directory = tmp_path / "fresh"
    init(directory, InitOptions(base=str(tiny_llama)))
    result = CliRunner().invoke(app, ["run", str(directory), "hello", "--backend", "llamacpp"])
    assert result.exit_code == 2
    assert "fslm export" in result.output
    # an adapter retrained after the export must not silently run the old GGUF
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("intent"), seed=7)
    export_gguf(directory, "f32")
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("intent"), seed=8)
    with pytest.raises(FslmError, match="changed since the GGUF export"):
        Stack.load(directory, backend="llamacpp")


def test_cli_run_llamacpp_trace(exported):
    result = CliRunner().invoke(
        app, ["run", str(exported), "Name a colour.", "--backend", "llamacpp", "--max-new-tokens", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    import json

    trace = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in trace["stages"]] == list(STAGES)
    assert all(s["adapter"] == s["name"] and s["output_tokens"] > 0 for s in trace["stages"])


@pytest.mark.slow
def test_embedded_model_with_random_adapter(tmp_path):
    """The real embedded SmolLM2 (f16 export of its de-quantised weights) + a random adapter of realistic size.

    Measured: top-1 agrees on 100% of 48 positions with and without the adapter, max |logit diff| ~0.05 (logits
    up to ~31); the adapter changes ~40% of the top-1 tokens. (A full-size random adapter, B ~ N(0, 0.5), wrecks
    the model into chaos where any rounding flips tokens, so B is scaled down.)
    """
    from safetensors.numpy import load_file, save_file

    from fslm import models
    from fslm.config import BaseModelSettings

    settings = BaseModelSettings()
    ref = models.resolve(settings.model)
    cache = models.gguf_cache_dir(ref, settings)
    if not (cache / "config.json").is_file():
        models.load_base(ref, settings)
    directory = tmp_path / "stack"
    init(directory)
    adapter = make_adapter(cache, "llama", StackDir(directory).adapter("answer"), seed=0, r=4)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * (0.02 if "lora_B" in k else 1.0) for k, v in load_file(str(weights)).items()}, str(weights))
    export_gguf(directory, "f16")
    tb = Stack.load(directory, backend="torch").backend
    lb = LlamaCppBackend.from_gguf(
        directory / "gguf" / "base.gguf",
        tb.tokenizer,
        {"answer": directory / "gguf" / "answer.lora.gguf"},
        logits_all=True,
    )
    try:
        ids = _token_ids(tb.tokenizer, 48)
        with torch.inference_mode():
            with tb.use_adapter(None):
                base = tb.model(torch.tensor([ids])).logits[0].float().numpy()
            with tb.use_adapter("answer"):
                expect = tb.model(torch.tensor([ids])).logits[0].float().numpy()
        got = lb.logits(ids, "answer")
        assert (expect.argmax(-1) != base.argmax(-1)).mean() > 0.1  # the adapter matters
        agree = float((expect.argmax(-1) == got.argmax(-1)).mean())
        assert agree >= 0.95, f"top-1 agrees on {agree:.0%} of {len(ids)} positions (f16 base)"
        assert float(np.abs(expect - got).max()) < 0.5
    finally:
        lb.close()


def test_avoid_amx_turns_off_extra_buffer_types_only_where_cpu_advertises_amx(monkeypatch):
    """llama.cpp's AMX kernels fault on VMs that advertise AMX (seen on this project's machines): avoid_amx keeps
    the weights off the AMX buffer type there, leaves other CPUs alone, and FSLM_LLAMACPP_AMX=1 opts out."""
    import llama_cpp.llama_cpp as lc

    from fslm.backends import llamacpp

    current = lc.llama_model_default_params  # already patched when an earlier test loaded a model on this CPU
    monkeypatch.setattr(lc, "llama_model_default_params", current)  # restored after the test
    original = getattr(current, "fslm_original", current)
    monkeypatch.setattr(lc, "llama_model_default_params", original)
    monkeypatch.delenv("FSLM_LLAMACPP_AMX", raising=False)

    monkeypatch.setattr(llamacpp, "cpu_advertises_amx", lambda: False)
    llamacpp.avoid_amx()
    assert lc.llama_model_default_params().use_extra_bufts is True

    monkeypatch.setattr(llamacpp, "cpu_advertises_amx", lambda: True)
    monkeypatch.setenv("FSLM_LLAMACPP_AMX", "1")
    llamacpp.avoid_amx()
    assert lc.llama_model_default_params().use_extra_bufts is True

    monkeypatch.delenv("FSLM_LLAMACPP_AMX")
    llamacpp.avoid_amx()
    llamacpp.avoid_amx()  # idempotent: one wrapper, not a chain
    assert lc.llama_model_default_params().use_extra_bufts is False
    assert lc.llama_model_default_params is not original
    assert getattr(lc.llama_model_default_params, "fslm_avoids_amx", False)
