"""transformers + PEFT backend: one base model in memory, every stage's LoRA attached by name."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from fslm import models
from fslm.backends import Completion, TextCallback, TokenizerPrompts, cut_at_stop, fit_to_context
from fslm.config import BaseModelSettings, GenerationSettings
from fslm.errors import FslmError

# peft (0.21) calls a transformers method deprecated in v5; the warning is noise for our users, not theirs to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class TorchBackend(TokenizerPrompts):
    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, prompt_format: str = "auto") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.adapters: dict[str, Path] = {}
        self.eos_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_settings(cls, settings: BaseModelSettings, stack_dir: str | Path | None = None) -> TorchBackend:
        ref = models.resolve(settings.model, stack_dir)
        model, tokenizer = models.load_base(ref, settings)
        return cls(model, tokenizer, settings.prompt_format)

    # --- the Backend interface --------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        cfg = self.base_model.config
        return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 2048))

    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

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
        else:  # silence the "temperature is set but do_sample=False" warnings of some generation configs
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=settings.stop, tokenizer=tok)
        streamer = _RowStreamer(tok, len(prompts), set(self.eos_ids), on_text) if on_text is not None else None
        with torch.inference_mode(), self.use_adapter(adapter):
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
