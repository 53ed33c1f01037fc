"""transformers + PEFT backend: one base model in memory, every stage's LoRA attached by name."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from fslm import models
from fslm.backends import GENERATE, SCORE, TRAIN, Backend, Completion, TextCallback, cut_at_stop, fit_to_context
from fslm.config import BaseModelSettings, GenerationSettings
from fslm.errors import FslmError
from fslm.precision import autocast
from fslm.precision import resolve as resolve_precision
from fslm.stackdir import ADAPTER_WEIGHTS

# peft (0.21) calls a transformers method deprecated in v5; the warning is noise for our users, not theirs to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# Tokens of KV cache the batched choice scoring may hold at once (one padded context per choice): ~190 MB for a
# SmolLM2-135M (30 layers x 3 KV heads x 64 x 2 x float32 = 46 KB a token). A 400-token stack prompt with 4 choices
# fills it with 2 questions, a 30-token lm-eval context with 8 or more.
SHARED_TOKENS = 4096
# Padded choice positions whose logits one batch holds (x 49k vocabulary x float32 = ~200 MB for SmolLM2): without
# it, many short lm-eval questions fit the cache budget at once and their logits dominate memory (docs/eval.md).
CHOICE_POSITIONS = 1024


class TorchBackend(Backend):
    name = "torch"
    capabilities = frozenset({GENERATE, SCORE, TRAIN})

    def __init__(self, model: Any, tokenizer: Any, prompt_format: str = "auto") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.adapters: dict[str, Path] = {}
        self.eos_ids = _eos_ids(model, tokenizer)
        self.precision = "fp32"  # compute precision of generate/score: fp32 or bf16 (autocast); fslm.precision

    def set_precision(self, precision: str, purpose: str = "") -> str:
        """Run generate and score in `precision` (auto/bf16/fp32, resolved by fslm.precision); returns the choice."""
        self.precision = resolve_precision(precision, purpose)
        return self.precision

    @classmethod
    def from_settings(cls, settings: BaseModelSettings, stack_dir: str | Path | None = None) -> TorchBackend:
        ref = models.resolve_base(settings, stack_dir)
        model, tokenizer = models.load_base(ref, settings)
        return cls(model, tokenizer, settings.prompt_format)

    # --- the Backend interface --------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        cfg = self.base_model.config
        return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 2048))

    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        # PEFT would fall back to a pickled adapter_model.bin (torch.load); fslm reads weights only from safetensors.
        if not (Path(path) / ADAPTER_WEIGHTS).is_file():
            raise FslmError(
                f"{Path(path) / ADAPTER_WEIGHTS}: missing; adapter weights are read only from safetensors "
                "(a pickled adapter_model.bin is never loaded)"
            )
        try:
            if hasattr(self.model, "peft_config"):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise FslmError(f"{path}: cannot attach this adapter to the base model: {str(e).splitlines()[0]}") from None
        self.model.eval()
        self.adapters[name] = Path(path)

    def generate(
        self,
        prompts: list[str],
        adapter: str | None,
        settings: GenerationSettings,
        label: str = "",
        on_text: TextCallback | None = None,
    ) -> list[Completion]:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        max_new = fit_to_context(lengths, settings.max_new_tokens, self.context_length, label)
        enc = enc.to(self.base_model.device)
        sample = settings.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": sample,
            "repetition_penalty": settings.repetition_penalty,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": self.eos_ids,
        }
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
        else:  # silence the "temperature is set but do_sample=False" warnings of some generation configs
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=settings.stop, tokenizer=tok)
        streamer = _RowStreamer(tok, len(prompts), set(self.eos_ids), on_text) if on_text is not None else None
        with torch.inference_mode(), self.use_adapter(adapter), autocast(self.precision, self.base_model.device):
            out = self.model.generate(**enc, **kwargs, streamer=streamer)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        results = []
        for n_prompt, ids in zip(lengths, new, strict=True):
            n = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
            text = tok.decode(ids[:n], skip_special_tokens=True)
            if streamer is not None:
                streamer.flush(len(results), text)
            results.append(Completion(cut_at_stop(text, settings.stop).strip(), int(n_prompt), n))
        return results

    def score(
        self, requests: Sequence[tuple[list[int], list[int]]], adapter: str | None, batch_size: int = 8
    ) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation after its context, and whether greedy decoding yields it.

        Requests that share a context (the answer choices of one question) share one pass over it: the context is
        evaluated once and its KV cache copied to one row per continuation, so a question's 4 choices after a
        400-token stack prompt cost about one prompt, not four (measured in docs/eval.md). Questions are batched,
        longest context first, left-padded with explicit positions (each real token keeps its position), as many
        as fit two budgets (`_fits`: `SHARED_TOKENS` of copied KV cache, `CHOICE_POSITIONS` of choice logits);
        `batch_size` only applies to `score_each`. A score can move by float32 rounding with the other questions
        in its batch, never more. Requests that must be truncated (context + continuation longer than the model's
        context) or have no context go through `score_each` (lm-eval `hf`'s left truncation). Float32 log-softmax throughout.
        """
        limit = self.context_length
        groups: dict[tuple[int, ...], list[int]] = {}
        each: list[int] = []
        for i, (ctx, cont) in enumerate(requests):
            if ctx and cont and len(ctx) + len(cont) <= limit + 1:
                groups.setdefault(tuple(ctx), []).append(i)
            else:
                each.append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        ordered = sorted(groups.items(), key=lambda g: (-len(g[0]), g[1][0]))
        positions = _accepts(self.base_model, "position_ids")
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        for n, group in enumerate(ordered):
            batch.append(group)
            if n + 1 < len(ordered) and positions and _fits([*batch, ordered[n + 1]], requests):
                continue
            scores = self._score_groups([(list(ctx), [list(requests[i][1]) for i in m]) for ctx, m in batch], adapter)
            members = [i for _, m in batch for i in m]
            batch = []
            if scores is None:  # a model whose cache cannot be copied per row
                each.extend(members)
                continue
            for i, score in zip(members, scores, strict=True):
                results[i] = score
        if each:
            each.sort()
            for i, score in zip(each, self.score_each([requests[i] for i in each], adapter, batch_size), strict=True):
                results[i] = score
        return results

    def _score_groups(
        self, groups: list[tuple[list[int], list[list[int]]]], adapter: str | None
    ) -> list[tuple[float, bool]] | None:
        """Contexts (left-padded) once, keeping only their last position's logits; then every continuation but its
        last token, one right-padded row each, over copies of its context's KV cache. Scores in the groups' order."""
        device = self.base_model.device
        pad = self._pad_id()
        width = max(len(ctx) for ctx, _ in groups)
        ids = torch.full((len(groups), width), pad, dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for b, (ctx, _) in enumerate(groups):
            ids[b, width - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
            mask[b, width - len(ctx) :] = 1
        extra: dict[str, Any] = {"logits_to_keep": 1} if _accepts(self.base_model, "logits_to_keep") else {}
        if len(groups) > 1:  # only ever batched where the model takes positions (see `score`)
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        owner = [b for b, (_, conts) in enumerate(groups) for _ in conts]
        conts = [c for _, cs in groups for c in cs]
        rest_width = max(len(c) for c in conts) - 1
        with torch.inference_mode(), self.use_adapter(adapter), autocast(self.precision, device):
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **extra)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
            rest = None
            if rest_width > 0:
                cache_arg = _cache_argument(self.base_model)
                cache = getattr(out, cache_arg, None)
                if not hasattr(cache, "batch_select_indices"):
                    return None
                cache.batch_select_indices(torch.tensor(owner, device=device))
                rows = torch.full((len(conts), rest_width), pad, dtype=torch.long)
                row_mask = torch.zeros((len(conts), rest_width), dtype=torch.long)
                for r, c in enumerate(conts):
                    rows[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    row_mask[r, : len(c) - 1] = 1
                step: dict[str, Any] = {cache_arg: cache}
                if "position_ids" in extra:
                    lengths = mask.sum(-1)[owner]
                    step["position_ids"] = (lengths[:, None] + torch.arange(rest_width)[None, :]).to(device)
                rest = self.model(
                    input_ids=rows.to(device),
                    attention_mask=torch.cat([mask[owner], row_mask], dim=1).to(device),
                    use_cache=True,
                    **step,
                ).logits
            del out
        scores = []
        for r, (b, c) in enumerate(zip(owner, conts, strict=True)):
            target = torch.tensor(c)
            lp = first[b][None, :]
            if len(c) > 1 and rest is not None:
                lp = torch.cat([lp, torch.log_softmax(rest[r, : len(c) - 1].float(), dim=-1).cpu()])
            greedy = bool((lp.argmax(dim=-1) == target).all())
            scores.append((float(lp.gather(1, target[:, None]).sum()), greedy))
        return scores

    def score_each(
        self, requests: Sequence[tuple[list[int], list[int]]], adapter: str | None, batch_size: int = 8
    ) -> list[tuple[float, bool]]:
        """Every request in full, as lm-eval's `hf` model scores: fixed `batch_size`, requests sorted longest first,
        right padding (real tokens keep their positions), float32 log-softmax, contexts too long for the model
        left-truncated. Logits are computed only for the positions that predict a continuation token
        (`logits_to_keep`), and log-softmax only over those rows: a batch of 8 long prompts would otherwise hold
        8 x length x vocabulary float32 logits (hundreds of MB for a 49k vocabulary).
        """
        limit = self.context_length
        pad = self._pad_id()
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]) - len(requests[i][1]), i))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        device = self.base_model.device
        keep_arg = _accepts(self.base_model, "logits_to_keep")
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            rows, spans = [], []
            for i in batch:
                ctx, cont = requests[i]
                whole = (list(ctx) + list(cont))[-(limit + 1) :][:-1]  # input = everything but the last token
                rows.append(whole)
                spans.append((len(whole) - len(cont), list(cont)))
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            first = min(start for start, _ in spans)
            last = max(start + len(cont) for start, cont in spans)
            extra: dict[str, Any] = {}
            offset = 0
            if keep_arg:
                extra["logits_to_keep"] = torch.arange(first, last, device=device)
                offset = first
            with torch.inference_mode(), self.use_adapter(adapter), autocast(self.precision, device):
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
            for j, i in enumerate(batch):
                start, cont = spans[j]
                rows_logits = logits[j, start - offset : start - offset + len(cont)].float()
                lp = torch.log_softmax(rows_logits, dim=-1).cpu()
                target = torch.tensor(cont)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (float(lp.gather(1, target[:, None]).sum()), greedy)
            del logits
        return results

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    # --- training hand-over ---------------------------------------------------------------------------

    def release_adapters(self) -> Any:
        """The bare base model with every attached LoRA layer removed (weights untouched, nothing merged), for a
        trainer to wrap a fresh adapter around; `adapters` is empty until the caller attaches them again."""
        if hasattr(self.model, "peft_config"):
            self.model = self.model.unload()
        self.adapters = {}
        return self.model

    def take_model(self, model: Any) -> None:
        """Hold `model` (a bare base handed back by a trainer) as this backend's model again."""
        self.model = model.unload() if hasattr(model, "peft_config") else model
        self.adapters = {}
        self.model.eval()

    def parameter_count(self, adapters: set[str]) -> int:
        """Parameters touched per query: the base once plus the LoRA weights of each adapter used."""
        base = extra = 0
        for name, p in self.model.named_parameters():
            if "lora_" not in name:
                base += p.numel()
            elif any(f".{a}." in name for a in adapters):
                extra += p.numel()
        return int(base + extra)

    # --- helpers ------------------------------------------------------------------------------------

    @property
    def base_model(self) -> Any:
        """The transformers model under any PEFT wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model

    def use_adapter(self, adapter: str | None) -> contextlib.AbstractContextManager[Any]:
        """Activate a stage adapter (or, for None, run the bare base model) for the `with` block."""
        if not hasattr(self.model, "peft_config"):
            if adapter is not None:
                raise FslmError(f"adapter {adapter!r} is not loaded")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.adapters:
            raise FslmError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self.adapters) or 'none'})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()


class _RowStreamer(BaseStreamer):
    """Per-row incremental decoding of a batched generate, so `on_text` sees text token by token.

    transformers calls `put` with the prompt ids first, then with one new token per row each step. A row's text is
    re-decoded from all its tokens (byte-level BPE can only be decoded whole) and only the new suffix is sent; a
    trailing U+FFFD (half a multi-byte character) is held back. `flush` sends what remains of the final text, so
    the deltas concatenate to exactly the text `generate` returns.
    """

    def __init__(self, tokenizer: Any, rows: int, eos: set[int], on_text: TextCallback) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.eos = eos
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.finished = [False] * rows
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        tokens = value.reshape(len(self.ids), -1).tolist()
        for row, new in enumerate(tokens):
            if self.finished[row]:
                continue
            for t in new:
                if t in self.eos:
                    self.finished[row] = True
                    break
                self.ids[row].append(t)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True).rstrip("\ufffd")
            self._send(row, text)

    def end(self) -> None:
        pass

    def flush(self, row: int, final: str) -> None:
        self._send(row, final)

    def _send(self, row: int, text: str) -> None:
        sent = self.sent[row]
        if len(text) > len(sent) and text.startswith(sent):
            self.sent[row] = text
            self.on_text(row, text[len(sent) :])


def _accepts(model: Any, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters


def _fits(batch: Sequence[tuple[tuple[int, ...], list[int]]], requests: Sequence[Any]) -> bool:
    """Whether a batch of questions stays within both budgets: the KV cache it holds while its choices are scored
    (one padded context per choice, `SHARED_TOKENS`) and the choices' logits (`CHOICE_POSITIONS` padded positions
    x vocabulary, float32: ~200 MB for a 49k vocabulary)."""
    width = max(len(ctx) for ctx, _ in batch)
    rows = [len(requests[i][1]) for _, members in batch for i in members]
    return len(rows) * (width + max(rows)) <= SHARED_TOKENS and len(rows) * (max(rows) - 1) <= CHOICE_POSITIONS


def _cache_argument(model: Any) -> str:
    """What the model calls its KV cache, in forward's arguments and in its output: `cache` (transformers >= 5.2x)
    or `past_key_values` (earlier; deprecated since)."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS, the generation config's, and a chat end marker."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
