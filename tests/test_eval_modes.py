"""Stack scoring modes (chain, ensemble, gate), their tuning on dev, the fast stage backend, per-item results and the
generative metric, on a tiny random Llama."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_adapter, make_benchmark_dir, make_eval_stack

from fslm.errors import FslmError
from fslm.steps.evaluate import scoring as eval_scoring

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ["intent", "plan", "reasoning", "answer"]


# --- combining paths: pure functions ----------------------------------------------------------------


def test_ensemble_is_a_weighted_mean_in_log_space():
    direct, chains = [-1.0, -2.0], [[-3.0, -1.0], [-2.0, -1.0]]
    assert eval_scoring.ensemble(direct, chains, 0.5) == pytest.approx([-1.75, -1.5])
    assert eval_scoring.ensemble(direct, chains, 1.0) == direct
    assert eval_scoring.ensemble(direct, chains, 0.0) == pytest.approx([-2.5, -1.0])
    # a path-wide offset (every choice of one chain 5 nats less likely) does not change the decision
    shifted = [[s - 5 for s in c] for c in chains]
    for w in (0.2, 0.5, 0.8):
        a, b = eval_scoring.ensemble(direct, chains, w), eval_scoring.ensemble(direct, shifted, w)
        assert eval_scoring.argmax(a) == eval_scoring.argmax(b)


def test_margin_and_gate():
    import math

    scores = [math.log(0.6), math.log(0.3), math.log(0.1)]
    assert eval_scoring.margin(scores) == pytest.approx(0.3)
    assert eval_scoring.margin([0.0]) == 1.0
    chain = [-5.0, -1.0, -9.0]
    assert eval_scoring.gate(scores, chain, 0.5) == (chain, True)
    assert eval_scoring.gate(scores, chain, 0.2) == (scores, False)
    assert eval_scoring.gate(scores, None, 0.5) == (scores, False)


def test_tuning_picks_the_best_value_and_breaks_ties_cheaply():
    Q = eval_scoring.Question
    # q1: direct right, chain wrong, direct sure; q2: direct wrong but unsure, chain right; q3: both right
    questions = [
        Q("t", 1, direct=[-0.1, -3.0], chains=[[-2.0, -0.5]]),
        Q("t", 2, direct=[-0.6, -0.8], chains=[[-3.0, -0.2]]),
        Q("t", 3, direct=[-0.2, -2.0], chains=[[-0.1, -4.0]]),
    ]
    golds = [0, 1, 0]
    gate = eval_scoring.tune_threshold(questions, golds)
    assert gate["dev_accuracy"] == 1.0
    # margins: q1 0.896, q2 0.0997, q3 0.716; chaining q2 but not q1 is perfect: τ in (0.0997, 0.896], the
    # smallest grid value is 0.1
    assert gate["value"] == pytest.approx(0.1)
    assert gate["chain_rate"] == pytest.approx(1 / 3)
    assert gate["chain_rates"]["0.0"] == 0.0 and gate["chain_rates"]["1.0"] == 1.0 and "max_chain_rate" not in gate
    # a cost cap below the best τ's chain rate: the best of the cheaper values (τ = 0, no chain: q2 wrong)
    capped = eval_scoring.tune_threshold(questions, golds, max_chain_rate=0.2)
    assert capped["value"] == 0.0 and capped["chain_rate"] == 0.0 and capped["dev_accuracy"] == pytest.approx(2 / 3)
    assert capped["max_chain_rate"] == 0.2 and capped["grid"] == gate["grid"]  # the frontier is the same
    assert eval_scoring.tune_threshold(questions, golds, max_chain_rate=1 / 3)["value"] == pytest.approx(0.1)
    weight = eval_scoring.tune_weight(questions, golds)
    assert weight["dev_accuracy"] == 1.0
    # q1 needs λ > 0.341, q2 needs λ < 0.933: 0.4 .. 0.9 are perfect, the largest wins
    assert [float(w) for w, acc in weight["grid"].items() if acc == 1.0] == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert weight["value"] == 0.9
    assert weight["grid"]["1.0"] == pytest.approx(2 / 3, abs=1e-4) and weight["grid"]["0.0"] == pytest.approx(
        2 / 3, abs=1e-4
    )


# --- FslmLM on a tiny stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The tiny benchmark layout plus dev splits whose questions differ from the test questions."""
    root = make_benchmark_dir(tmp_path_factory.mktemp("data"))
    rows = []
    for i in range(6):
        choices = [{"text": f"answer {k} to {i}", "label": "ABCD"[k]} for k in range(4)]
        rows.append(
            {"id": f"Dev{i}", "question": {"stem": f"What is dev item {i}?", "choices": choices}, "answerKey": "A"}
        )
    (root / "arc" / "ARC-Easy-Dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def eval_stack(tmp_path_factory) -> Path:
    return make_eval_stack(tmp_path_factory.mktemp("modes"))


@pytest.fixture(scope="module")
def stack(eval_stack):
    from fslm.stack import Stack

    return Stack.load(eval_stack)


def _requests(contexts: list[str], n_choices: int = 3):
    from lm_eval.api.instance import Instance

    return [
        Instance("loglikelihood", {}, (c, f" choice {k}"), k, metadata=("fslm_t", q, 1))
        for q, c in enumerate(contexts)
        for k in range(n_choices)
    ]


CONTEXTS = [f"Question: what is {w}?\nAnswer:" for w in ("red", "blue")]


def _lm(stack, **kwargs):
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    return FslmLM(stack, system="stack", stage_tokens=3, **kwargs)


def test_ensemble_and_gate_reduce_to_direct_and_chain(stack):
    reqs = _requests(CONTEXTS)
    chain = [s for s, _ in _lm(stack).loglikelihood(reqs)]
    direct_lm = _lm(stack, scoring="ensemble", weight=1.0)
    direct = [s for s, _ in direct_lm.loglikelihood(reqs)]
    assert direct_lm.stage_calls == 0  # λ = 1: no chain is generated at all
    assert direct != pytest.approx(chain)  # the paths really differ
    # λ = 0 with one greedy "sampled" chain is the chain
    greedy_ensemble = _lm(stack, scoring="ensemble", weight=0.0, chains=1, temperature=0.0)
    assert [s for s, _ in greedy_ensemble.loglikelihood(reqs)] == pytest.approx(chain, abs=1e-5)
    # λ = 0.25 mixes them linearly
    mixed = _lm(stack, scoring="ensemble", weight=0.25, chains=1, temperature=0.0).loglikelihood(reqs)
    assert [s for s, _ in mixed] == pytest.approx(
        [0.25 * d + 0.75 * c for d, c in zip(direct, chain, strict=True)], abs=1e-5
    )
    # gate: τ = 0 never runs a chain (direct scores), τ = 1 always does (chain scores)
    never = _lm(stack, scoring="gate", threshold=0.0)
    assert [s for s, _ in never.loglikelihood(reqs)] == pytest.approx(direct, abs=1e-5) and never.stage_calls == 0
    always = _lm(stack, scoring="gate", threshold=1.0)
    assert [s for s, _ in always.loglikelihood(reqs)] == pytest.approx(chain, abs=1e-5)
    assert always.chain_questions == 2 and always.stage_calls == 2


def test_gate_runs_the_chain_only_for_unsure_questions(stack):
    reqs = _requests(CONTEXTS)
    probe = _lm(stack, scoring="gate", threshold=None)  # tuning mode: every path recorded
    probe.loglikelihood(reqs)
    margins = sorted(r.margin for r in probe.records.values())
    tau = (margins[0] + margins[1]) / 2  # between the two questions' margins: exactly one is unsure
    lm = _lm(stack, scoring="gate", threshold={"fslm_t": tau})
    lm.loglikelihood(reqs)
    assert lm.chain_questions == 1 and lm.stage_calls == 1
    assert sum(r.chain_ran for r in lm.records.values()) == 1


def test_sampled_chains_differ_and_are_seeded(stack):
    reqs = _requests(CONTEXTS)

    def chains(seed):
        lm = _lm(stack, scoring="ensemble", weight=0.5, chains=3, temperature=1.5, seed=seed)
        scores = lm.loglikelihood(reqs)
        return lm, scores

    lm, scores = chains(5)
    texts = [lm.prefix_cache[(CONTEXTS[0], k)] for k in range(3)]
    assert len({json.dumps(t, sort_keys=True) for t in texts}) > 1  # K samples, not K copies
    assert lm.stage_calls == 6  # 2 questions x 3 chains, each stage once per call
    again, scores_again = chains(5)
    assert [again.prefix_cache[(CONTEXTS[0], k)] for k in range(3)] == texts
    assert scores_again == scores
    record = next(iter(lm.records.values()))
    assert len(record.chains) == 3 and len(record.direct) == 3


def test_questions_are_grouped_by_document_not_by_context(stack):
    """WinoGrande-style partial scoring: one question, a different context per option."""
    from lm_eval.api.instance import Instance

    reqs = [
        Instance("loglikelihood", {}, (f"Option {k} fits here", " end"), k, metadata=("fslm_w", 0, 1)) for k in range(2)
    ]
    lm = _lm(stack, scoring="gate", threshold=None)
    lm.loglikelihood(reqs)
    assert list(lm.records) == [("fslm_w", 0)] and len(lm.records[("fslm_w", 0)].direct) == 2


# --- fslm eval end to end ---------------------------------------------------------------------------


def test_eval_gate_tunes_on_dev_only_and_reports_pairs(eval_stack, data_dir, tmp_path, monkeypatch):
    from fslm.steps.evaluate import EvalOptions, evaluate, lm_eval_model

    seen: list[str] = []
    original = lm_eval_model.run_stages

    def recording(stack, instructions, *args, **kwargs):
        seen.extend(instructions)
        return original(stack, instructions, *args, **kwargs)

    monkeypatch.setattr(lm_eval_model, "run_stages", recording)
    options = EvalOptions(
        tasks=["arc_easy"],
        data_dir=data_dir,
        systems=["base", "single", "stack"],
        limit=6,
        stage_tokens=3,
        stage_backend="torch",
        stack_scoring="gate",
        tune_limit=4,
        bootstrap=500,
    )
    result = evaluate(eval_stack, tmp_path / "report", options).results
    tuned = result["tuning"]["arc_easy"]
    assert tuned["parameter"] == "gate_threshold" and tuned["split"] == "arc/ARC-Easy-Dev.jsonl" and tuned["n"] == 4
    dev = [t for t in seen if "dev item" in t]
    assert len(dev) == 4  # tuning ran a chain for every dev question (τ unknown yet) ...
    assert all("dev item" in t for t in seen[: len(dev)])  # ... before any test question
    stack_row = result["systems"]["stack"]
    assert stack_row["stack_scoring"]["tuned"] == {"arc_easy": tuned["value"]}
    assert stack_row["stage_backend"] == "torch"
    # per-item records: ids + correctness per system, consistent with the accuracy
    for row in result["systems"].values():
        items = row["items"]["arc_easy"]
        assert len(items["ids"]) == 6 and all(i.startswith("Easy") for i in items["ids"])
        assert sum(items["acc"]) / 6 == pytest.approx(row["tasks"]["arc_easy"]["accuracy"])
    pairs = {(r["a"], r["b"], r["metric"]) for r in result["paired"]}
    assert {("base", "single", "acc"), ("base", "stack", "acc"), ("single", "stack", "acc")} <= pairs
    assert "## Paired differences" in (tmp_path / "report" / "report.md").read_text()
    # the gate's per-item paths: the chain answered exactly where the direct margin was below τ, else the direct path
    gate = stack_row["items"]["arc_easy"]
    assert gate["chained"] == [int(m < tuned["value"]) for m in gate["direct_margin"]]
    assert all(a == d for a, d, c in zip(gate["acc"], gate["direct_acc"], gate["chained"], strict=True) if not c)
    assert sum(gate["chained"]) == stack_row["stack_scoring"]["questions_with_chain"]
    assert "direct_margin" not in result["systems"]["single"]["items"]["arc_easy"]
    # a rerun reuses the tuning and the rows
    seen.clear()
    evaluate(eval_stack, tmp_path / "report", options)
    assert seen == []
    # a tuning killed before it finished (no tuning.json, no stack row yet) resumes from its dev chains' stage log
    saved = tmp_path / "report" / "systems"
    (saved / "tuning.json").unlink()
    (saved / "stack.json").unlink()
    again = evaluate(eval_stack, tmp_path / "report", options).results
    assert seen == [] and again["tuning"]["arc_easy"]["value"] == tuned["value"]
    assert len((saved / "tuning.stages.jsonl").read_text().splitlines()) == 4
    # a cost cap: τ is the best of the values that chained no dev question (4 dev items: rates step by 0.25)
    capped = options.model_copy(update={"gate_max_chain_rate": 0.1})
    result = evaluate(eval_stack, tmp_path / "capped", capped).results
    tuned = result["tuning"]["arc_easy"]
    assert (
        tuned["chain_rate"] == 0.0 and tuned["max_chain_rate"] == 0.1 and tuned["chain_rates"][str(tuned["value"])] == 0
    )
    assert result["stack_scoring"]["max_chain_rate"] == 0.1  # in the setup, so in the stack row's key
    assert "max_chain_rate" not in json.loads((tmp_path / "report" / "results.json").read_text())["stack_scoring"]


def test_eval_refuses_to_tune_without_a_dev_split(eval_stack, data_dir, tmp_path):
    from fslm.steps.evaluate import EvalOptions, evaluate

    options = EvalOptions(tasks=["mmlu"], data_dir=data_dir, systems=["stack"], stack_scoring="ensemble")
    with pytest.raises(FslmError, match="mmlu/val/\\*_val.csv: not found"):
        evaluate(eval_stack, tmp_path / "r", options)
    options = EvalOptions(
        tasks=["mmlu"], data_dir=data_dir, systems=["stack"], stack_scoring="gate", gate_threshold=0.3
    )
    assert options.gate_threshold == 0.3  # given: nothing to tune
    options = EvalOptions(tasks=["arc_easy"], data_dir=data_dir, systems=["stack"], stack_scoring="gate")
    hellaswag = options.model_copy(update={"tasks": ["hellaswag"]})
    with pytest.raises(FslmError, match="task hellaswag has no dev split"):
        evaluate(eval_stack, tmp_path / "r", hellaswag)


def test_generative_metric_beside_acc(eval_stack, data_dir, tmp_path):
    from fslm.steps.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        tasks=["arc_easy", "mmlu"],
        data_dir=data_dir,
        systems=["base", "stack"],
        limit=4,
        stage_tokens=3,
        stage_backend="torch",
        generative=True,
        gen_tokens=6,
        bootstrap=200,
    )
    result = evaluate(eval_stack, tmp_path / "report", options).results
    for row in result["systems"].values():
        for task in ("arc_easy", "mmlu"):
            m = row["tasks"][task]
            assert {"accuracy", "gen", "answered"} <= set(m) and 0 <= m["gen"] <= m["answered"] <= 1
            items = row["items"][task]
            assert len(items["gen"]) == 4 and sum(items["gen"]) / 4 == pytest.approx(m["gen"])
        assert "acc_norm" in row["tasks"]["arc_easy"]


