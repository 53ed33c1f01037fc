"""fslm eval and the lm-eval model `fslm`: offline tasks, caching, base parity, ablation, reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_benchmark_dir, make_eval_stack

from fslm.files import sha256_file

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ["intent", "plan", "reasoning", "answer"]


def _instance(*args):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_benchmark_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def eval_stack(tmp_path_factory) -> Path:
    """A random adapter for every stage and a single-adapter baseline."""
    return make_eval_stack(tmp_path_factory.mktemp("evalstack"))


@pytest.fixture(scope="module")
def stack(eval_stack):
    from fslm.stack import Stack

    return Stack.load(eval_stack)


def _count_generate(stack, monkeypatch) -> list[tuple[str, str | None, int]]:
    """Record (stage label, adapter, number of prompts) of every backend.generate call."""
    calls: list[tuple[str, str | None, int]] = []
    original = stack.backend.generate

    def counting(prompts, adapter, settings, label="", on_text=None):
        calls.append((label, adapter, len(prompts)))
        return original(prompts, adapter, settings, label=label, on_text=on_text)

    monkeypatch.setattr(stack.backend, "generate", counting)
    return calls


def test_loglikelihood_runs_earlier_stages_once_per_context(stack, monkeypatch):
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    calls = _count_generate(stack, monkeypatch)
    lm = FslmLM(stack, system="stack", stage_tokens=4)
    contexts = [f"Question: what is {w}?\nAnswer:" for w in ("red", "blue", "green")]
    requests = [_instance(c, f" choice {k}") for c in contexts for k in range(4)]
    scores = lm.loglikelihood(requests)
    assert len(scores) == 12 and all(s < 0 for s, _ in scores)
    per_stage = {}
    for label, _, n in calls:
        per_stage[label] = per_stage.get(label, 0) + n
    assert per_stage == {"intent": 3, "plan": 3, "reasoning": 3}  # not 12, and the final stage only scores
    assert lm.stage_calls == 3
    lm.loglikelihood(requests[:4])  # the same context again: served from the cache
    assert lm.stage_calls == 3 and sum(n for _, _, n in calls) == 9


def test_base_scores_equal_plain_transformers(stack, eval_stack):
    """system=base scores the raw context + continuation like lm-eval's hf model, at any batch size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fslm.config import load_config
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"), ("The sky is", " blue because")]
    pairs += [("Give three tips ", "for staying healthy.")]  # trailing space moves to the continuation
    model_dir = Path(load_config(eval_stack).base.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
        whole = tok.encode(context + continuation)
        n_ctx = len(tok.encode(context))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        target = whole[n_ctx:]
        lp = logprobs[n_ctx - 1 : len(whole) - 1]
        expected.append(
            (
                float(lp.gather(1, torch.tensor(target)[:, None]).sum()),
                bool((lp.argmax(-1) == torch.tensor(target)).all()),
            )
        )
    for batch_size in (1, 8):
        got = FslmLM(stack, system="base", batch_size=batch_size).loglikelihood([_instance(*p) for p in pairs])
        for (g, g_greedy), (e, e_greedy) in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-4)
            assert g_greedy == e_greedy


def test_ablate_runs_that_stage_on_the_bare_base(stack, monkeypatch):
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    full = FslmLM(stack, system="stack", stage_tokens=4)
    assert full.adapters == {s: s for s in STAGES}
    ablated = FslmLM(stack, system="stack", ablate="plan", stage_tokens=4)
    assert ablated.adapters == {"intent": "intent", "plan": None, "reasoning": "reasoning", "answer": "answer"}
    calls = _count_generate(stack, monkeypatch)
    ablated.loglikelihood([_instance("Question: why?\nAnswer:", " because")])
    assert [(label, adapter) for label, adapter, _ in calls] == [
        ("intent", "intent"),
        ("plan", None),
        ("reasoning", "reasoning"),
    ]
    # ablating the final stage scores with the bare base: the score changes
    req = [_instance("Question: why?\nAnswer:", " because")]
    with_answer = FslmLM(stack, system="stack", stage_tokens=4).loglikelihood(req)[0][0]
    without = FslmLM(stack, system="stack", ablate="answer", stage_tokens=4).loglikelihood(req)[0][0]
    assert with_answer != pytest.approx(without, abs=1e-6)


