"""Documented features that no other test ran (issue 31): each test names the page that promises the behaviour and
fails when the behaviour is taken away. Tiny random models, a few records each.

README: `fslm run --system single|base`. docs/eval.md: `loglikelihood_rolling`, `--stage-backend openai`,
`FSLM_DATA_DIR` with `fslm lm-eval`. docs/train.md: `--answer-inputs teacher|mix`, `--keep-checkpoints`,
`--scheduler`, `--val-fraction`, `--max-length`. docs/serve.md: `FSLM_API_KEY`, `--max-batch`, `--backend llamacpp`
on a stale export, a too-long request failing alone. docs/distill.md: GSM8K answer checks, sampled chains
(temperature, identical chains dropped), chains on one side of the validation split, a shared `--cache`.
docs/export.md: `--quant q4_1`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_adapter, make_benchmark_dir, make_eval_stack, make_model_dir, uvicorn_thread
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import load_config, save_config
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps.init import InitOptions, init
from fslm.steps.serve import run_server as RUN_SERVER

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
runner = CliRunner()


def _loglikelihood(*args):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=args, idx=0)


def _rolling(text: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)


@pytest.fixture(scope="module")
def eval_stack(tmp_path_factory) -> Path:
    """paper4 over a tiny chat Llama, a random adapter for every stage and `single`."""
    return make_eval_stack(tmp_path_factory.mktemp("documented-eval"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_benchmark_dir(tmp_path_factory.mktemp("documented-data"))


# --- README: fslm run --system single|base -----------------------------------------------------------------------


def test_run_system_single_and_base_answer_directly(eval_stack):
    """`fslm run DIR "..." --system single|base`: one direct step, with the single adapter or on the bare base."""
    stack = Stack.load(eval_stack)
    question = "Name a colour."
    answers = {}
    for system, adapter in (("single", "single"), ("base", None)):
        r = runner.invoke(
            app, ["run", str(eval_stack), question, "--system", system, "--json", "--max-new-tokens", "4"]
        )
        assert r.exit_code == 0, r.output
        trace = json.loads(r.stdout)
        assert [(s["name"], s["adapter"]) for s in trace["stages"]] == [(system, adapter)]
        (expected,) = stack.answer([question], system, max_new_tokens=4)
        assert trace["answer"] == expected.answer and trace["stages"][0]["output"] == expected.answer
        answers[system] = trace["answer"]
    assert answers["single"] != answers["base"]  # the adapter really answered
    stack_trace = json.loads(
        runner.invoke(app, ["run", str(eval_stack), question, "--json", "--max-new-tokens", "4"]).stdout
    )
    assert len(stack_trace["stages"]) == 4  # without --system: the whole stack


# --- docs/eval.md -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", ["base", "single", "stack"])
def test_loglikelihood_rolling_is_lm_evals_on_the_final_adapter(tmp_path_factory, system):
    """docs/eval.md: `loglikelihood_rolling` scores raw text with lm-eval's rolling windows on the final stage's
    adapter (bare base for `base`, the single adapter for `single`), no stage prompt. The reference is lm-eval's own
    HFLM on the same model with the same adapter (peft=), over a text three context windows long."""
    from lm_eval.models.huggingface import HFLM

    from fslm.steps.evaluate.lm_eval_model import FslmLM

    root = tmp_path_factory.mktemp(f"rolling-{system}")
    model_dir = make_model_dir(root, "llama", chat=True, context=128)
    init(root / "stack", InitOptions(base=str(model_dir)))
    for seed, name in ((1, "answer"), (2, "single")):
        make_adapter(model_dir, "llama", root / "stack" / "adapters" / name, seed=seed)
    stack = Stack.load(root / "stack")
    text = " ".join(["The sun heats the water and the plant grows in the rain."] * 30)
    assert len(stack.backend.tokenizer.encode(text)) > 2 * stack.backend.context_length  # several windows
    ours = FslmLM(stack, system=system).loglikelihood_rolling([_rolling(text), _rolling("Paris is in France.")])
    adapter = {"base": None, "single": "single", "stack": "answer"}[system]
    kwargs = {"peft": str(root / "stack" / "adapters" / adapter)} if adapter else {}
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1, **kwargs)
    theirs = lm.loglikelihood_rolling([_rolling(text), _rolling("Paris is in France.")], disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-3)
    if system != "base":  # the adapter matters: the bare base gives other numbers
        bare = FslmLM(stack, system="base").loglikelihood_rolling([_rolling(text)])
        assert abs(bare[0] - ours[0]) > 1.0


def _fake_completions_server() -> tuple[object, list[dict]]:
    """An OpenAI-compatible /v1/completions that answers `<model> wrote <hash of the prompt>` and logs every body."""
    from fastapi import FastAPI

    asked: list[dict] = []
    server = FastAPI()

    @server.post("/v1/completions")
    async def completions(body: dict) -> dict:
        asked.append(body)
        text = f" {body['model']} wrote {hashlib.sha256(body['prompt'].encode()).hexdigest()[:8]}"
        return {
            "id": f"cmpl-{len(asked)}",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }

    return server, asked


def test_eval_stage_backend_openai_generates_the_stages_on_the_server(eval_stack, data_dir, tmp_path):
    """docs/eval.md: `fslm eval --stage-backend openai` sends stages 1..N-1 to the server of `base.server` (each
    trained stage under its served name) while the final stage scores on PyTorch; results.json names the backend."""
    import shutil

    from fslm.config import ServerSettings

    directory = tmp_path / "stack"
    shutil.copytree(eval_stack, directory)
    server, asked = _fake_completions_server()
    with uvicorn_thread(server) as url:
        config = load_config(directory)
        names = ["intent", "plan", "reasoning", "answer", "single"]
        config.base.server = ServerSettings(url=f"{url}/v1", models={n: f"served-{n}" for n in names}, max_retries=0)
        save_config(config, directory)  # base.backend stays torch: the final stage scores on PyTorch
        report = tmp_path / "report"
        args = ["eval", str(directory), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "2"]
        args += ["--systems", "stack", "--out", str(report), "--stage-tokens", "3", "--stage-backend", "openai"]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    results = json.loads((report / "results.json").read_text())
    assert results["stage_backend"] == "openai" and results["systems"]["stack"]["stage_backend"] == "openai"
    logged = [json.loads(x) for x in (report / "systems" / "stack.stages.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    by_model = {}
    for body in asked:
        by_model.setdefault(body["model"], []).append(body)
        assert body["max_tokens"] == 3
    assert sorted(by_model) == ["served-intent", "served-plan", "served-reasoning"]  # the final stage never
    for chain in logged:
        for stage in ("intent", "plan", "reasoning"):
            sent = [b["prompt"] for b in by_model[f"served-{stage}"] if chain["context"].strip() in b["prompt"]]
            assert len(sent) == 1  # one request per question and stage
            assert chain["outputs"][stage] == f"served-{stage} wrote {hashlib.sha256(sent[0].encode()).hexdigest()[:8]}"
        # a later stage's prompt holds what the server wrote for the earlier one
        plan_prompt = next(b["prompt"] for b in by_model["served-plan"] if chain["context"].strip() in b["prompt"])
        assert chain["outputs"]["intent"] in plan_prompt


def test_lm_eval_reads_the_data_directory_from_fslm_data_dir(eval_stack, data_dir, tmp_path):
    """docs/eval.md: with `fslm lm-eval`, the tasks find their files through `--metadata '{"data_dir": ...}'` or
    `FSLM_DATA_DIR`; here only the variable says where."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fslm", "lm-eval", "--model", "fslm"]
    cmd += [
        "--model_args",
        f"stack={eval_stack},system=base",
        "--tasks",
        "fslm_arc_easy",
        "--limit",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {**ENV, "FSLM_DATA_DIR": str(data_dir)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples_file,) = out.rglob("samples_fslm_arc_easy_*.jsonl")
    samples = [json.loads(x) for x in samples_file.read_text().splitlines()]
    assert sorted(s["doc"]["id"] for s in samples) == ["Easy0", "Easy1"]  # the items of FSLM_DATA_DIR's file


# --- docs/train.md ----------------------------------------------------------------------------------------------


def _distilled(path: Path, n: int = 10, long_every: int = 0) -> Path:
    rows = []
    for i in range(n):
        answer = " ".join(["water"] * 120) if long_every and i % long_every == 0 else f"answer {i}"
        targets = {"intent": f"wants {i}", "plan": "1. think", "reasoning": f"fact {i}", "answer": answer}
        rows.append({"id": f"r{i}", "instruction": f"Question {i}?", "targets": targets})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def train_stack(tmp_path, tiny_llama) -> tuple[Path, Path]:
    """A tiny stack whose stages write at most 4 tokens (the student's outputs are quick), and 10 records."""
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    config = load_config(directory)
    for stage in config.stages:
        stage.generation.max_new_tokens = 4
    save_config(config, directory)
    return directory, _distilled(tmp_path / "d.jsonl")


def test_answer_inputs_teacher_and_mix(train_stack, tiny_llama):
    """docs/train.md: `--answer-inputs teacher` trains the final stage on the distilled targets even when every
    earlier stage is trained (auto would take the student's outputs); `mix` trains on both versions of each record."""
    directory, data = train_stack
    for seed, name in enumerate(("intent", "plan", "reasoning"), start=1):  # trained earlier stages
        make_adapter(tiny_llama, "llama", StackDir(directory).adapter(name), seed=seed)
    common = ["train", str(directory), "--data", str(data), "--stages", "answer", "--max-steps", "1"]
    common += ["--batch-size", "2", "--val-fraction", "0.2", "--student-backend", "torch"]
    r = runner.invoke(app, [*common, "--answer-inputs", "teacher"])
    assert r.exit_code == 0, r.output
    record = load_config(directory).final_stage.training
    assert record.model_extra["answer_inputs"] == "teacher" and record.model_extra.get("student") is None
    assert (record.examples, record.val_examples) == (8, 2)  # one example per record: the teacher's chain
    assert not (directory / ".fslm-cache" / "student.jsonl").exists()  # no student output was generated
    r = runner.invoke(app, [*common, "--answer-inputs", "mix"])
    assert r.exit_code == 0, r.output
    record = load_config(directory).final_stage.training
    assert record.model_extra["answer_inputs"] == "mix" and record.model_extra["student"]["generated"] == 10
    assert (record.examples, record.val_examples) == (16, 4)  # the teacher's chain and the student's, per record


def test_keep_checkpoints_scheduler_and_val_fraction(train_stack):
    """docs/train.md: `--keep-checkpoints` keeps DIR/.fslm-train/ after a finished run (it is removed otherwise);
    `--scheduler` and `--val-fraction` are what the run used (recorded, and the held-out share)."""
    directory, data = train_stack
    common = ["train", str(directory), "--data", str(data), "--stages", "intent", "--max-steps", "2"]
    common += ["--batch-size", "2", "--save-steps", "1"]
    r = runner.invoke(app, [*common, "--scheduler", "linear", "--val-fraction", "0.3", "--keep-checkpoints"])
    assert r.exit_code == 0, r.output
    state = StackDir(directory).train_state
    assert sorted(p.name for p in (state / "intent").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    record = load_config(directory).stage("intent").training
    assert record.scheduler == "linear"
    assert (record.examples, record.val_examples) == (7, 3)  # 30 % of 10 records held out
    r = runner.invoke(app, [*common, "--val-fraction", "0", "--fresh"])
    assert r.exit_code == 0, r.output
    assert not state.exists()  # the default: checkpoints removed once every adapter is written
    record = load_config(directory).stage("intent").training
    assert (record.examples, record.val_examples, record.val_loss) == (10, 0, None) and record.scheduler == "cosine"


def test_scheduler_shapes_the_learning_rate(train_stack):
    """docs/train.md: `--scheduler cosine|linear|constant_with_warmup` (warm-up 0 here): the learning rate of each
    step (the Trainer logs the rate the next step will use) follows the named schedule."""
    from fslm.steps.train import TrainOptions, train

    directory, data = train_stack
    rates = {}
    for scheduler in ("constant_with_warmup", "linear"):  # (cosine, the default, in the test above)
        options = TrainOptions(
            stages=["intent"], max_steps=3, batch_size=2, lr=1e-3, warmup=0, scheduler=scheduler, val_fraction=0
        )
        history = train(directory, data, options).adapters["intent"].log_history
        rates[scheduler] = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert rates["constant_with_warmup"] == pytest.approx([1e-3] * 3)
    assert rates["linear"] == pytest.approx([1e-3 * (1 - t / 3) for t in range(3)])  # falls to 0 by equal steps


def test_max_length_skips_longer_examples(tmp_path, train_stack):
    """docs/train.md: `--max-length N` skips examples longer than N tokens (prompt + target), with a warning."""
    directory, _ = train_stack
    data = _distilled(tmp_path / "long.jsonl", long_every=2)  # every other answer is 120 words long
    stack = Stack.load(directory)
    tok = stack.backend.tokenizer

    def length(i: int, answer: str) -> int:
        outputs = {"intent": f"wants {i}", "plan": "1. think", "reasoning": f"fact {i}"}
        prompt = stack.render_prompt("answer", f"Question {i}?", None, outputs=outputs)
        return len(stack.backend.encode(prompt)) + len(tok(answer, add_special_tokens=False)["input_ids"]) + 1

    rows = [json.loads(x) for x in data.read_text().splitlines()]
    lengths = [length(i, r["targets"]["answer"]) for i, r in enumerate(rows)]
    short, long = max(lengths[1::2]), min(lengths[0::2])
    assert short < long <= stack.backend.context_length  # every example fits the context: only the flag cuts
    common = ["train", str(directory), "--data", str(data), "--stages", "answer", "--max-steps", "1"]
    common += ["--batch-size", "2", "--val-fraction", "0", "--answer-inputs", "teacher"]
    r = runner.invoke(app, common)
    assert r.exit_code == 0, r.output
    assert load_config(directory).final_stage.training.examples == 10
    r = runner.invoke(app, [*common, "--max-length", str((short + long) // 2)])
    assert r.exit_code == 0, r.output
    assert load_config(directory).final_stage.training.examples == 5  # the 5 long answers skipped
    assert "longer than the limit" in r.output


# --- docs/serve.md ----------------------------------------------------------------------------------------------


def _serve_cli(monkeypatch, *args: str) -> tuple[object, object]:
    """`fslm serve ARGS` with uvicorn's Server.run replaced: the (app, options) it would serve."""
    import uvicorn

    from fslm.steps import serve as serve_module

    seen: dict[str, object] = {}

    def capture(stack, options, **kwargs):
        seen["options"] = options
        # the server binds its socket first, then runs uvicorn on it: keep the app it would serve instead (only
        # here: the test's own uvicorn_thread runs a real Server afterwards)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(uvicorn.Server, "run", lambda server, **_: seen.setdefault("app", server.config.app))
            RUN_SERVER(stack, options, **kwargs)

    monkeypatch.setattr(serve_module, "run_server", capture)
    r = runner.invoke(app, ["serve", *args])
    assert r.exit_code == 0, r.output
    return seen["app"], seen["options"]


def test_serve_takes_the_api_key_from_fslm_api_key(tmp_path, tiny_llama, monkeypatch):
    """docs/serve.md: `FSLM_API_KEY=secret fslm serve DIR` requires `Authorization: Bearer secret`."""
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    monkeypatch.setenv("FSLM_API_KEY", "s3cret")
    served, _ = _serve_cli(monkeypatch, str(directory))
    with uvicorn_thread(served) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "stack"
        assert httpx.get(f"{url}/health").status_code == 200  # never needs the key
    monkeypatch.delenv("FSLM_API_KEY")
    served, _ = _serve_cli(monkeypatch, str(directory))
    with uvicorn_thread(served) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200  # no key set: open


def test_max_batch_bounds_the_rows_generated_together(tmp_path, tiny_llama, monkeypatch):
    """docs/serve.md: `--max-batch N`: at most N requests run a stage together, the rest in the next batch."""
    from fake_backend import fake_stack, running

    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    _, options = _serve_cli(monkeypatch, str(directory), "--max-batch", "2")
    assert options.max_batch == 2
    stack = fake_stack()
    backend = stack.backend
    backend.gate.clear()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with running(stack, options) as url:
        first = threading.Thread(target=httpx.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": body})
        first.start()
        assert backend.entered.wait(20)  # the worker holds request 0 in its first stage
        threads = [
            threading.Thread(
                target=httpx.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": body, "timeout": 30}
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        release_when_queued(url, 5, backend.gate)
        for t in [first, *threads]:
            t.join(30)
        assert not any(t.is_alive() for t in [first, *threads])
    sizes = [rows for _, rows, _ in backend.calls]
    assert max(sizes) == 2 and sum(sizes) == 5 * 4  # 5 requests x 4 stages, never more than 2 rows at once


def release_when_queued(url: str, queued: int, gate: threading.Event, seconds: float = 30) -> None:
    """Wait until the server reports `queued` requests (the held one included), then open `gate`, whatever happens."""
    deadline = time.monotonic() + seconds
    try:
        while httpx.get(f"{url}/health").json()["queued"] < queued:
            assert time.monotonic() < deadline, f"{queued} requests did not queue within {seconds:.0f} s"
            time.sleep(0.05)
    finally:
        gate.set()


def test_serve_backend_llamacpp_refuses_a_stale_export(tmp_path, tiny_llama, monkeypatch):
    """docs/serve.md: `--backend llamacpp` insists on the export and fails on a stale one (auto falls back)."""
    from fslm.steps import serve as serve_module
    from fslm.steps.export import export_gguf

    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("intent"), seed=1)
    export_gguf(directory, "f32")
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("intent"), seed=2)  # retrained: stale export
    served: list[str] = []
    monkeypatch.setattr(serve_module, "run_server", lambda stack, **_: served.append(stack.backend.name))
    r = runner.invoke(app, ["serve", str(directory), "--backend", "llamacpp"])
    assert r.exit_code == 2 and "fslm export" in r.output and "Traceback" not in r.output
    assert served == []  # nothing was served
    r = runner.invoke(app, ["serve", str(directory)])
    assert r.exit_code == 0 and served == ["torch"]


def test_a_too_long_request_fails_alone_and_its_batch_mates_rerun(tmp_path, models_root):
    """docs/serve.md: a request whose prompt does not fit the context fails alone (400); its batch-mates are re-run
    without it and get the answers they get alone."""
    from test_serve import Gate, running, tiny_stack_dir

    stack = Stack.load(tiny_stack_dir(tmp_path, make_model_dir(models_root, "llama", chat=True)))
    questions = ["What is one plus one?", " ".join(["word"] * 3000), "Name a colour."]  # the middle one: too long
    results: dict[int, httpx.Response] = {}
    with running(stack) as url, Gate(stack) as gate:
        gate.open.clear()

        def ask(i: int, text: str) -> None:
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3}
            results[i] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

        holder = threading.Thread(target=ask, args=(-1, "Hold the worker."))
        holder.start()
        assert gate.entered.wait(20)
        threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(questions)]
        for t in threads:
            t.start()
        release_when_queued(url, 4, gate.open)
        for t in [holder, *threads]:
            t.join(60)
        assert not any(t.is_alive() for t in [holder, *threads])
    first = stack.config.stage_names[0]
    assert (first, 3) in gate.calls  # the three ran their first stage as one batch, which the long one failed
    assert results[1].status_code == 400 and "context" in results[1].json()["error"]["message"]
    for i in (0, 2):
        assert results[i].status_code == 200, results[i].text
        assert results[i].json()["choices"][0]["message"]["content"] == stack.run(questions[i], max_new_tokens=3).answer


# --- docs/distill.md --------------------------------------------------------------------------------------------


class RecordingTeacher:
    """A scripted teacher: earlier stages write notes (seeded text when sampled, except for questions in
    `stubborn`), the final stage answers from `answers`. Records every request's settings."""

    id = "recording"
    batch_size = 8

    def __init__(self, config, answers: dict[str, str], stubborn: frozenset[str] = frozenset()):
        self.final_role = config.final_stage.role
        self.answers, self.stubborn = answers, stubborn
        self.settings: list = []

    def describe(self):
        return {"backend": "recording", "id": self.id}

    def prompt_key(self, system, user):
        return system + "\n" + user

    def generate(self, requests, settings, on_result=None, label="teacher"):
        from fslm.teachers import TeacherOutput

        outs = []
        for system, user in requests:
            self.settings.append(settings)
            question = next(q for q in self.answers if q in user)
            if system == self.final_role:
                text = self.answers[question]
            elif settings.seed is not None and question not in self.stubborn:
                text = f"notes on {question} (draw {settings.seed})"
            else:
                text = f"notes on {question}"
            outs.append(TeacherOutput(text, 10, 5, True))
            if on_result is not None:
                on_result(len(outs) - 1, outs[-1])
        return outs


@pytest.fixture
def stack_config(tmp_path, tiny_llama):
    init(tmp_path / "stack", InitOptions(base=str(tiny_llama)))
    return load_config(tmp_path / "stack")


def test_gsm8k_answers_are_checked_by_their_final_number(tmp_path, stack_config):
    """docs/distill.md: a GSM8K-style reference (`#### <number>`) is checked: the teacher's own answer must end with
    the gold number (commas ignored), else the record goes to the rejected file as `wrong`."""
    from fslm.data import read_dataset
    from fslm.steps.distill import DistillOptions, distill_records

    gsm = tmp_path / "gsm8k.jsonl"
    items = [("Tom has 4 apples.", "4"), ("A farm has 1234 hens.", "1,234"), ("Sam has 7 pens.", "7")]
    gsm.write_text("".join(json.dumps({"question": q, "answer": f"Count them.\n#### {a}"}) + "\n" for q, a in items))
    dataset = read_dataset(gsm)
    assert dataset.format == "gsm8k"
    answers = {
        "Tom has 4 apples.": "He has 3 + 1 = 4",  # right
        "A farm has 1234 hens.": "There are 1,234 hens, so 1234",  # right, with and without the comma
        "Sam has 7 pens.": "7 pens minus none leaves 8",  # names the gold number, but does not end with it
    }
    teacher = RecordingTeacher(stack_config, answers)
    result = distill_records(stack_config, dataset, teacher, tmp_path / "d.jsonl", options=DistillOptions(filters=()))
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "d.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Tom has 4 apples.", "A farm has 1234 hens."]
    assert [(r["instruction"], r["rejected"]["filter"]) for r in rejected] == [("Sam has 7 pens.", "wrong")]
    assert result.filtered["wrong"] == 1 and result.written == 2
    assert [r["checks"]["correct"] for r in rows] == [True, True]
    assert all(r["targets"]["answer"] == r["reference"] for r in rows)  # the final target is the gold answer


def test_samples_use_the_sample_settings_and_drop_identical_chains(tmp_path, stack_config):
    """docs/distill.md: `--samples K` samples K chains per record with `--sample-temperature`/`--sample-top-p` and
    seeds seed*1000 + k; a chain identical to an earlier one of the same record is dropped."""
    from fslm.data import read_dataset
    from fslm.steps.distill import DistillOptions, distill_records

    data = tmp_path / "d.json"
    questions = ["Explain rain.", "Explain snow.", "Explain wind."]
    data.write_text(json.dumps([{"instruction": q, "output": ""} for q in questions]))
    teacher = RecordingTeacher(
        stack_config, {q: f"answer to {q}" for q in questions}, stubborn=frozenset({questions[1]})
    )
    options = DistillOptions(samples=3, sample_temperature=0.4, sample_top_p=0.8, seed=2, filters=())
    result = distill_records(stack_config, read_dataset(data), teacher, tmp_path / "o.jsonl", options=options)
    assert {(s.temperature, s.top_p) for s in teacher.settings} == {(0.4, 0.8)}
    assert {s.seed for s in teacher.settings} == {2000, 2001, 2002}
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    per_group: dict[str, int] = {}
    for r in rows:
        per_group[r["instruction"]] = per_group.get(r["instruction"], 0) + 1
    assert per_group == {questions[0]: 3, questions[1]: 1, questions[2]: 3}  # the stubborn record's repeats dropped
    assert result.written == 7


def test_sample_flags_reach_the_recipe(tmp_path, tiny_llama):
    """The CLI flags of the above (`--samples`, `--sample-temperature`, `--sample-top-p`) are the run's recipe."""
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"Explain idea {i}.", "output": ""} for i in range(2)]))
    out = tmp_path / "o.jsonl"
    args = ["distill", str(data), "--stack", str(directory), "--out", str(out), "--max-new-tokens", "3"]
    args += ["--filters", "none", "--samples", "2", "--sample-temperature", "0.4", "--sample-top-p", "0.8"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    recipe = json.loads(Path(f"{out}.manifest.json").read_text())["options"]
    assert (recipe["samples"], recipe["temperature"], recipe["top_p"]) == (2, 0.4, 0.8)


def test_a_records_chains_stay_on_one_side_of_the_validation_split():
    """docs/distill.md: `fslm train` keeps a record's sampled chains (one `group`) on the same side of its split."""
    from fslm.distilled import DistilledRecord
    from fslm.steps.train.examples import split_validation

    records = [
        DistilledRecord(id=f"q{g}" + (f"-{k}" if k else ""), instruction=f"Q{g}", input=None, targets={"answer": "a"},
                        extra={"group": f"q{g}"}, line=3 * g + k + 1)
        for g in range(10) for k in range(3)
    ]  # fmt: skip
    for seed in range(5):
        train, val = split_validation(records, 0.2, seed)
        assert len(train) + len(val) == 30 and len(val) == 6  # 2 of 10 groups, each with its 3 chains
        train_groups = {r.extra["group"] for r in train}
        val_groups = {r.extra["group"] for r in val}
        assert not train_groups & val_groups


def test_a_shared_cache_answers_a_second_output(tmp_path, tiny_llama):
    """docs/distill.md: `--cache PATH` puts the teacher cache elsewhere and shares it between outputs: a second
    output of the same prompts asks the teacher nothing."""
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"Explain idea {i}.", "output": ""} for i in range(3)]))
    cache = tmp_path / "shared" / "teacher.cache.jsonl"
    manifests = []
    for name in ("a", "b"):
        out = tmp_path / name / "d.jsonl"
        args = ["distill", str(data), "--stack", str(directory), "--out", str(out), "--max-new-tokens", "3"]
        r = runner.invoke(app, [*args, "--filters", "none", "--cache", str(cache)])
        assert r.exit_code == 0, r.output
        assert not Path(f"{out}.cache.jsonl").exists()  # the cache went where --cache said
        manifests.append(json.loads(Path(f"{out}.manifest.json").read_text()))
    first, second = (m["last_run"] for m in manifests)
    assert first["teacher_calls"] > 0 and first["cache_hits"] == 0
    assert second["teacher_calls"] == 0 and second["cache_hits"] == first["teacher_calls"]
    assert (tmp_path / "a" / "d.jsonl").read_text() == (tmp_path / "b" / "d.jsonl").read_text()


