"""`TorchBackend.score` evaluates a question's context once for all its choices; the scores are those of scoring each
(context, continuation) in full (`score_each`, lm-eval `hf`'s way), on every architecture, with and without an
adapter, and do not depend on which other questions are in the call."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, make_model_dir

from fslm.backends.pytorch import TorchBackend
from fslm.stack import Stack
from fslm.steps.init import InitOptions, init

MODEL_DIRS: dict[str, Path] = {}  # model_type -> the tiny model's directory (lm-eval's HFLM loads it too)


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "qwen2"])
def backend(request, tmp_path_factory) -> TorchBackend:
    arch = request.param
    root = tmp_path_factory.mktemp(f"shared-{arch}")
    model_dir = make_model_dir(root, arch, chat=arch != "gpt_neox", context=128)
    MODEL_DIRS[arch] = model_dir
    init(root / "stack", InitOptions(base=str(model_dir)))
    make_adapter(model_dir, arch, root / "stack" / "adapters" / "answer", seed=3)
    return Stack.load(root / "stack").backend


def _questions(tok, n: int = 5, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n questions x 4 choices of 1 to 6 tokens (a one-token choice has nothing to evaluate after the context)."""
    rng = random.Random(seed)
    words = "the sun water plant energy rock heat light cell earth moon rain".split()
    requests = []
    for q in range(n):
        ctx = tok.encode(f"Question {q}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))))
        for k in range(4):
            cont = tok.encode(" " + " ".join(rng.choice(words) for _ in range(k + 1)), add_special_tokens=False)
            requests.append((ctx, cont[: k + 1 + (k == 3) * 2]))
    return requests


@pytest.mark.parametrize("adapter", [None, "answer"])
def test_shared_context_scores_equal_full_scores(backend, adapter):
    requests = _questions(backend.tokenizer)
    random.Random(1).shuffle(requests)  # choices of one question arrive apart
    assert any(len(c) == 1 for _, c in requests) and any(len(c) > 3 for _, c in requests)
    shared = backend.score(requests, adapter)
    full = backend.score_each(requests, adapter)
    for (a, ga), (b, gb) in zip(shared, full, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
        assert ga == gb
    assert len({round(s, 3) for s, _ in shared}) > len(requests) // 2  # real, varied scores


def test_a_question_scores_the_same_alone_or_among_others(backend):
    """Questions of different lengths batched together (left padding, explicit positions) score as each alone."""
    requests = _questions(backend.tokenizer, n=4)
    assert len({len(c) for c, _ in requests}) > 1  # the batch really pads
    together = backend.score(requests, "answer")
    alone = [s for i in range(0, len(requests), 4) for s in backend.score(requests[i : i + 4], "answer")]
    for (a, ga), (b, gb) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb


def test_the_context_is_evaluated_once_per_question(backend, monkeypatch):
    """Count the tokens the model is fed: one pass over each context, then only the continuations."""
    requests = _questions(backend.tokenizer, n=3)
    monkeypatch.setattr("fslm.backends.pytorch.SHARED_TOKENS", 1)  # one question per batch: no padding to count
    fed: list[int] = []
    forward = type(backend.model).forward

    def counting(self, *args, input_ids=None, **kwargs):
        fed.append(int(input_ids.numel()))
        return forward(self, *args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(backend.model), "forward", counting)
    backend.score(requests, "answer")
    contexts = {tuple(c) for c, _ in requests}
    widths = sum(max(len(c) for ctx, c in requests if tuple(ctx) == k) - 1 for k in contexts)
    assert sum(fed) == sum(len(k) for k in contexts) + 4 * widths
    assert sum(fed) < sum(len(c) + len(x) for c, x in requests) / 2  # less than half of scoring each in full


def test_questions_are_batched_within_the_token_budget(backend, monkeypatch):
    requests = _questions(backend.tokenizer, n=6)
    calls: list[int] = []
    groups = TorchBackend._score_groups
    monkeypatch.setattr(TorchBackend, "_score_groups", lambda self, g, a: calls.append(len(g)) or groups(self, g, a))
    backend.score(requests, None)
    assert sum(calls) == 6 and max(calls) > 1  # several questions share a pass (default budget)
    calls.clear()
    monkeypatch.setattr("fslm.backends.pytorch.SHARED_TOKENS", 1)
    backend.score(requests, None)
    assert calls == [1] * 6
    calls.clear()
    monkeypatch.setattr("fslm.backends.pytorch.SHARED_TOKENS", 10**6)
    monkeypatch.setattr("fslm.backends.pytorch.CHOICE_POSITIONS", 1)  # the logits budget alone also splits
    backend.score(requests, None)
    assert calls == [1] * 6


def test_too_long_requests_are_truncated_as_lm_eval_does(backend):
    """A request longer than the context scores as lm-eval's own `hf` model (HFLM) scores it: left-truncated to the
    last context-length tokens. The reference is HFLM itself on the same model and token ids."""
    from lm_eval.models.huggingface import HFLM

    tok = backend.tokenizer
    rng = random.Random(5)
    words = "the sun water plant energy rock heat light cell earth moon rain".split()
    long_ctx = tok.encode(" ".join(rng.choice(words) for _ in range(backend.context_length + 20)))
    assert len(long_ctx) > backend.context_length  # really too long
    long = [(long_ctx, tok.encode(" rock heat", add_special_tokens=False))]
    requests = [*long, *_questions(tok, n=1)]
    shared = backend.score(requests, None)
    assert shared[0] == backend.score_each(long, None)[0]  # the long one went the full way, left-truncated
    assert torch.isfinite(torch.tensor([s for s, _ in shared])).all()
    lm = HFLM(pretrained=str(MODEL_DIRS[backend.model.config.model_type]), device="cpu", dtype="float32", batch_size=2)
    assert lm.max_length == backend.context_length
    theirs = lm._loglikelihood_tokens([(("", ""), ctx, cont) for ctx, cont in requests], disable_tqdm=True)
    for (a, ga), (b, gb) in zip(shared, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
