"""How the stack turns per-path scores of a question's answer choices into one score per choice (`--stack-scoring`).

lm-eval sends one loglikelihood request per (context, continuation); the requests of one question share its task
and document id (`Instance.task_name`, `Instance.doc_id`; the context alone when those are missing, e.g. a request
made by hand), and `Instance.idx` is the choice's index. A *path* is one way to reach the final stage:

- the **direct** path: the final stage's adapter on `Stack.direct_prompt` (the question alone, no upstream text);
- a **chain**: stages 1..N-1 generate (greedy, or sampled for the ensemble), then the final stage's prompt holds
  their text.

Modes:

- `chain`: the greedy chain's scores (what `fslm eval` always did).
- `ensemble`: score(c) = λ · direct(c) + (1 − λ) · mean over K sampled chains of chain_k(c), in **log-probability
  space**. Why log space: (1) each path's sequence log-likelihoods carry a path-specific offset (a longer or odder
  prompt makes every continuation less likely); a weighted sum of logs shifts every choice of a question by the same
  amount, so the offsets cannot decide the answer, whereas averaging raw probabilities would let the path with the
  largest likelihoods dominate; (2) it is linear, so lm-eval's acc_norm (log-likelihood / continuation length) of
  the ensemble is the same ensemble of each path's acc_norm scores: acc and acc_norm keep their meaning and lm-eval
  computes both unchanged. The price: log averaging is a product of experts, so one chain that is confidently wrong
  pulls harder than it would in a probability average; the direct weight λ bounds that.
- `gate`: the direct path answers when it is sure; when the margin between its two most likely choices (choice
  probabilities from a softmax over the question's direct scores, so the margin is in [0, 1]) is below τ, the greedy
  chain's scores replace the direct ones ("think only when unsure", arXiv 2404.09170). Cost: direct scoring for every
  question plus a chain for the unsure share.

λ and τ are tuned per task on its dev split (`tune_weight`, `tune_threshold`: a grid, highest dev accuracy, ties to
the cheaper setting), never on the test items they are then used on. The gate's τ may be capped by its chain rate on dev
(`--gate-max-chain-rate`): the gate costs about the direct path plus that share of a chain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SCORING = ("chain", "ensemble", "gate")
WEIGHT_GRID = tuple(i / 10 for i in range(11))  # λ: weight of the direct path
THRESHOLD_GRID = tuple(i / 20 for i in range(21))  # τ: chain when the direct margin is below this


def question_key(request: Any) -> tuple[str, Any]:
    """The question a loglikelihood request belongs to: (task, document id), else its context."""
    task, doc_id = getattr(request, "task_name", None), getattr(request, "doc_id", None)
    if doc_id is not None:
        return (task or "", doc_id)
    return ("", request.args[0])


def choice_probs(scores: Sequence[float]) -> list[float]:
    """Softmax over one question's choice log-likelihoods: the path's probability of each choice."""
    top = max(scores)
    exp = [math.exp(s - top) for s in scores]
    total = sum(exp)
    return [e / total for e in exp]


def margin(scores: Sequence[float]) -> float:
    """Probability of the most likely choice minus the runner-up's (1.0 for a single choice)."""
    if len(scores) < 2:
        return 1.0
    first, second = sorted(choice_probs(scores), reverse=True)[:2]
    return first - second


def ensemble(direct: Sequence[float], chains: Sequence[Sequence[float]], weight: float) -> list[float]:
    """λ · direct + (1 − λ) · mean of the chains, per choice (log-probability space; see the module docstring)."""
    if not chains or weight >= 1.0:
        return list(direct)
    mean = [sum(c[i] for c in chains) / len(chains) for i in range(len(direct))]
    if weight <= 0.0:
        return mean
    return [weight * d + (1 - weight) * m for d, m in zip(direct, mean, strict=True)]


def gate(direct: Sequence[float], chain: Sequence[float] | None, threshold: float) -> tuple[list[float], bool]:
    """The chain's scores when the direct margin is below τ (and a chain was run), else the direct ones."""
    if chain is not None and margin(direct) < threshold:
        return list(chain), True
    return list(direct), False


def argmax(scores: Sequence[float]) -> int:
    """The first highest score, as lm-eval's acc (np.argmax) picks it."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


@dataclass
class Question:
    """One question's scores per path, recorded while scoring (the tuning reads these)."""

    task: str
    doc_id: Any
    direct: list[float] = field(default_factory=list)
    chains: list[list[float]] = field(default_factory=list)  # ensemble: one per sampled chain; gate: the greedy one
    chain_ran: bool = False
    margin: float | None = None


def tune_weight(questions: Sequence[Question], golds: Sequence[int], grid: Sequence[float] = WEIGHT_GRID) -> dict:
    """λ with the highest accuracy over `questions` (each with direct and chain scores); ties to the larger λ
    (λ = 1 needs no chain at all). Returns the choice and the accuracy of every grid value."""
    table = {}
    for w in grid:
        right = sum(argmax(ensemble(q.direct, q.chains, w)) == g for q, g in zip(questions, golds, strict=True))
        table[w] = right / max(len(questions), 1)
    best = max(grid, key=lambda w: (table[w], w))
    return {"value": best, "dev_accuracy": table[best], "grid": {str(w): round(a, 4) for w, a in table.items()}}


def pick_threshold(accuracy: dict[float, float], rate: dict[float, float], max_chain_rate: float | None) -> float:
    """The τ with the best accuracy among those whose chain rate is at most `max_chain_rate` (any, without a cap);
    ties to the smaller τ. τ = 0 chains nothing, so a grid holding it always has a candidate."""
    allowed = [t for t in accuracy if max_chain_rate is None or rate[t] <= max_chain_rate + 1e-12] or [min(accuracy)]
    return max(allowed, key=lambda t: (accuracy[t], -t))


def tune_threshold(
    questions: Sequence[Question],
    golds: Sequence[int],
    grid: Sequence[float] = THRESHOLD_GRID,
    max_chain_rate: float | None = None,
) -> dict:
    """τ with the highest accuracy over `questions` (each with direct and greedy-chain scores); ties to the smaller
    τ (fewer chains). `max_chain_rate`: only the values whose chain rate is at most this compete (a cost cap; τ = 0
    runs no chain, so one always does). Returns the choice, its chain rate, and the accuracy and chain rate of every
    grid value: the accuracy a chain buys on dev, so a user can pick a cheaper τ by hand."""
    table, rate = {}, {}
    for t in grid:
        picks = [gate(q.direct, q.chains[0] if q.chains else None, t) for q in questions]
        right = sum(argmax(s) == g for (s, _), g in zip(picks, golds, strict=True))
        table[t] = right / max(len(questions), 1)
        rate[t] = sum(used for _, used in picks) / max(len(questions), 1)
    best = pick_threshold(table, rate, max_chain_rate)
    return {
        "value": best,
        "dev_accuracy": table[best],
        "chain_rate": rate[best],
        **({"max_chain_rate": max_chain_rate} if max_chain_rate is not None else {}),
        "grid": {str(t): round(a, 4) for t, a in table.items()},
        "chain_rates": {str(t): round(r, 4) for t, r in rate.items()},
    }
