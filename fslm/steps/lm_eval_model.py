"""The stack as an lm-evaluation-harness model: `--model fslm --model_args stack=DIR,system=stack`.

lm-eval 0.4.13 has no plugin discovery, so `fslm lm-eval ...` imports this module (which registers `fslm`) and then
hands its arguments to lm-eval's own CLI. Systems:

- `base`: the bare base model on the raw lm-eval context (no stage prompt), scored as lm-eval's `hf` model does.
- `single`, `multitask`: a baseline adapter (`adapters/single/`, `adapters/multitask/`) answering directly, prompt
  from `Stack.direct_prompt`.
- `stack`: stages 1..N-1 generate once per distinct context (cached: all answer choices share it); the final stage
  scores the continuation after its own prompt, built from the context and the earlier stages' outputs.
  `ablate=<stage>` runs that stage on the bare base model.

Scores are pinned: fixed batch size (model_args `batch_size`, default 8), right padding, float32 log-softmax, and
requests sorted by length, so a score does not depend on how lm-eval batches requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from fslm.backends import SCORE
from fslm.errors import FslmError
from fslm.stack import SYSTEMS
from fslm.stackdir import BASELINES

Progress = Callable[[str, int, int], None]  # (what, done, total)


@register_model("fslm")
class FslmLM(TemplateLM):
    """lm-eval model over a `Stack`; `stack` is a directory (CLI) or a loaded `Stack` (fslm eval reuses one)."""

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
        **_: Any,  # lm-eval passes device etc.; the stack's manifest decides those
    ) -> None:
        super().__init__()
        from fslm.config import Trust
        from fslm.stack import Stack

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
        self.stack.backend.require(SCORE, "lm-eval scoring")
        self.system, self.ablate = system, ablate
        self.fixed_batch = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" would move scores: pinned
        self.progress = progress
        self.stage_tokens = int(stage_tokens) if stage_tokens else None  # cap for stages 1..N-1 (None: manifest)
        self.final = self.stack.config.final_stage
        if system in BASELINES:
            self.stack.load_baseline(system)
        self.prefix_cache: dict[str, dict[str, str]] = {}  # context -> earlier stages' outputs
        self.stage_calls = 0  # contexts sent through stages 1..N-1 (the cache test counts these)
        self.scored_tokens = 0
        self.seconds = 0.0

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
        outputs = self._earlier_outputs([c for c, _ in pairs])
        new_reqs = []
        for context, continuation in pairs:
            prompt = self._final_prompt(context, outputs.get(context, {}))
            ctx = self.stack.backend.encode(prompt)
            # the stage's answer starts a new line after the prompt: drop lm-eval's leading target delimiter
            cont = self.tokenizer.encode(continuation.lstrip(" "), add_special_tokens=False)
            new_reqs.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(new_reqs)

    def _final_prompt(self, context: str, outputs: dict[str, str]) -> str:
        if self.system in BASELINES:
            return self.stack.direct_prompt(context.strip())
        return self.stack.render_prompt(self.final, instruction=context.strip(), outputs=outputs)

    def _earlier_outputs(self, contexts: list[str]) -> dict[str, dict[str, str]]:
        """Run stages 1..N-1 once per distinct context not seen before; all answer choices share the result."""
        n = len(self.stack.config.stages)
        if self.system != "stack" or n < 2:
            return {}
        todo = list(dict.fromkeys(c for c in contexts if c not in self.prefix_cache))
        done = 0
        for i in range(0, len(todo), self.fixed_batch):
            chunk = todo[i : i + self.fixed_batch]
            start = time.perf_counter()
            traces = self.stack.run_batch(
                [c.strip() for c in chunk], adapters=self.adapters, stages=n - 1, max_new_tokens=self.stage_tokens
            )
            self.seconds += time.perf_counter() - start
            self.stage_calls += len(chunk)
            for context, trace in zip(chunk, traces, strict=True):
                self.prefix_cache[context] = trace.outputs
            done += len(chunk)
            self._report("earlier stages", done, len(todo))
        return {c: self.prefix_cache[c] for c in contexts}

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log-probs of the continuation tokens + whether greedy decoding would produce them.

        The backend scores (pinned batches, longest first); we hand it the requests in that same order, a few
        batches at a time, only to report progress between calls: the batches it forms are the same either way.
        """
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), i))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        step = self.fixed_batch * 16
        start = time.perf_counter()
        for b in range(0, len(order), step):
            chunk = order[b : b + step]
            scores = self.stack.backend.score([pairs[i] for i in chunk], self.final_adapter, self.fixed_batch)
            for i, score in zip(chunk, scores, strict=True):
                results[i] = score
                self.scored_tokens += len(pairs[i][1])
            self._report("scoring", min(b + step, len(order)), len(order))
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
        """The whole stack's final answer; `until` and `max_gen_toks` apply to the final stage."""
        backend = self.stack.backend
        answers: list[str] = []
        for b in range(0, len(requests), self.fixed_batch):
            chunk = [req.args for req in requests[b : b + self.fixed_batch]]
            contexts = [c for c, _ in chunk]
            outputs = self._earlier_outputs(contexts)
            start = time.perf_counter()
            for context, kwargs in chunk:  # gen kwargs may differ per request: one call each keeps them exact
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                settings = self.final.generation.model_copy(
                    update={
                        "max_new_tokens": int(kwargs.get("max_gen_toks", self.final.generation.max_new_tokens)),
                        "stop": [*self.final.generation.stop, *until],
                        "temperature": float(kwargs.get("temperature", 0.0) or 0.0),
                    }
                )
                if self.system == "base":
                    prompt = context
                else:
                    prompt = self._final_prompt(context, outputs.get(context, {}))
                (c,) = backend.generate([prompt], self.final_adapter, settings, label=self.final.name)
                answers.append(c.text)
            self.seconds += time.perf_counter() - start
            self._report("generating", len(answers), len(requests))
        return answers

    def _report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)
