"""The llamacpp backend agrees with the PyTorch backend on the same stack (f32 export, so no quantisation blur)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, make_adapter, make_benchmark_dir
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
        type_k=0,  # an f32 KV cache: the default f16 cache alone moves random-model logits by ~0.3
        type_v=0,
        flash_attn_type=0,  # CPU flash attention rounds queries to f16 (~0.02 here): this test checks the export
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
    """`fslm run --json` prints exactly one JSON object (README) on the llama.cpp backend too: the whole of stdout
    of a real process, so nothing llama.cpp prints at the C level can sneak in."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fslm", "run", str(exported), "Name a colour.", "--backend", "llamacpp"]
    cmd += ["--max-new-tokens", "4", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = json.loads(proc.stdout)  # the whole output is one JSON document
    assert isinstance(trace, dict)
    assert set(trace) >= {"instruction", "input", "stages", "answer"}
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


# --- the fast path: batched rows, prefix reuse, native sampling ---------------------------------------------------

QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy. Eat well, sleep enough and move every day, and plan it.",
    "Name a colour.",
    "Explain why the sky is blue.",
]


def _backend(exported: Path, **kwargs) -> LlamaCppBackend:
    """A llama.cpp backend over the exported tiny stack with every stage's adapter (f32 KV cache)."""
    config = load_config(exported)
    backend = LlamaCppBackend.from_settings(config.base, exported, type_k=0, type_v=0, **kwargs)
    Stack(config, backend, exported)  # attaches the adapters
    return backend


@pytest.fixture(scope="module")
def sequential(exported) -> LlamaCppBackend:
    """The reference: one row at a time, nothing reused between calls."""
    backend = _backend(exported, max_sequences=1, prefix_cache=False)
    yield backend
    backend.close()


def _prompts(stack: Stack, stage: str, questions: list[str] = QUESTIONS) -> list[str]:
    """Stage prompts of different lengths (earlier stages' outputs of different lengths)."""
    config = stack.config.stage(stage)
    return [
        stack.render_prompt(config, q, None, {r: " ".join(["step"] * (i + 1)) for r in config.reads})
        for i, q in enumerate(questions)
    ]


def _outcome(completions) -> list[tuple[str, int, int]]:
    return [(c.text, c.prompt_tokens, c.output_tokens) for c in completions]


