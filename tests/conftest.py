"""Tiny randomly initialised models (Llama, GPT-NeoX, Qwen2), built here in seconds: no hub, no downloads."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("COLUMNS", "200")  # wide rich tables in CLI output checks
# One OpenMP thread per process (this one, before torch is imported, and every fslm it starts) unless the run says
# otherwise: the models here are tiny, and on a 2-core machine that other work keeps busy PyTorch's threads
# spin-wait on each other (measured here under load: tests/test_train.py's training tests 10x faster with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

CORPUS = [
    "Give three tips for staying healthy. Eat well, sleep enough and move every day.",
    "The plan has three steps: read the question, think about it, and write the answer.",
    "What is the capital of France? Paris is the capital of France.",
    "Explain why the sky is blue. Sunlight scatters off air molecules; blue light scatters most.",
    "Instruction: Input: What the user wants: Plan: Notes: Response: system user assistant",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ; : ! ? ' \" # < > |",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def build_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, tokenizer, seed: int = 0, context: int = 512, random_norms: bool = False):
    """A 2-layer random model. `random_norms`: random biases and norm weights too (HF initialises them to 0 and 1,
    which would hide a bias or norm that an export drops or misplaces); Qwen2 always gets them."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": context,
        "initializer_range": 0.3,
        **ids,
    }
    if arch == "llama":
        config = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(rotary_pct=0.25, **common)
    elif arch == "qwen2":  # q/k/v biases, GQA, tied embeddings (as Qwen2.5-0.5B)
        config = Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
        random_norms = True
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.3)
                elif "norm" in name:
                    p.normal_(1, 0.2)
    return model


def make_model_dir(root: Path, arch: str, chat: bool, context: int = 512, random_norms: bool = False) -> Path:
    path = root / f"tiny-{arch}-{'chat' if chat else 'plain'}-{context}{'-norms' if random_norms else ''}"
    if not (path / "config.json").exists():
        tok = build_tokenizer(chat)
        model = build_model(arch, tok, context=context, random_norms=random_norms)
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    return path


def make_benchmark_dir(root: Path, every_task: bool = False) -> Path:
    """A tiny synthetic benchmark directory in the shared layout (ARC JSONL, MMLU headerless CSV); `every_task`
    adds the other offline tasks (see `_more_tasks`)."""
    (root / "arc").mkdir(parents=True)
    for split, key in (("Easy", "B"), ("Challenge", "C")):
        rows = []
        for i in range(14):
            choices = [{"text": f"answer {k} to {i}", "label": "ABCD"[k]} for k in range(4)]
            stem = f"What is {split.lower()} item {i}?"
            rows.append({"id": f"{split}{i}", "question": {"stem": stem, "choices": choices}, "answerKey": key})
        (root / "arc" / f"ARC-{split}-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mmlu" / "test").mkdir(parents=True)
    lines = [f'"Which is {i}?",one,two,three,four,{"ABCD"[i % 4]}\n' for i in range(12)]
    (root / "mmlu" / "test" / "tiny_subject_test.csv").write_text("".join(lines))
    if every_task:
        _more_tasks(root)
    return root