def test_generate_until_honours_until_and_max_gen_toks(stack, monkeypatch):
    from lm_eval.api.instance import Instance

    from fslm.steps.evaluate.lm_eval_model import FslmLM

    lm = FslmLM(stack, system="base")
    ctx = "Question: What is the capital of France?\nAnswer:"
    produced = []
    original = stack.backend.generate

    def recording(prompts, adapter, settings, label="", on_text=None):
        out = original(prompts, adapter, settings, label=label, on_text=on_text)
        produced.extend(c.output_tokens for c in out)
        return out

    monkeypatch.setattr(stack.backend, "generate", recording)

    def gen(**kwargs):
        return lm.generate_until([Instance("generate_until", {}, (ctx, kwargs), 0)])[0]

    free = gen(until=[], max_gen_toks=12)
    assert produced == [12] and len(free.strip()) > 4  # a random model never stops early by itself
    stop = free.strip()[2:4]
    cut = gen(until=[stop], max_gen_toks=12)
    assert stop not in cut and free.strip().startswith(cut.strip())


def test_subset_is_fixed_by_seed(data_dir):
    from fslm.steps.evaluate.tasks.utils import arc_easy

    def ids(seed):
        return arc_easy(data_dir=str(data_dir), subset=5, seed=seed)["test"]["id"]

    assert ids(1) == ids(1) and len(ids(1)) == 5
    assert ids(1) != ids(2)
    assert len(arc_easy(data_dir=str(data_dir))["test"]) == 14