def test_batched_rows_give_the_one_by_one_text(exported, llama_stack, sequential):
    """Rows of one generate call decode together (one llama_decode per step for all of them), and each row's greedy
    text and token counts are what it gets alone, with the bare base and with adapters."""
    backend = _backend(exported, n_ctx=2048)  # KV cells for all rows at once (one row may still use 512)
    try:
        assert backend.context_length == sequential.context_length == 512
        settings = GenerationSettings(max_new_tokens=10, repetition_penalty=1.1)
        for stage, adapter in (("intent", None), ("plan", "plan"), ("answer", "answer")):
            prompts = _prompts(llama_stack, stage)
            lengths = [backend.count_tokens(p) for p in prompts]
            assert len(set(lengths)) == len(prompts)  # different lengths
            expect = [sequential.generate([p], adapter, settings, label=stage)[0] for p in prompts]
            calls = backend.stats["decode_calls"]
            got = backend.generate(prompts, adapter, settings, label=stage)
            assert _outcome(got) == _outcome(expect), f"{stage} with adapter {adapter}"
            # shared forward passes: the prompts' batches, then one llama_decode per step for every row
            prompt_batches = 1 + -(-sum(lengths) // backend.n_batch)  # + 1: the shared prefix, evaluated first
            assert backend.stats["decode_calls"] - calls <= prompt_batches + max(c.output_tokens for c in got) - 1
    finally:
        backend.close()


def test_rows_wait_for_room_in_a_small_cache(exported, llama_stack, sequential):
    """More rows than sequence slots, and a KV cache too small for all of them at once: rows are admitted as others
    finish, with the same text."""
    prompts = _prompts(llama_stack, "reasoning") * 2
    settings = GenerationSettings(max_new_tokens=8, repetition_penalty=1.1)
    ids = [llama_stack.backend.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared, shortest = len(os.path.commonprefix(ids)), min(len(x) for x in ids)
    small = _backend(exported, max_sequences=3, n_ctx=max(len(x) for x in ids) + 8)
    try:
        assert small.kv_cells < shared + 2 * (shortest - shared + 8)  # two rows never fit at once
        got = small.generate(prompts, "reasoning", settings, label="reasoning")
        expect = [sequential.generate([p], "reasoning", settings, label="reasoning")[0] for p in prompts]
        assert _outcome(got) == _outcome(expect)
    finally:
        small.close()


def test_prefix_reuse_gives_the_same_text_and_skips_the_shared_tokens(exported, llama_stack, sequential):
    """A stage's shared prompt prefix is evaluated once per adapter and reused; the text is what full evaluation
    gives, whatever adapter ran the same stage label before."""
    backend = _backend(exported)
    try:
        settings = GenerationSettings(max_new_tokens=8, repetition_penalty=1.1)
        for stage in STAGES:
            prompts = _prompts(llama_stack, stage)
            ids = [backend.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            shared = len(os.path.commonprefix(ids))  # token ids the stage's prompts share
            assert shared > 10  # chat header + role + template text before the instruction
            for i, prompt in enumerate(prompts):
                before = backend.stats["reused_tokens"]
                [got] = backend.generate([prompt], stage, settings, label=stage)
                [expect] = sequential.generate([prompt], stage, settings, label=stage)
                assert _outcome([got]) == _outcome([expect]), f"{stage} query {i}"
                reused = backend.stats["reused_tokens"] - before
                if i >= 2:  # the cached prefix has been trimmed to what the stage's prompts share
                    assert reused == shared, f"{stage} query {i}: reused {reused}, shared {shared}"
        # the same label under another adapter must not reuse keys/values computed under the first one
        prompt = _prompts(llama_stack, "answer")[0]
        for adapter in ("answer", None, "intent", "answer"):
            [got] = backend.generate([prompt], adapter, settings, label="answer")
            [expect] = sequential.generate([prompt], adapter, settings, label="answer")
            assert _outcome([got]) == _outcome([expect]), f"adapter {adapter}"
        assert sequential.stats["reused_tokens"] == 0
    finally:
        backend.close()


@pytest.mark.parametrize("native_greedy", [False, True], ids=["numpy-greedy", "llama.cpp-sampler-chain"])
def test_repetition_penalty_matches_torch(exported, torch_stack, native_greedy):
    """transformers' repetition penalty (whole context, once per distinct token) and llama.cpp's penalty with a
    window of the whole context give the same greedy text; the penalty does change the text here."""
    tb = torch_stack.backend
    backend = _backend(exported, native_greedy=native_greedy)
    try:
        penalised = GenerationSettings(max_new_tokens=24, repetition_penalty=1.5)
        plain = GenerationSettings(max_new_tokens=24)
        prompts = _prompts(torch_stack, "answer")
        assert min(backend.count_tokens(p) for p in prompts) > 64  # longer than llama.cpp's default penalty window
        changed = 0
        for adapter in (None, "answer"):
            for prompt in prompts:
                [expect] = tb.generate([prompt], adapter, penalised)
                [without] = tb.generate([prompt], adapter, plain)
                changed += expect.text != without.text
                [got] = backend.generate([prompt], adapter, penalised, label="answer")
                assert _outcome([got]) == _outcome([expect]), f"adapter {adapter}: {prompt[-60:]!r}"
        assert changed >= 2
    finally:
        backend.close()


def test_streaming_per_row_while_rows_decode_together(llama_stack):
    backend = llama_stack.backend
    prompts = _prompts(llama_stack, "answer")[:3]
    deltas: dict[int, list[str]] = {0: [], 1: [], 2: []}
    order: list[int] = []

    def on_text(row: int, delta: str) -> None:
        deltas[row].append(delta)
        order.append(row)

    got = backend.generate(prompts, "answer", GenerationSettings(max_new_tokens=12), label="answer", on_text=on_text)
    for row, completion in enumerate(got):
        assert len(deltas[row]) > 1
        assert "".join(deltas[row]).strip() == completion.text
    assert order != sorted(order)  # the rows' text arrives interleaved, step by step


def test_sampling_runs_in_llama_cpp_and_is_seeded(exported):
    """Sampling really samples (another seed draws other text, and greedy differs) and a seed repeats its draws;
    rows of one call draw with seeds seed, seed + 1, ... (fslm/backends/llamacpp.py)."""
    settings = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.9, repetition_penalty=1.2)

    def draw(seed: int, settings: GenerationSettings = settings) -> list[tuple[str, int, int]]:
        backend = _backend(exported, seed=seed)
        try:
            prompt = backend.format_prompt("You are helpful.", "Name a colour.")
            return _outcome(backend.generate([prompt, prompt], "answer", settings))
        finally:
            backend.close()

    first, again, other = draw(7), draw(7), draw(8)
    greedy = draw(7, settings.model_copy(update={"temperature": 0.0}))
    assert all(n > 0 for _, _, n in first)
    assert first == again  # same seed, same draws
    assert first != other and first[0] != other[0]  # another seed, other draws
    assert first[0][0] != first[1][0]  # the two rows (seeds 7 and 8) drew apart on the same prompt
    assert first[1] == other[0]  # row 1 of seed 7 is seed 8, as row 0 of seed 8 is
    assert greedy[0] == greedy[1] and first[0][0] != greedy[0][0]  # sampling on: not the greedy text
    pinned = settings.model_copy(update={"seed": 3})  # GenerationSettings.seed wins over the backend's
    assert draw(7, pinned) == draw(8, pinned)


def test_score_matches_torch(exported, torch_stack):
    """lm-eval's loglikelihood on llama.cpp (a question's choices sharing one context's cells, several questions per
    decode, a small KV cache that splits the questions into waves, and a context longer than the model's that is
    left-truncated) equals the torch backend's: log-probabilities within float rounding, the same greedy flags."""
    tb = torch_stack.backend
    lb = LlamaCppBackend.from_gguf(
        exported / "gguf" / "base.gguf",
        tb.tokenizer,
        {"answer": exported / "gguf" / "answer.lora.gguf"},
        type_k=0,
        type_v=0,
        flash_attn_type=0,
        n_ctx=256,  # a 300-token context cannot fit: it is truncated to the last 255 tokens, as torch does
        max_sequences=6,
    )
    ids = _token_ids(tb.tokenizer)
    requests = []
    for q in range(5):  # 5 questions of 4 choices, contexts of different lengths, 1- to 4-token continuations
        ctx = ids[q : 12 + 7 * q]
        requests += [(ctx, ids[40 + c : 41 + c + (c + q) % 4]) for c in range(4)]
    greedy_ctx = ids[:20]
    with torch.inference_mode(), tb.use_adapter(None):
        top = int(tb.model(torch.tensor([greedy_ctx])).logits[0, -1].argmax())
    requests.append((greedy_ctx, [top]))  # greedy by construction
    long_ctx = (ids * 5)[:300]
    requests.append((long_ctx, ids[:3]))
    # what llama.cpp's 256 cells may hold of it: the last 257 tokens, the last 3 of them the continuation
    reference = [*requests[:-1], (long_ctx[-254:], ids[:3])]
    try:
        assert lb.can("score")
        for adapter in (None, "answer"):
            expect = tb.score(reference, adapter)
            got = lb.score(requests, adapter)
            assert len(got) == len(requests)
            for (e, eg), (g, gg) in zip(expect, got, strict=True):
                assert abs(e - g) < 5e-3, (adapter, e, g)
                assert eg == gg
            assert adapter is not None or (got[-2][1] and not all(g for _, g in got))
            assert lb.stats["decode_calls"] > 2  # the small cache made several waves
        assert lb.parameter_count({"answer"}) > lb.parameter_count(set())
    finally:
        lb.close()


def test_a_stack_on_a_bare_gguf_evaluates_on_llamacpp(tmp_path, exported):
    """A stack whose base is a GGUF file and that has no export (a teacher's, as experiment 2's teacher row builds
    it) loads on llama.cpp as that bare file, and its eval row scores every item as the torch backend does."""
    from fslm.steps.evaluate import EvalOptions, evaluate

    init(tmp_path / "teacher", InitOptions(base=str(exported / "gguf" / "base.gguf")))
    data = make_benchmark_dir(tmp_path / "bench")
    options = EvalOptions(data_dir=data, tasks=["arc_easy"], systems=["base"], limit=6)
    torch_row = evaluate(tmp_path / "teacher", tmp_path / "eval-torch", options).results
    args = ["eval", str(tmp_path / "teacher"), "--data-dir", str(data), "--tasks", "arc_easy", "--systems", "base"]
    result = CliRunner().invoke(app, [*args, "--limit", "6", "--backend", "llamacpp", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    llama_row = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "backend" not in torch_row and llama_row["backend"] == "llamacpp"  # part of each row's key
    assert llama_row["systems"]["base"]["items"] == torch_row["systems"]["base"]["items"]
    assert llama_row["systems"]["base"]["tasks"]["arc_easy"]["n"] == 6
    assert torch_row["systems"]["base"]["precision"] == "fp32"  # the row says what computed it: not fp32 on llama.cpp
    assert llama_row["systems"]["base"]["precision"] == "llamacpp: the model file's own formats"
    bad = CliRunner().invoke(app, [*args, "--backend", "vllm", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "backend" in bad.output