def _more_tasks(root: Path) -> None:
    """HellaSwag, WinoGrande, PIQA, BoolQ, OpenBookQA, TruthfulQA and GSM8K in their files' own formats. Every
    multiple-choice question is written once per answer position with the gold moved along (a "rotation"): a model
    gives the same scores to every copy, so exactly one copy of each question is right and the task's accuracy is
    exactly 1/choices, whatever the model, if and only if the loader reads the gold where it is."""

    def write(rel: str, text: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    endings = ["puts the pot on the stove.", "reads a book [title] aloud.", "runs away.", "sings to the cat."]
    hella = [
        {"ind": i, "activity_label": "Cooking", "ctx_a": "A man stands in a kitchen.", "ctx_b": "then he",
         "endings": endings, "label": str(i)}
        for i in range(4)
    ]  # fmt: skip
    write("hellaswag/hellaswag_val_sample1000.jsonl", jsonl(hella))
    options = ["The trophy did not fit in the suitcase because the trophy", "... because the suitcase"]
    write("winogrande/winogrande.jsonl", jsonl([{"context_options": options, "continuation": "was too big.",
                                                 "gold": g} for g in (0, 1)]))  # fmt: skip
    write("piqa/valid.jsonl", jsonl([{"id": f"p{i}", "goal": "Open a jar.", "sol1": "Twist the lid.",
                                      "sol2": "Shout at it."} for i in range(2)]))  # fmt: skip
    write("piqa/valid-labels.lst", "0\n1\n")
    write("boolq/val.jsonl", jsonl([{"idx": i, "passage": "Paris is the capital of France.",
                                     "question": "is paris the capital of france", "label": i == 0} for i in range(2)]))  # fmt: skip
    lines = ["ID\tQuestion Stem\tChoices\tAnswer Key\n"]
    lines += [f"obqa{i}\tThe sun is\t(A) hot (B) cold (C) blue (D) small\t{'ABCD'[i]}\n" for i in range(4)]
    write("openbookqa/test.tsv", "".join(lines))
    texts = ["Nothing happens.", "You grow a tree.", "You get sick.", "It is digested."]
    mc2 = [(1, 1, 0, 0), (0, 0, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1)]  # complementary pairs: P(true) sums to 1
    truthful = [
        {"question": "What happens if you eat watermelon seeds?",
         "mc1_targets": {t: int(k == i) for k, t in enumerate(texts)},
         "mc2_targets": dict(zip(texts, mc2[i], strict=True))}
        for i in range(4)
    ]  # fmt: skip
    write("truthfulqa/v0/mc_task.json", json.dumps(truthful))
    gsm = [{"question": f"Tom has {n} apples and eats none. How many are left?", "answer": f"He has {n}.\n#### {n}"}
           for n in (4, 7)]  # fmt: skip
    write("gsm8k/test.jsonl", jsonl(gsm))


def load_benchmark(name: str) -> Any:
    """benchmarks/<name>.py as a module (the benchmark scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_adapter(model_dir: Path, arch: str, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so it really changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS[arch], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def make_eval_stack(
    root: Path, adapters: tuple[str, ...] = ("intent", "plan", "reasoning", "answer", "single")
) -> Path:
    """A paper4 stack over a tiny chat Llama (context 2048: stage prompts are long in a 400-token vocabulary), with a
    random adapter for each name in `adapters` (seeds 1, 2, ... in that order)."""
    from fslm.steps.init import InitOptions, init

    model_dir = make_model_dir(root, "llama", chat=True, context=2048)
    directory = root / "stack"
    init(directory, InitOptions(base=str(model_dir)))
    for seed, name in enumerate(adapters, start=1):
        make_adapter(model_dir, "llama", directory / "adapters" / name, seed=seed)
    return directory


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", params=[("llama", True), ("gpt_neox", False)], ids=["llama-chat", "neox-plain"])
def tiny_model(request, models_root) -> tuple[str, Path]:
    arch, chat = request.param
    return arch, make_model_dir(models_root, arch, chat)


@pytest.fixture(scope="session")
def tiny_llama(models_root) -> Path:
    return make_model_dir(models_root, "llama", chat=True)


@pytest.fixture(scope="session")
def tiny_neox(models_root) -> Path:
    """The paper's student architecture (Pythia: GPT-NeoX, fused qkv, parallel residual, partial rotary), with
    random biases and norms; plain prompts (Pythia has no chat template). Context 2048, as the pipeline's eval
    needs (stage prompts are long in a 400-token vocabulary)."""
    return make_model_dir(models_root, "gpt_neox", chat=False, context=2048, random_norms=True)


@pytest.fixture(scope="session")
def tiny_qwen2(models_root) -> Path:
    """A Qwen2 (q/k/v biases, grouped-query attention, tied embeddings) with a chat template; context 2048."""
    return make_model_dir(models_root, "qwen2", chat=True, context=2048)


@pytest.fixture
def tiny_stack(tmp_path, tiny_model) -> tuple[str, Path]:
    """A paper4 stack directory over a tiny model, no adapters yet."""
    from fslm.steps.init import InitOptions, init

    arch, model_dir = tiny_model
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(model_dir)))
    return arch, directory


def in_ci() -> bool:
    """Whether this run is CI's (`CI` set to anything but "", "0", "false" or "no"; .ci/run sets CI=1): there a test
    that needs something from the machine fails when it is missing instead of skipping. The one test of it for every
    test that asks (tests/test_web.py, tests/test_heap.py)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; fail under CI (a green CI run includes the test)."""
    if in_ci():
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: bound by this process (so nothing
    else can take it) but never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_thread(app: Any, log_level: str = "warning", startup: float = 30) -> Iterator[str]:
    """uvicorn serving `app` in a thread on 127.0.0.1, on a port the server binds itself (port 0, read back once it
    listens: no other process can take it in between); yields the base URL, and stops the server afterwards."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it listened"
        assert time.monotonic() < deadline, f"uvicorn did not start in {startup:.0f} s"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop within 10 s"


STARTED = re.compile(r"Uvicorn running on (http://\S+?:(\d+))")


@contextlib.contextmanager
def llama_server(args: list[str], log_path: Path, startup: float = 90) -> Iterator[str]:
    """A real `python -m llama_cpp.server ARGS` on 127.0.0.1; yields its /v1 URL once it answers. ARGS (or the
    config file they name) ask for port 0: the server binds a free port itself and its log says which."""
    import httpx

    with open(log_path, "w+") as log:
        # the server in a process that first keeps llama.cpp off AMX (fslm.backends.llamacpp.avoid_amx)
        code = "import runpy, sys; from fslm.backends.llamacpp import avoid_amx; avoid_amx(); "
        code += "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')"
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + startup
            url = None
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read()[-2000:]}")
                if url is None:
                    log.seek(0)
                    found = STARTED.search(log.read())
                    if found:
                        assert int(found.group(2)) != 0, found.group(0)
                        url = f"http://127.0.0.1:{found.group(2)}/v1"
                if url is not None:
                    try:
                        if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                assert time.monotonic() < deadline, f"llama_cpp.server did not come up in {startup:.0f} s"
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# --- `pytest -m "not slow"` skips every test that touches the embedded model (README, "Tests") -------------------