# --- docs/export.md ---------------------------------------------------------------------------------------------


def test_export_quant_q4_1(tmp_path, tiny_llama):
    """docs/export.md: `fslm export DIR --format gguf --quant q4_1` writes the base's matrices as Q4_1 (norms stay
    f32), says so in the manifest, and llama.cpp runs the stack on it."""
    import gguf

    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("answer"), seed=1)
    r = runner.invoke(app, ["export", str(directory), "--format", "gguf", "--quant", "q4_1"])
    assert r.exit_code == 0, r.output
    manifest = json.loads(StackDir(directory).gguf_manifest.read_text())
    assert manifest["base"]["quant"] == "q4_1"
    reader = gguf.GGUFReader(StackDir(directory).gguf / manifest["base"]["file"])
    types = {t.name: t.tensor_type for t in reader.tensors}
    matrices = [n for n, t in types.items() if n.endswith(".weight") and "norm" not in n]
    assert matrices and {types[n] for n in matrices} == {gguf.GGMLQuantizationType.Q4_1}
    assert {types[n] for n in types if "norm" in n} == {gguf.GGMLQuantizationType.F32}
    stack = Stack.load(directory, backend="llamacpp")
    try:
        trace = stack.run("Name a colour.", max_new_tokens=3)
        assert stack.backend.name == "llamacpp" and trace.stages[-1].adapter == "answer"
        assert all(s.output_tokens > 0 for s in trace.stages)
    finally:
        stack.backend.close()
