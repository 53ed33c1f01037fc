"""`FslmLM(system=base)` against lm-eval's own `HFLM` on the offline tasks, with a tokenizer that adds BOS.

docs/eval.md promises that `base` is "the number lm-eval's `hf` model gives". A tokenizer that prepends BOS is where
a re-implementation drifts (BOS twice, or none, or a continuation split one token off), so the tiny model here has
one, and the reference is lm-eval's HFLM itself, not a copy of its tokenisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import build_model, make_benchmark_dir

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ["fslm_arc_easy", "fslm_arc_challenge", "fslm_mmlu"]
ITEMS = 6  # per task: 24 + 24 + 24 loglikelihood requests


def bos_tokenizer():
    """The tests' tiny BPE tokenizer, plus a post-processor that prepends <s> (as Llama-2 / TinyLlama do)."""
    from conftest import build_tokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    plain = build_tokenizer(chat=False)
    backend = plain.backend_tokenizer
    bos = plain.bos_token_id
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bos-model") / "tiny-llama-bos"
    tok = bos_tokenizer()
    build_model("llama", tok, seed=3, context=1024).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _evaluate(lm, data_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fslm.steps.evaluate.harness import TASKS_DIR, quiet_lm_eval

    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        metadata={"data_dir": str(data_dir), "subset": ITEMS, "seed": 7},
    )
    with quiet_lm_eval():
        return lm_eval.simple_evaluate(
            model=lm, tasks=TASKS, task_manager=manager, log_samples=True, random_seed=7, numpy_random_seed=7,
            torch_random_seed=7, fewshot_random_seed=7,
        )  # fmt: skip


def test_base_system_scores_exactly_as_lm_eval_hflm(bos_model, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from fslm.stack import Stack
    from fslm.steps.evaluate.lm_eval_model import FslmLM
    from fslm.steps.init import InitOptions, init

    tok = AutoTokenizer.from_pretrained(bos_model)
    assert tok.encode("Question: why?")[0] == tok.bos_token_id  # the premise: this tokenizer adds BOS
    assert tok.encode("Question: why?").count(tok.bos_token_id) == 1

    data_dir = make_benchmark_dir(tmp_path / "data")
    init(tmp_path / "stack", InitOptions(base=str(bos_model)))
    ours = _evaluate(FslmLM(Stack.load(tmp_path / "stack"), system="base"), data_dir)
    theirs = _evaluate(HFLM(pretrained=str(bos_model), device="cpu", dtype="float32", batch_size=4), data_dir)

    compared = 0
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        ref = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in ref] and len(mine) == ITEMS
        for a, b in zip(mine, ref, strict=True):
            assert a["arguments"] == b["arguments"]
            got = [float(r[0][0]) for r in a["resps"]]
            expect = [float(r[0][0]) for r in b["resps"]]
            # equal up to float32 summation order (measured: at most ~8e-6 on log-likelihoods of ~-100)
            assert got == pytest.approx(expect, rel=1e-6, abs=1e-5), (task, a["doc_id"])
            assert [bool(r[0][1]) for r in a["resps"]] == [bool(r[0][1]) for r in b["resps"]]
            assert (a["acc"], a.get("acc_norm")) == (b["acc"], b.get("acc_norm")), (task, a["doc_id"])
            compared += len(got)
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task].get(metric) == theirs["results"][task].get(metric), (task, metric)
    assert compared == 3 * ITEMS * 4