def test_lm_eval_wrapper_runs_a_shipped_task(eval_stack, stack, data_dir, tmp_path):
    """`fslm lm-eval --model fslm` = lm-eval's own CLI with our model and the offline tasks registered: the 3 items
    lm-eval logs are the first 3 of the test data, their scores are the stack's own (the same requests scored in
    this process by `FslmLM`), and the accuracy is lm-eval's count of them."""
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fslm", "lm-eval", "--model", "fslm"]
    cmd += ["--model_args", f"stack={eval_stack},system=stack,stage_tokens=4", "--tasks", "fslm_arc_easy"]
    cmd += ["--limit", "3", "--metadata", json.dumps({"data_dir": str(data_dir)}), "--output_path", str(out)]
    cmd += ["--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    result = json.loads(result_file.read_text())["results"]["fslm_arc_easy"]
    (samples_file,) = out.rglob("samples_fslm_arc_easy_*.jsonl")
    samples = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == ["Easy0", "Easy1", "Easy2"]  # the test data's first 3 items
    lm = FslmLM(stack, system="stack", stage_tokens=4)
    for sample in samples:
        requests = [_instance(*args.values()) for args in sample["arguments"].values()]
        assert len(requests) == 4 and "What is easy item" in requests[0].args[0]
        expected = [score for score, _ in lm.loglikelihood(requests)]
        logged = [float(r[0][0]) for r in sample["resps"]]
        assert logged == pytest.approx(expected, rel=1e-5, abs=1e-4), sample["doc_id"]
        right = max(range(4), key=lambda k: expected[k]) == sample["target"]
        assert sample["acc"] == float(right)
    assert result["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / 3)
    assert "acc_norm,none" in result


def test_fslm_eval_writes_the_report(eval_stack, data_dir, tmp_path):
    from typer.testing import CliRunner

    from fslm.cli import app

    report = tmp_path / "report"
    args = ["eval", str(eval_stack), "--tasks", "arc_easy,mmlu", "--data-dir", str(data_dir), "--limit", "10"]
    args += ["--systems", "base,single,stack", "--out", str(report), "--stage-tokens", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((report / "results.json").read_text())
    assert list(data["systems"]) == ["base", "single", "stack"]
    for system in data["systems"].values():
        assert set(system["tasks"]) == {"arc_easy", "mmlu"}
        assert all(
            t["n"] == 10 and 0 <= t["accuracy"] <= 1 and t["stderr"] is not None for t in system["tasks"].values()
        )
        assert system["seconds_per_query"] > 0 and system["peak_rss_mb"] > 0 and system["parameters_per_query"] > 0
    assert data["systems"]["stack"]["earlier_stage_runs"] == 20  # 10 contexts per task, not one per choice
    assert data["systems"]["base"]["parameters_per_query"] < data["systems"]["stack"]["parameters_per_query"]
    assert data["seed"] == 1234 and set(data["data_hashes"]) == {"arc_easy", "mmlu"} and data["versions"]["lm_eval"]
    assert "| single |" in (report / "report.md").read_text()
    assert (report / "accuracy_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stack_options_keep_other_rows_and_stage_texts_resume(eval_stack, data_dir, tmp_path, monkeypatch):
    """A stack-only option (--stage-tokens) recomputes only the stack row; a stack row lost before it was saved
    (a kill) resumes from the stage texts its run had appended, generating none of them again."""
    from fslm.steps.evaluate import EvalOptions, evaluate, lm_eval_model

    report = tmp_path / "report"
    options = dict(tasks=["arc_easy"], data_dir=data_dir, limit=4, systems=["base", "stack"], stage_backend="torch")
    first = evaluate(eval_stack, report, EvalOptions(**options, stage_tokens=2)).results
    saved = report / "systems"
    base_file = (saved / "base.json").stat().st_mtime_ns
    stages_log = saved / "stack.stages.jsonl"
    lines = [json.loads(line) for line in stages_log.read_text().splitlines()]
    assert len(lines) == 4 and {line["chain"] for line in lines} == {None}
    assert set(lines[0]["outputs"]) == {"intent", "plan", "reasoning"}

    calls = []
    original = lm_eval_model.run_stages
    monkeypatch.setattr(lm_eval_model, "run_stages", lambda s, c, *a: calls.append(len(c)) or original(s, c, *a))
    second = evaluate(eval_stack, report, EvalOptions(**options, stage_tokens=3)).results
    assert (saved / "base.json").stat().st_mtime_ns == base_file  # reused: base reads no stage option
    assert second["systems"]["base"] == first["systems"]["base"] and sum(calls) == 4  # the stack row re-ran
    assert len(stages_log.read_text().splitlines()) == 4  # the stage_tokens=2 texts were dropped, not mixed in

    (saved / "stack.json").unlink()  # as if the run was killed after its stages, before the row was saved
    third = evaluate(eval_stack, report, EvalOptions(**options, stage_tokens=3)).results
    assert sum(calls) == 4  # every chain came back from the log
    resumed = third["systems"]["stack"]
    assert resumed["stage_chains_resumed"] == 4 and resumed["items"] == second["systems"]["stack"]["items"]
    assert resumed["stage_seconds"] == pytest.approx(second["systems"]["stack"]["stage_seconds"], abs=0.01)


def test_a_gate_row_borrows_the_chain_rows_stage_texts(eval_stack, data_dir, tmp_path, monkeypatch):
    """--chains-from: a gate eval after the chain eval takes its greedy stage texts instead of generating them again
    (their seconds count in the gate row), and only those generated the same way (here: the stage budget)."""
    from fslm.steps.evaluate import EvalOptions, evaluate, lm_eval_model

    options = dict(tasks=["arc_easy"], data_dir=data_dir, limit=4, systems=["stack"], stage_backend="torch")
    chain = evaluate(eval_stack, tmp_path / "chain", EvalOptions(**options, stage_tokens=3)).results
    calls = []
    original = lm_eval_model.run_stages
    monkeypatch.setattr(lm_eval_model, "run_stages", lambda s, c, *a: calls.append(len(c)) or original(s, c, *a))
    gate = dict(options, stack_scoring="gate", gate_threshold=1.0, chains_from=tmp_path / "chain")  # all unsure
    row = evaluate(eval_stack, tmp_path / "gate", EvalOptions(**gate, stage_tokens=3)).results["systems"]["stack"]
    assert calls == [] and row["stage_chains_borrowed"] == 4
    mine, theirs = row["items"]["arc_easy"], chain["systems"]["stack"]["items"]["arc_easy"]
    assert {k: mine[k] for k in theirs} == theirs and mine["chained"] == [1] * 4  # every answer through its chain
    assert row["stage_seconds"] == pytest.approx(chain["systems"]["stack"]["stage_seconds"], abs=0.01)
    other = evaluate(eval_stack, tmp_path / "gate2", EvalOptions(**gate, stage_tokens=2)).results["systems"]["stack"]
    assert sum(calls) == 4 and "stage_chains_borrowed" not in other  # another budget: generated anew


def test_ablated_rows_borrow_the_chain_up_to_the_ablated_stage(eval_stack, data_dir, tmp_path, monkeypatch):
    """--ablate with --chains-from: a row with stage k on the bare base runs the chain's stages before k exactly as
    the un-ablated chain did, so it takes their texts from it and generates from stage k on (the answer's ablation
    generates nothing); the first stage's ablation borrows nothing."""
    from fslm.steps.evaluate import EvalOptions, evaluate, lm_eval_model

    options = dict(tasks=["arc_easy"], data_dir=data_dir, limit=4, systems=["stack"], stage_backend="torch")
    chain = evaluate(eval_stack, tmp_path / "chain", EvalOptions(**options, stage_tokens=3)).results
    lent = {json.loads(line)["context"]: json.loads(line)["outputs"]
            for line in (tmp_path / "chain" / "systems" / "stack.stages.jsonl").read_text().splitlines()}  # fmt: skip
    calls: list[tuple[int, list[str] | None]] = []
    original = lm_eval_model.run_stages

    def spy(stack, contexts, adapters, n, update, given=None):
        calls.append((len(contexts), sorted(given[0]) if given else None))
        return original(stack, contexts, adapters, n, update, given)

    monkeypatch.setattr(lm_eval_model, "run_stages", spy)
    ablate = dict(options, ablate=True, chains_from=tmp_path / "chain", stage_tokens=3)
    result = evaluate(eval_stack, tmp_path / "ablate", EvalOptions(**ablate)).results["systems"]
    # the stack row and the answer's ablation borrow whole chains; intent generates all; plan and reasoning the rest
    assert calls == [(4, None), (4, ["intent"]), (4, ["intent", "plan"])]
    assert result["stack"]["stage_chains_borrowed"] == result["stack-ablate-answer"]["stage_chains_borrowed"] == 4
    assert result["stack"]["items"] == chain["systems"]["stack"]["items"]
    for stage, shared in (("plan", ["intent"]), ("reasoning", ["intent", "plan"])):
        row = result[f"stack-ablate-{stage}"]
        assert row["stage_prefixes_borrowed"] == 4 and "stage_chains_borrowed" not in row
        written = [json.loads(line) for line in (tmp_path / "ablate" / "systems" / f"stack-ablate-{stage}.stages.jsonl")
                   .read_text().splitlines()]  # fmt: skip
        assert len(written) == 4
        for line in written:  # its log holds the whole chain: the borrowed stages as lent, its own after them
            assert {k: line["outputs"][k] for k in shared} == {k: lent[line["context"]][k] for k in shared}
            assert set(line["outputs"]) == {"intent", "plan", "reasoning"}
    assert "stage_prefixes_borrowed" not in result["stack-ablate-intent"]


def test_given_stage_texts_must_be_the_same_first_stages(eval_stack):
    from fslm.errors import FslmError
    from fslm.stack import Stack

    stack = Stack.load(eval_stack)
    with pytest.raises(FslmError, match="the same first stages"):
        stack.run_batch(["a", "b"], stages=3, given=[{"intent": "x"}, {"plan": "y"}])
    trace = stack.run_batch(["a"], stages=2, max_new_tokens=2, given=[{"intent": "given text"}])[0]
    assert trace.stages[0].output == "given text" and trace.stages[0].seconds == 0 and len(trace.stages) == 2


def test_missing_single_adapter_is_a_clear_error(tmp_path, data_dir, eval_stack):
    import shutil

    from typer.testing import CliRunner

    from fslm.cli import app

    directory = tmp_path / "stack"
    shutil.copytree(eval_stack, directory)
    shutil.rmtree(directory / "adapters" / "single")
    args = ["eval", str(directory), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--systems", "base,single"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert (
        str(directory / "adapters" / "single") in result.output.replace("\n", "") and "Traceback" not in result.output
    )


def test_contamination_warning_when_training_data_overlaps(tmp_path, data_dir, eval_stack):
    import shutil

    from fslm.config import StageTraining, load_config, save_config
    from fslm.steps.evaluate import EvalOptions
    from fslm.steps.evaluate.checks import contamination_warnings

    directory = tmp_path / "stack"
    shutil.copytree(eval_stack, directory)
    train = tmp_path / "train.jsonl"
    rows = [{"instruction": "what is EASY item 3 ?", "output": "x"}, {"instruction": "Unrelated thing.", "output": "y"}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(directory)
    config.stages[0].training = StageTraining(data_file=str(train))
    save_config(config, directory)
    options = EvalOptions(tasks=["arc_easy"], data_dir=data_dir)
    (warning,) = contamination_warnings(directory, options)
    assert "1 of 2" in warning and "arc_easy" in warning
    assert contamination_warnings(directory, EvalOptions(tasks=["mmlu"], data_dir=data_dir)) == []


def test_fslm_eval_keeps_lm_eval_chatter_off_the_screen(eval_stack, data_dir, tmp_path, monkeypatch, capfd):
    """No lm-eval warnings, tqdm bars or git errors (outside a repository) between fslm's own progress bars."""
    import logging

    from fslm.steps.evaluate import EvalOptions, evaluate

    level = logging.getLogger("lm_eval").level
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` would print "fatal: ..."
    options = EvalOptions(tasks=["mmlu"], data_dir=data_dir, systems=["base"], limit=3)
    evaluate(eval_stack, tmp_path / "report", options)
    captured = capfd.readouterr()
    shown = captured.out + captured.err
    assert "Custom kwargs" not in shown and "it/s]" not in shown and "fatal:" not in shown
    assert logging.getLogger("lm_eval").level == level  # restored afterwards


def test_every_offline_task_is_scored(stack, eval_stack, tmp_path, monkeypatch):
    """The eight offline tasks beyond ARC and MMLU, each read from its own file format and scored by lm-eval.

    Each multiple-choice question is written once per gold position (conftest `_more_tasks`), so its accuracy is
    exactly 1/choices for any model, and anything else means the gold was misread. GSM8K's answers are replaced
    after the real generation ran: one right, one wrong, read the way its flexible-extract filter reads them."""
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    data = make_benchmark_dir(tmp_path / "data", every_task=True)
    generate_until = FslmLM.generate_until

    def planted(self, requests, disable_tqdm=False):
        real = generate_until(self, requests, disable_tqdm)
        assert len(real) == len(requests) and all(isinstance(t, str) for t in real)
        return [f"Counting: {3 + 1}." if "4 apples" in r.args[0] else "It must be 5" for r in requests]

    monkeypatch.setattr(FslmLM, "generate_until", planted)
    expect = {  # task: (items, accuracy)
        "hellaswag": (4, 0.25),
        "winogrande": (2, 0.5),
        "piqa": (2, 0.5),
        "boolq": (2, 0.5),
        "openbookqa": (4, 0.25),
        "truthfulqa_mc1": (4, 0.25),
        "truthfulqa_mc2": (4, 0.5),
        "gsm8k": (2, 0.5),
    }
    options = EvalOptions(data_dir=data, tasks=list(expect), systems=["base"], bootstrap=100)
    row = evaluate(eval_stack, tmp_path / "report", options).results["systems"]["base"]
    tasks = row["tasks"]
    for task, (n, accuracy) in expect.items():
        assert tasks[task]["n"] == n and tasks[task]["accuracy"] == pytest.approx(accuracy), (task, tasks[task])
    for task in ("hellaswag", "piqa", "openbookqa"):
        assert tasks[task]["acc_norm"] == pytest.approx(expect[task][1]), task
    assert tasks["gsm8k"]["metric"] == "exact_match (flexible-extract)"
    # TruthfulQA mc2 per item: the probability mass on the true answers (its pairs' complementary labels give 0.5
    # on average whichever way the labels are read, so check each item against the base model's own scores).
    from fslm.steps.evaluate.tasks.utils import truthfulqa, truthfulqa_text

    docs = truthfulqa(data_dir=str(data))["test"]
    expect_mc2 = []
    for doc in docs:
        lls = [ll for ll, _ in FslmLM(stack, system="base").loglikelihood(
            [_instance(truthfulqa_text(doc), " " + c) for c in doc["mc2_choices"]])]  # fmt: skip
        p = [math.exp(ll - max(lls)) for ll in lls]
        true = sum(q for q, label in zip(p, doc["mc2_labels"], strict=True) if label)
        expect_mc2.append(true / sum(p))
    got = row["items"]["truthfulqa_mc2"]
    assert got["ids"] == [d["id"] for d in docs]
    assert got["acc"] == pytest.approx(expect_mc2, abs=1e-3) and len(set(got["acc"])) > 1


def test_eval_ablate_rows_and_resume_after_sigkill(eval_stack, data_dir, tmp_path):
    """`fslm eval --ablate` is SIGKILLed once its first row is saved; the same command then reuses the saved rows
    (their files untouched) and computes only the rest, one `stack-ablate-<stage>` row per stage among them."""
    import signal
    import time

    from typer.testing import CliRunner

    from fslm.cli import app

    report = tmp_path / "report"
    args = ["eval", str(eval_stack), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "4"]
    args += ["--systems", "base,stack", "--ablate", "--stage-tokens", "2", "--stage-backend", "torch"]
    args += ["--out", str(report)]
    rows = ["base", "stack", *(f"stack-ablate-{s}" for s in STAGES)]
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    log = tmp_path / "stderr.log"  # a file, not a pipe: a full pipe would stall the process before its first row
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fslm", *args], env=env, cwd=tmp_path, stderr=stderr)
        deadline = time.monotonic() + 300
        while not (report / "systems" / "base.json").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no row finished in 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    saved = {p.stem: (p.stat().st_mtime_ns, p.read_bytes()) for p in (report / "systems").glob("*.json")}
    assert "base" in saved and set(saved) < set(rows) and not (report / "results.json").exists()

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((report / "results.json").read_text())
    assert list(data["systems"]) == rows
    for name, (mtime, text) in saved.items():  # reused as they were, not evaluated again
        path = report / "systems" / f"{name}.json"
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, text), name
        assert data["systems"][name] == json.loads(text)["result"]
    full = data["systems"]["stack"]
    assert full["ablated_stage"] is None and full["adapters"] == {s: s for s in STAGES}
    for stage in STAGES:
        row = data["systems"][f"stack-ablate-{stage}"]
        assert row["ablated_stage"] == stage and row["tasks"]["arc_easy"]["n"] == 4
        assert row["adapters"] == {s: None if s == stage else s for s in STAGES}
        # the ablated stage's LoRA weights are not used, so not counted
        assert row["parameters_per_query"] < full["parameters_per_query"]
    assert data["systems"]["stack-ablate-answer"]["earlier_stage_runs"] == full["earlier_stage_runs"] == 4


def test_split_dev_scores_the_dev_file_and_never_the_test_one(eval_stack, tmp_path):
    """`--split dev` chooses settings without touching test: it scores the dev file (hashed as such), and a task
    without a dev split is one clear error."""
    from typer.testing import CliRunner

    from fslm.cli import app

    bench = make_benchmark_dir(tmp_path / "bench")
    dev = bench / "arc" / "ARC-Easy-Dev.jsonl"
    rows = [json.loads(line) for line in (bench / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()][:5]
    for row in rows:
        row["id"] = "dev-" + row["id"]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report"
    args = ["eval", str(eval_stack), "--tasks", "arc_easy", "--data-dir", str(bench), "--limit", "10"]
    args += ["--systems", "base", "--out", str(report), "--split", "dev"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((report / "results.json").read_text())
    assert data["split"] == "dev" and data["data_hashes"]["arc_easy"] == {"arc/ARC-Easy-Dev.jsonl": sha256_file(dev)}
    assert data["systems"]["base"]["tasks"]["arc_easy"]["n"] == 5  # the dev file's 5 items, not the test file's 14
    assert set(data["systems"]["base"]["items"]["arc_easy"]["ids"]) == {r["id"] for r in rows}
    assert "of the dev split" in (report / "report.md").read_text()
    bad = CliRunner().invoke(app, [*args[:3], "mmlu", *args[4:]])
    assert bad.exit_code == 2 and "mmlu/val/*_val.csv: not found" in bad.output  # its dev split is absent here