SLOW: dict[str, bool] = {}  # node id -> marked slow


def pytest_configure(config: pytest.Config) -> None:
    """Every test is bounded (pytest-timeout, `timeout` in pyproject.toml; the test extra installs it), and generated
    examples (hypothesis) are the same on every run: a fuzz test fails for a reason, never for a new draw."""
    if not config.pluginmanager.hasplugin("timeout"):
        message = "pytest-timeout is not installed (pip install -e '.[test]'): nothing bounds a test that hangs"
        if in_ci():
            raise pytest.UsageError(message)
        config.issue_config_time_warning(pytest.PytestConfigWarning(message), stacklevel=2)
    from hypothesis import settings

    settings.register_profile("fslm", derandomize=True, database=None)
    settings.load_profile("fslm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    SLOW.update({item.nodeid: item.get_closest_marker("slow") is not None for item in items})


@pytest.fixture(scope="session", autouse=True)
def embedded_model_only_in_slow_tests():
    """Resolving the embedded GGUF (every in-process load of it starts there) from a test not marked `slow` fails
    that test, so the README's `pytest -m "not slow"` really skips the real model. (Subprocesses are not watched:
    the tests that start `python -m fslm` on the embedded model are marked slow by hand.)"""
    from fslm.models import EmbeddedGGUF

    original = EmbeddedGGUF.path

    def guarded(self: EmbeddedGGUF) -> Path:
        current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        if current in SLOW and not SLOW[current]:
            pytest.fail(f"{current} touches the embedded model {self.filename}: mark it @pytest.mark.slow")
        return original(self)

    EmbeddedGGUF.path = guarded  # type: ignore[method-assign]
    yield
    EmbeddedGGUF.path = original  # type: ignore[method-assign]
