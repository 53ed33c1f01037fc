"""The stack as an lm-evaluation-harness model: `--model fslm --model_args stack=DIR,system=stack`.

lm-eval 0.4.13 has no plugin discovery, so `fslm lm-eval ...` imports this module (which registers `fslm`) and then
hands its arguments to lm-eval's own CLI. lm-eval registers its own models (`hf`, ...) only when it finds its registry
empty, so this module has it register them first: with `fslm` alone in it, `--model hf` was "no model for this name".
Systems:

- `base`: the bare base model on the raw lm-eval context (no stage prompt), scored as lm-eval's `hf` model does.
- `single`, `multitask`: a baseline adapter (`adapters/single/`, `adapters/multitask/`) answering directly, prompt
  from `Stack.direct_prompt`.
- `stack`: stages 1..N-1 generate once per distinct context (cached: all answer choices share it), on the stage
  backend (`stages`: a Stack on llama.cpp or a server, or the scoring stack itself); the final stage scores the
  continuation on PyTorch after its own prompt, built from the context and the earlier stages' outputs.
  `scoring` chooses how paths combine (chain, ensemble, gate: fslm/steps/evaluate/scoring.py).
  `ablate=<stage>` runs that stage on the bare base model.

Scores are pinned: the choices of one question share one pass over their context (TorchBackend.score), float32
log-softmax, and a question is never split between backend calls, so a score does not depend on how lm-eval batches
requests (the questions batched with it move it by float32 rounding at most). Requests too long for the model
are scored one by one as lm-eval's `hf` model does (fixed batch size, model_args `batch_size`, default 8; right
padding; left truncation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lm_eval.models  # noqa: F401  lm-eval's own models (hf, ...), registered before ours: see below
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from fslm.backends import SCORE
from fslm.errors import FslmError
from fslm.files import JsonlLog
from fslm.stack import SYSTEMS, Stack
from fslm.stackdir import BASELINES
from fslm.steps.evaluate import scoring as scoring_modes
from fslm.steps.evaluate.options import EvalOptions
from fslm.steps.evaluate.stages import load_stage_stack, resolve, run_stages
from fslm.trust import Trust

Progress = Callable[[str, int, int], None]  # (what, done, total)
PerTask = float | Mapping[str, float] | None  # one value, or one per lm-eval task name (fslm_arc_easy: 0.3)


@register_model("fslm")
class FslmLM(TemplateLM):
    """lm-eval model over a `Stack`; `stack` is a directory (CLI) or a loaded `Stack` (fslm eval reuses one).

    stages: the Stack that generates stages 1..N-1 (and the answers of generative tasks where it has the adapter);
    a backend name (torch|llamacpp|openai|auto) loads one; default: the scoring stack itself.
    scoring: chain | ensemble | gate; chains (K), temperature and seed for the ensemble's sampled chains; weight (λ)
    and threshold (τ), one value or one per task; None records every path for tuning and answers with the direct
    path's scores (`records` holds them).
    stage_log: a JSONL file that keeps every chain's stage texts under `stage_log_key` (fslm eval's row key).
    """

    def __init__(
        self,
        stack: Any,
        system: str = "stack",
        ablate: str | None = None,
        batch_size: int | str = 8,
        backend: str | None = None,
        stage_tokens: int | str | None = None,
        progress: Progress | None = None,
        trust_remote_code: bool | str = False,
        stages: Any = None,
        stage_backend: str | None = None,
        stage_batch: int | str | None = None,
        scoring: str = "chain",
        chains: int | str = 3,
        temperature: float | str = 0.7,
        weight: PerTask | str = None,
        threshold: PerTask | str = None,
        seed: int | str = 1234,
        gen_tokens: int | str | None = None,
        stage_log: Path | None = None,
        stage_log_key: str = "",
        chain_key: str = "",
        chains_from: Path | None = None,
        **_: Any,  # lm-eval passes device etc.; the stack's manifest decides those
    ) -> None:
        super().__init__()
        if not isinstance(stack, Stack):
            # lm-eval's --trust_remote_code arrives here as a model_arg: the user's consent, never the manifest's.
            trust = Trust.from_user(remote_code=str(trust_remote_code).lower() in ("true", "1", "yes"))
            stack = Stack.load(str(stack), backend=backend, trust=trust)
        self.stack = stack
        if system not in SYSTEMS:
            raise FslmError(f"model_args system={system!r}: expected one of {', '.join(SYSTEMS)}")
        if ablate and system != "stack":
            raise FslmError("model_args ablate= needs system=stack")
        names = [s.name for s in self.stack.config.stages]
        if ablate and ablate not in names:
            raise FslmError(f"model_args ablate={ablate!r}: no such stage (stages: {', '.join(names)})")
        if scoring not in scoring_modes.SCORING:
            raise FslmError(f"model_args scoring={scoring!r}: expected one of {', '.join(scoring_modes.SCORING)}")
        self.stack.backend.require(SCORE, "lm-eval scoring")
        self.system, self.ablate = system, ablate
        self.fixed_batch = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" would move scores: pinned
        self.progress = progress
        self.stage_tokens = int(stage_tokens) if stage_tokens else None  # cap for stages 1..N-1 (None: manifest)
        self.final = self.stack.config.final_stage
        if system in BASELINES:
            self.stack.load_baseline(system)
        if stages is None and stage_backend and self.stack.dir is not None:
            stages = load_stage_stack(self.stack.dir, resolve(self.stack.dir, stage_backend), self.stack)
        self.stages = stages if stages is not None else self.stack
        # stage generation: the fast backends take many prompts per call; torch keeps the scoring batch (memory)
        fast = self.stages.backend is not self.stack.backend
        self.stage_batch = int(stage_batch) if stage_batch else (32 if fast else self.fixed_batch)
        self.scoring = scoring
        self.chains = int(chains)
        self.temperature = float(temperature)
        self.weight = _per_task(weight)
        self.threshold = _per_task(threshold)
        self.seed = int(seed)
        self.gen_tokens = int(gen_tokens) if gen_tokens else None
        self.prefix_cache: dict[tuple[str, int | None], dict[str, str]] = {}  # (context, chain) -> stage outputs
        self.records: dict[tuple[str, Any], scoring_modes.Question] = {}  # per question, every path's scores
        self.stage_calls = 0  # contexts sent through stages 1..N-1 (the cache test counts these)
        self.chain_questions = 0  # questions that ran a chain (gate: the unsure share)
        self.scored_tokens = 0
        self.seconds = 0.0
        self.stage_seconds = 0.0
        self.resumed_seconds = 0.0  # stage time of chains read back: a killed run's, or another eval's (borrowed)
        self.resumed_chains = 0
        self.chain_key = chain_key
        self.stage_log = self._open_stage_log(stage_log, stage_log_key) if stage_log else None
        self.stage_log_key = stage_log_key
        self.borrowable = self._borrowable(chains_from) if chains_from is not None else {}
        self.borrowed_chains = 0
        self.borrowed_prefixes = 0  # an ablated row: chains whose stages before the ablated one were borrowed

    @classmethod
    def for_options(
        cls,
        loaded: Any,
        options: EvalOptions,
        progress: Progress | None,
        *,
        system: str = "stack",
        stages: Any = None,
        **extra: Any,
    ) -> FslmLM:
        """A system as `fslm eval` scores it, over the one loaded scoring stack: the options' batch, stage budget and
        scoring settings (the stack's scoring mode and stage stack apply to the stack rows alone)."""
        stack = system == "stack"
        return cls(
            loaded,
            system=system,
            batch_size=options.batch_size,
            stage_tokens=options.stage_tokens,
            progress=progress,
            stages=stages if stack else None,
            stage_batch=options.stage_batch,
            scoring=options.stack_scoring if stack else "chain",
            chains=options.chains,
            temperature=options.chain_temperature,
            seed=options.seed,
            **extra,
        )

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> FslmLM:
        """lm-eval adds its own batch_size (default 1), device, ... to the model_args: those in model_args win.

        Without this, `--model_args stack=DIR,batch_size=8` died with a TypeError (batch_size given twice).
        """
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> FslmLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- what runs where ----------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, str | None]:
        """The adapter each stage uses for this system (None = bare base)."""
        if self.system == "base":
            return {s.name: None for s in self.stack.config.stages}
        if self.system in BASELINES:
            return {self.final.name: self.system}
        chosen = {s.name: self.stack.stage_adapter(s.name) for s in self.stack.config.stages}
        if self.ablate:
            chosen[self.ablate] = None
        return chosen

    @property
    def final_adapter(self) -> str | None:
        return self.adapters[self.final.name]

    @property
    def stage_backend(self) -> str:
        """Where stages 1..N-1 generate (the name of the stage stack's backend)."""
        return self.stages.backend.name

    def parameters_per_query(self) -> int:
        """Parameters touched per query: the base once plus each distinct adapter used (LoRA weights)."""
        return self.stack.backend.parameter_count({a for a in self.adapters.values() if a})

    # --- tokenizer plumbing (as lm-eval's hf model) --------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.stack.backend.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.stack.backend.context_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    # --- loglikelihood -----------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.system == "base":
            return super().loglikelihood(requests, disable_tqdm=True)
        pairs = [req.args for req in requests]
        if self.system in BASELINES:
            return self._score(pairs, None)
        if self.scoring == "chain" or len(self.stack.config.stages) < 2:
            return self._score(pairs, self._earlier_outputs([c for c, _ in pairs]))
        return self._loglikelihood_paths(requests)

    def _score(
        self, pairs: list[tuple[str, str]], outputs: Mapping[str, Mapping[str, str]] | None
    ) -> list[tuple[float, bool]]:
        """Each (context, continuation) scored by the final stage after its prompt: the chain's prompt holding
        `outputs[context]`, or the direct prompt when `outputs` is None (or for a baseline)."""
        encoded: dict[str, list[int]] = {}
        new_reqs = []
        for context, continuation in pairs:
            prompt = self._final_prompt(context, None if outputs is None else outputs.get(context, {}))
            if prompt not in encoded:  # the choices of one question share their prompt
                encoded[prompt] = self.stack.backend.encode(prompt)
            # the stage's answer starts a new line after the prompt: drop lm-eval's leading target delimiter
            cont = self.tokenizer.encode(continuation.lstrip(" "), add_special_tokens=False)
            new_reqs.append(((context, continuation), encoded[prompt], cont))
        return self._loglikelihood_tokens(new_reqs)

    def _final_prompt(self, context: str, outputs: Mapping[str, str] | None) -> str:
        """The answering prompt in the form the scoring adapter was trained on (the bare base: full)."""
        stage = self._answering_stage(outputs is None)
        form = self.stack.prompt_form(self.final_adapter)
        return self.stack.render_prompt(stage, context.strip(), None, outputs or {}, form=form)

    def _answering_stage(self, direct: bool = False) -> Any:
        """The stage that answers: the final one after the chain, or (a baseline, the direct path) the stack's
        direct stage, under the final stage's name."""
        if self.system in BASELINES or direct:
            return self.stack.direct_stage(self.final.name)
        return self.final

    def _loglikelihood_paths(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """ensemble / gate: group the requests into questions, score the paths each mode needs, combine."""
        pairs = [req.args for req in requests]
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(scoring_modes.question_key(req), []).append(i)
        for members in groups.values():
            members.sort(key=lambda i: getattr(requests[i], "idx", 0))
        direct = self._score(pairs, None)
        out: list[tuple[float, bool]] = list(direct)
        task_of = {key: key[0] for key in groups}
        if self.scoring == "ensemble":
            weights = {key: _value(self.weight, task_of[key]) for key in groups}
            need = [key for key in groups if weights[key] is None or weights[key] < 1.0]
            idx = [i for key in need for i in groups[key]]
            chains = []
            for k in range(self.chains):
                outputs = self._earlier_outputs([pairs[i][0] for i in idx], sample=k)
                chains.append(dict(zip(idx, self._score([pairs[i] for i in idx], outputs), strict=True)))
            self.chain_questions += len(need)
            for key, members in groups.items():
                record = self._record(key, [direct[i][0] for i in members])
                record.chains = [[c[i][0] for i in members] for c in chains] if key in need else []
                record.chain_ran = key in need
                if weights[key] is None:
                    continue  # tuning: keep the direct scores
                scores = scoring_modes.ensemble(record.direct, record.chains, weights[key])
                for i, s in zip(members, scores, strict=True):
                    out[i] = (s, direct[i][1])
            return out
        # gate: a greedy chain for the questions the direct path is unsure about (all of them while tuning)
        thresholds = {key: _value(self.threshold, task_of[key]) for key in groups}
        for key, members in groups.items():
            self._record(key, [direct[i][0] for i in members])
        unsure = [
            key
            for key in groups
            if thresholds[key] is None or self.records[key].margin < thresholds[key]  # type: ignore[operator]
        ]
        idx = [i for key in unsure for i in groups[key]]
        chain = dict(
            zip(
                idx,
                self._score([pairs[i] for i in idx], self._earlier_outputs([pairs[i][0] for i in idx])),
                strict=True,
            )
        )
        self.chain_questions += len(unsure)
        for key in unsure:
            members = groups[key]
            record = self.records[key]
            record.chains = [[chain[i][0] for i in members]]
            record.chain_ran = True
            if thresholds[key] is None:
                continue
            for i in members:
                out[i] = chain[i]
        return out

    def _open_stage_log(self, path: Path, key: str) -> JsonlLog:
        """Stage texts as they are generated, one JSON line per chain, so a killed eval resumes without writing
        them again. Lines of another setup (`key`) are dropped: they were generated by other adapters or options."""
        log = JsonlLog(path)
        if any(r.get("key") != key for r in log.rows):
            log.open().truncate()
        for r in log.rows:
            self.prefix_cache[(r["context"], r["chain"])] = r["outputs"]
            self.resumed_seconds += r["seconds"]
        self.stage_seconds = self.resumed_seconds
        self.resumed_chains = len(log.rows)
        return log.open()

    def _borrowable(self, path: Path) -> dict[str, tuple[dict[str, str], float]]:
        """Greedy chains another eval of this stack generated the same way (`chain_key`): context -> (stage texts,
        seconds). A missing file lends nothing."""
        if not path.is_file():
            return {}
        rows = JsonlLog(path).rows
        return {r["context"]: (r["outputs"], r["seconds"]) for r in rows
                if r.get("chain") is None and r.get("chains_key") == self.chain_key}  # fmt: skip

    def _shared_stages(self, n: int) -> list[str]:
        """Of stages 1..n, those this row runs as the lending chain did (its un-ablated stack): all of them, or for
        an ablated row the stages before the ablated one (none when it is the first)."""
        names = [s.name for s in self.stack.config.stages[:n]]
        return names[: names.index(self.ablate)] if self.ablate in names else names

    def close(self) -> None:
        if self.stage_log is not None:
            self.stage_log.close()

    def _record(self, key: tuple[str, Any], direct: list[float]) -> scoring_modes.Question:
        record = scoring_modes.Question(task=key[0], doc_id=key[1], direct=direct)
        record.margin = scoring_modes.margin(direct)
        self.records[key] = record
        return record

    def _earlier_outputs(self, contexts: list[str], sample: int | None = None) -> dict[str, dict[str, str]]:
        """Stages 1..N-1 once per distinct context not seen before (all answer choices share the result), greedy,
        or the `sample`-th sampled chain (temperature, seed + sample) for the ensemble."""
        n = len(self.stack.config.stages)
        if self.system != "stack" or n < 2:
            return {}
        todo = list(dict.fromkeys(c for c in contexts if (c, sample) not in self.prefix_cache))
        given: dict[str, dict[str, str]] = {}
        if sample is None and self.borrowable:
            shared = self._shared_stages(n - 1)
            lent = [c for c in todo if c in self.borrowable] if shared else []
            for c in lent:
                outputs, seconds = self.borrowable.pop(c)
                if len(shared) < n - 1:  # an ablated row takes the stages before the ablated one (their seconds
                    given[c] = {name: outputs[name] for name in shared}  # are not kept per stage: not counted)
                    continue
                # the whole chain, generated by another eval: its seconds count as this row's, as a resumed chain's do
                self.prefix_cache[(c, None)] = outputs
                self.resumed_seconds += seconds
                self.stage_seconds += seconds
                self._log_chains([c], None, [outputs], seconds)
            self.borrowed_chains += len(lent) - len(given)
            self.borrowed_prefixes += len(given)
            todo = [c for c in todo if (c, sample) not in self.prefix_cache]
        update: dict[str, Any] = {}
        if self.stage_tokens:
            update["max_new_tokens"] = self.stage_tokens
        if sample is not None:
            update.update(temperature=self.temperature, seed=self.seed + 1000 * sample)
        what = "earlier stages" if sample is None else f"earlier stages, chain {sample + 1}/{self.chains}"
        done = 0
        groups = [c for c in todo if c in given], [c for c in todo if c not in given]  # a batch shares given stages
        batches = [group[i : i + self.stage_batch] for group in groups for i in range(0, len(group), self.stage_batch)]
        for chunk in batches:
            start = time.perf_counter()
            prefixes = [given[c] for c in chunk] if chunk[0] in given else None
            outputs = run_stages(self.stages, [c.strip() for c in chunk], self.adapters, n - 1, update, prefixes)
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.stage_seconds += elapsed
            self.stage_calls += len(chunk)
            for context, out in zip(chunk, outputs, strict=True):
                self.prefix_cache[(context, sample)] = out
            self._log_chains(chunk, sample, outputs, round(elapsed / len(chunk), 4))
            done += len(chunk)
            self._report(what, done, len(todo))
        return {c: self.prefix_cache[(c, sample)] for c in contexts}

    def _log_chains(self, contexts: list[str], sample: int | None, outputs: list[dict[str, str]], each: float) -> None:
        if self.stage_log is not None:
            self.stage_log.append(
                [
                    {"key": self.stage_log_key, "chains_key": self.chain_key, "context": c, "chain": sample,
                     "outputs": o, "seconds": each}
                    for c, o in zip(contexts, outputs, strict=True)
                ]
            )  # fmt: skip

    def greedy_outputs(self) -> dict[str, dict[str, str]]:
        """Context -> the greedy chain's stage outputs generated so far (the stage-agreement check reads these)."""
        return {c: out for (c, sample), out in self.prefix_cache.items() if sample is None}

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log-probs of the continuation tokens + whether greedy decoding would produce them.

        The backend scores the requests that share a context together (one pass over a question's prompt for all
        its choices); we hand it whole questions, longest first, a few hundred requests at a time, only to report
        progress between calls: a question is never split across calls, and the chunks are fixed by the requests.
        """
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        ordered = sorted(groups.values(), key=lambda g: (-len(pairs[g[0]][0]), g[0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        step = self.fixed_batch * 16
        start = time.perf_counter()
        done = 0
        chunk: list[int] = []
        for n, members in enumerate(ordered):
            chunk += members
            if len(chunk) < step and n + 1 < len(ordered):
                continue
            scores = self.stack.backend.score([pairs[i] for i in chunk], self.final_adapter, self.fixed_batch)
            for i, score in zip(chunk, scores, strict=True):
                results[i] = score
                self.scored_tokens += len(pairs[i][1])
            done += len(chunk)
            chunk = []
            self._report("scoring", done, len(pairs))
        self.seconds += time.perf_counter() - start
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring of raw text with the final stage's adapter (no stage prompt: the text is the
        document itself, there is no instruction to prompt with). `base` uses the bare model, `single` its adapter."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(s for s, _ in scores))
        return out

    # --- generation --------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The system's answer: the whole stack (greedy chain, then the final stage), the baseline or the base model
        answering directly; `until` and `max_gen_toks` apply to the answering step.

        Requests with the same generation settings go to the backend together, `batch_size` at a time (a
        generative multiple-choice task sends one setting for all its questions). The answering step runs on the
        stage backend when that has its adapter (the bare base and the exported stages), else on PyTorch.
        """
        answers: list[str | None] = [None] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_settings.setdefault(json.dumps(req.args[1] or {}, sort_keys=True, default=str), []).append(i)
        adapter = self.final_adapter
        runner = self.stages if adapter is None or self.stages.backend.has_adapter(adapter) else self.stack
        done = 0
        for members in by_settings.values():
            settings = self._answer_settings(requests[members[0]].args[1])
            for b in range(0, len(members), self.fixed_batch):
                chunk = members[b : b + self.fixed_batch]
                contexts = [requests[i].args[0] for i in chunk]
                start = time.perf_counter()
                texts = self._answers(runner, contexts, adapter, settings)
                self.seconds += time.perf_counter() - start
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = text
                done += len(chunk)
                self._report("generating", done, len(requests))
        return [a or "" for a in answers]

    def _answers(self, runner: Any, contexts: list[str], adapter: str | None, settings: Any) -> list[str]:
        """The answering step for a batch of contexts on `runner`: the final stage (or the direct stage) through
        `Stack.run_stage`; `base` continues lm-eval's raw context itself, as lm-eval's `hf` model does (no stage
        prompt at all)."""
        if self.system == "base":
            return [c.text for c in runner.backend.generate(contexts, None, settings, label=self.final.name)]
        outputs = self._earlier_outputs(contexts)
        rows = [_Context(c.strip(), None, outputs.get(c, {})) for c in contexts]
        stage = self._answering_stage()
        return [r.output for r in runner.run_stage(stage, rows, adapter=adapter, settings=settings)]

    def _answer_settings(self, kwargs: Mapping[str, Any] | None) -> Any:
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = self.gen_tokens or int(kwargs.get("max_gen_toks", self.final.generation.max_new_tokens))
        return self.final.generation.model_copy(
            update={
                "max_new_tokens": max_new,
                "stop": [*self.final.generation.stop, *until],
                "temperature": float(kwargs.get("temperature", 0.0) or 0.0),
            }
        )

    def _report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)


class _Context(NamedTuple):
    """One lm-eval context as a stage reads it: the question, no input, and the chain's earlier outputs."""

    instruction: str
    input: str | None
    outputs: Mapping[str, str]


def _per_task(value: PerTask | str) -> PerTask:
    """A model_args string ("0.3") as a float; a float, a per-task mapping or None as given."""
    if isinstance(value, str):
        return float(value) if value.strip() else None
    return value


def _value(value: PerTask, task: str) -> float | None:
    if isinstance(value, Mapping):
        return value.get(task)
    return value