def test_generative_answers_are_read_like_teacher_answers():
    from fslm.steps.evaluate.tasks import generative

    doc = {"choices": ["carbon dioxide", "oxygen", "water", "dioxide"], "gold": 0}
    assert generative.text_answer(doc, ["Plants take in carbon dioxide."]) == {"gen": 1.0, "answered": 1.0}
    assert generative.text_answer(doc, ["oxygen and water"]) == {"gen": 0.0, "answered": 0.0}  # two options named
    assert generative.text_answer(doc, ["sunlight"]) == {"gen": 0.0, "answered": 0.0}
    mmlu = {"choices": ["one", "two", "three", "four"], "gold": 2}
    assert generative.letter_answer(mmlu, ["C. three"]) == {"gen": 1.0, "answered": 1.0}
    assert generative.letter_answer(mmlu, ["The answer is B"]) == {"gen": 0.0, "answered": 1.0}


# --- the fast path ------------------------------------------------------------------------------------


def test_stages_on_llamacpp_with_agreement_check(eval_stack, data_dir, tmp_path, monkeypatch):
    """auto = llama.cpp for a Llama base: the export is written first, stages generate there, the final stage scores
    on torch; the agreement check compares greedy stage text with PyTorch's."""
    import dataclasses

    from fslm.backends.choose import export_is_current
    from fslm.backends.llamacpp import LlamaCppBackend

    # On this tiny model llama.cpp's greedy text equals PyTorch's, so every share would be 1.0 and a check that
    # always said 1.0 would pass. Two of the three questions get another plan on llama.cpp (the sample of 2 holds
    # at least one of them), which the reasoning stage reads: the shares are measured, not constant, and a chain
    # counts as equal only when all its stages are.
    generate = LlamaCppBackend.generate

    def drifting(self, prompts, adapter, settings, label="", on_text=None):
        out = generate(self, prompts, adapter, settings, label=label, on_text=on_text)
        if label == "plan":
            out[:2] = [dataclasses.replace(c, text=c.text + " drift") for c in out[:2]]
        return out

    monkeypatch.setattr(LlamaCppBackend, "generate", drifting)
    from fslm.stackdir import StackDir
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.evaluate.stages import quantised_base_warning, resolve

    directory = tmp_path / "stack"
    shutil.copytree(eval_stack, directory)
    stack_dir = StackDir(directory)
    assert resolve(stack_dir, "auto") == "llamacpp" and not export_is_current(stack_dir)
    options = EvalOptions(
        tasks=["arc_easy"], data_dir=data_dir, systems=["stack"], limit=3, stage_tokens=3, stage_check=2, bootstrap=200
    )
    result = evaluate(directory, tmp_path / "report", options).results
    row = result["systems"]["stack"]
    assert result["stage_backend"] == "llamacpp" and row["stage_backend"] == "llamacpp"
    assert export_is_current(stack_dir)
    agreement = row["stage_agreement"]
    assert agreement["questions"] == 2 and agreement["reference_backend"] == "torch"
    assert set(agreement["stage_text_equal"]) == {"intent", "plan", "reasoning"}
    # The recorded shares are the measured ones: the seeded sample of the questions, their llama.cpp stage texts
    # (from the row's stage log) against what PyTorch writes for them, stage by stage and for the whole chain.
    import random

    from fslm.stack import Stack

    logged = [json.loads(x) for x in (tmp_path / "report" / "systems" / "stack.stages.jsonl").read_text().splitlines()]
    fast = {r["context"]: r["outputs"] for r in logged if r["chain"] is None}
    assert len(fast) == 3
    chosen = sorted(random.Random(options.seed).sample(sorted(fast), 2))
    reference = Stack.load(directory, backend="torch")
    torch_runs = reference.run_batch([c.strip() for c in chosen], stages=3, overrides={"max_new_tokens": 3})
    names = ["intent", "plan", "reasoning"]
    expected = {n: sum(fast[c][n] == t.outputs[n] for c, t in zip(chosen, torch_runs, strict=True)) / 2 for n in names}
    assert agreement["stage_text_equal"] == expected and expected["plan"] < 1.0
    whole = sum(all(fast[c][n] == t.outputs[n] for n in names) for c, t in zip(chosen, torch_runs, strict=True)) / 2
    assert agreement["chain_text_equal"] == whole
    assert row["earlier_stage_runs"] == 3
    assert quantised_base_warning(stack_dir) is None  # f16, the default
    manifest = json.loads(stack_dir.gguf_manifest.read_text())
    manifest["base"]["quant"] = "q4_1"  # what exports made before f16 became the default say
    stack_dir.gguf_manifest.write_text(json.dumps(manifest))
    assert "q4_1" in quantised_base_warning(stack_dir) and f"fslm export {directory}" in quantised_base_warning(
        stack_dir
    )
    # a retrained adapter makes the export stale
    make_adapter(Path(stack_dir.load().base.model), "llama", stack_dir.adapter("plan"), seed=99)
    assert not export_is_current(stack_dir)
