"""llama.cpp backend: the GGUF files of `fslm export` on llama-cpp-python, one context, adapters hot-swapped.

Prompts are rendered AND tokenised by the base model's Hugging Face tokenizer (`fslm.backends.Backend`), and output
ids are decoded by it too: llama.cpp only ever sees token ids, so a stage sees exactly the tokens the PyTorch
backend and training see, whatever llama.cpp's own tokenizer would do.

One context with every stage's adapter loaded; switching stage swaps the active adapter and clears the KV cache
(cached keys/values were computed under the previous adapter). The alternative, one context per stage over the
same memory-mapped base, costs a KV cache and compute buffers per stage for no speed gain at batch 1 (figures
in docs/export.md).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from fslm import models
from fslm.backends import Backend, Completion, TextCallback, cut_at_stop, fit_to_context
from fslm.config import BaseModelSettings, GenerationSettings
from fslm.errors import FslmError
from fslm.stackdir import GGUF as GGUF_DIR


def default_threads() -> int:
    """All cores up to 4 (llama-cpp-python defaults to half of them, and more than 4 gains little for small models),
    or $FSLM_LLAMACPP_THREADS. On a machine that other work keeps busy, fewer threads are much faster: llama.cpp's
    threads spin-wait for each other, and one descheduled thread stalls them all (2 threads under a load of 8 on 2
    cores: 3 tok/s; 1 thread: 23 tok/s, the embedded model)."""
    wanted = os.environ.get("FSLM_LLAMACPP_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    return max(1, min(4, os.cpu_count() or 1))


def cpu_advertises_amx() -> bool:
    """True where /proc/cpuinfo lists Intel AMX (Linux x86; elsewhere the question does not arise)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def avoid_amx() -> None:
    """Keep llama.cpp off its AMX kernels, which fault on machines that advertise AMX without enabling it.

    Seen on this project's 2-core VMs (Xeon, amx_int8 in cpuinfo): a source build of llama-cpp-python picks up AMX
    via -march=native, repacks weights into its AMX buffer type, and the first multi-token decode dies with a
    general protection fault on `ldtilecfg`. Turning off llama.cpp's extra buffer types (weight repacking) keeps
    the weights in plain CPU buffers and off those kernels. Set FSLM_LLAMACPP_AMX=1 to keep them on a machine
    where AMX works. Patches llama-cpp-python's default model parameters once, process-wide, so it also covers a
    `llama_cpp.server` run in this process (tests/conftest.py does that).
    """
    import llama_cpp.llama_cpp as lc

    if os.environ.get("FSLM_LLAMACPP_AMX") == "1" or not cpu_advertises_amx():
        return
    if getattr(lc.llama_model_default_params, "fslm_avoids_amx", False):
        return
    original = lc.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    defaults.fslm_avoids_amx = True  # type: ignore[attr-defined]
    defaults.fslm_original = original  # type: ignore[attr-defined]
    lc.llama_model_default_params = defaults


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer: Any,
        prompt_format: str = "auto",
        n_ctx: int | None = None,
        n_threads: int | None = None,
        logits_all: bool = False,
        seed: int = 0,
        **llama_kwargs: Any,
    ) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise FslmError("the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
        self._lc = llama_cpp
        avoid_amx()
        path = Path(gguf_path)
        if not path.is_file():
            raise FslmError(f"{path}: GGUF file not found (run `fslm export DIR --format gguf` first)")
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        with _quiet_stderr():
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx or 0,  # 0: the model's training context
                n_batch=512,
                n_threads=n_threads or default_threads(),
                logits_all=logits_all,
                seed=seed,
                verbose=False,
                **llama_kwargs,  # e.g. type_k/type_v=0 for an f32 KV cache (exactness checks)
            )
        self.adapters: dict[str, Path] = {}
        self._handles: dict[str, Any] = {}
        self._active: str | None = None
        self._lock = threading.Lock()  # one context: callers from several threads (serve) take turns
        self.eos_ids = _eos_ids(tokenizer, self.llm)
        # Free adapters and context before interpreter teardown (llama-cpp-python's __del__ fails late in exit).
        ref = weakref.ref(self)
        atexit.register(lambda: (b := ref()) is not None and b.close())

    @classmethod
    def from_gguf(
        cls, path: str | Path, tokenizer: Any, adapters: dict[str, str | Path] | None = None, **kwargs: Any
    ) -> LlamaCppBackend:
        """A backend over any GGUF model (e.g. a bare base as a fast teacher), with optional GGUF LoRA adapters."""
        backend = cls(path, tokenizer, **kwargs)
        for name, adapter in (adapters or {}).items():
            backend.add_adapter(name, Path(adapter))
        return backend

    @classmethod
    def from_settings(
        cls, settings: BaseModelSettings, stack_dir: str | Path | None = None, **llama_kwargs: Any
    ) -> LlamaCppBackend:
        """The exported stack in `stack_dir/gguf/` (base.gguf + manifest.json); adapters come via add_adapter."""
        if stack_dir is None:
            raise FslmError("the llamacpp backend needs a stack directory with an export (fslm export DIR)")
        out = Path(stack_dir) / GGUF_DIR
        manifest = out / "manifest.json"
        if not manifest.is_file():
            raise FslmError(f"{out}: no GGUF export; run `fslm export {stack_dir} --format gguf` first")
        try:
            info = json.loads(manifest.read_text())
            base = out / info["base"]["file"]
        except (ValueError, KeyError, TypeError) as e:
            raise FslmError(f"{manifest}: unreadable export manifest ({e}); re-run fslm export") from None
        tokenizer = models.load_tokenizer(models.resolve(settings.model, stack_dir), settings)
        backend = cls(base, tokenizer, settings.prompt_format, **llama_kwargs)
        backend.export_dir = out
        backend.manifest = info
        return backend

    # --- the Backend interface --------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self.llm.n_ctx())

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a GGUF LoRA adapter; a PEFT adapter directory of a stack maps to its exported `<name>.lora.gguf`."""
        path = Path(path)
        if path.is_dir():
            # a stack's adapters/<stage>/ -> the stack's gguf/<stage>.lora.gguf
            gguf_file = getattr(self, "export_dir", path.parent.parent / GGUF_DIR) / f"{name}.lora.gguf"
            if not gguf_file.is_file():
                raise FslmError(
                    f"{gguf_file}: stage {name!r} has an adapter but no GGUF export of it; re-run fslm export"
                )
            manifest = getattr(self, "manifest", {}).get("adapters", {}).get(name, {})
            weights = path / "adapter_model.safetensors"
            if manifest.get("source_sha256") and weights.is_file():
                from fslm.files import sha256_file

                if sha256_file(weights) != manifest["source_sha256"]:
                    raise FslmError(f"{weights}: changed since the GGUF export; re-run fslm export")
            path = gguf_file
        with _quiet_stderr():
            handle = self._lc.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise FslmError(f"{path}: llama.cpp cannot load this LoRA adapter (wrong base model or not a GGUF LoRA)")
        if name in self._handles:
            self._free(name)
        self._handles[name] = handle
        self.adapters[name] = path

    def generate(
        self,
        prompts: list[str],
        adapter: str | None,
        settings: GenerationSettings,
        label: str = "",
        on_text: TextCallback | None = None,
    ) -> list[Completion]:
        """Rows run one after the other (llama.cpp decodes one sequence per context at a time)."""
        with self._lock:
            return self._generate(prompts, adapter, settings, label, on_text)

    def _generate(
        self,
        prompts: list[str],
        adapter: str | None,
        settings: GenerationSettings,
        label: str,
        on_text: TextCallback | None,
    ) -> list[Completion]:
        encoded = [self.tokenizer(p, add_special_tokens=not self.chat)["input_ids"] for p in prompts]
        max_new = fit_to_context([len(e) for e in encoded], settings.max_new_tokens, self.context_length, label)
        self.use_adapter(adapter)
        results = []
        for row, ids in enumerate(encoded):
            new: list[int] = []
            sent = ""
            for token in self.llm.generate(
                ids,
                temp=settings.temperature,
                top_p=settings.top_p,
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                logits_processor=_repetition_penalty(settings.repetition_penalty),
            ):
                if token in self.eos_ids:
                    new.append(token)
                    break
                new.append(token)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if on_text is not None:
                    shown = text.rstrip("\ufffd")
                    if len(shown) > len(sent) and shown.startswith(sent):
                        on_text(row, shown[len(sent) :])
                        sent = shown
                if settings.stop and any(s in text for s in settings.stop):
                    break
                if len(new) >= max_new:
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if on_text is not None and len(text) > len(sent) and text.startswith(sent):
                on_text(row, text[len(sent) :])
            results.append(Completion(cut_at_stop(text, settings.stop).strip(), len(ids), len(new)))
        return results

    # --- helpers ------------------------------------------------------------------------------------

    def use_adapter(self, adapter: str | None) -> None:
        """Make `adapter` (None: the bare base) the active one; a switch invalidates the KV cache."""
        if adapter is not None and adapter not in self._handles:
            raise FslmError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._handles) or 'none'})")
        if adapter == self._active:
            return
        lc = self._lc
        if adapter is None:
            rc = lc.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(self._handles[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            rc = lc.llama_set_adapters_lora(self.llm.ctx, handles, 1, scales)
        if rc != 0:
            raise FslmError(f"llama.cpp refused to activate adapter {adapter!r} (code {rc})")
        self._active = adapter
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def logits(self, token_ids: list[int], adapter: str | None) -> np.ndarray:
        """Logits at every position of `token_ids` (needs logits_all=True): for agreement checks against torch."""
        if not self.llm._logits_all:
            raise FslmError("logits() needs a backend made with logits_all=True")
        with self._lock:
            self.use_adapter(adapter)
            self.llm.reset()
            self.llm._ctx.kv_cache_clear()
            self.llm.eval(token_ids)
            return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def _free(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            if self._active == name:
                self.use_adapter(None)
            self._lc.llama_adapter_lora_free(handle)

    def close(self) -> None:
        """Free the adapters and the model now (idempotent)."""
        for name in list(self._handles):
            self._free(name)
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


def _repetition_penalty(penalty: float) -> list[Any] | None:
    """transformers' repetition penalty (over prompt AND output, once per distinct token), so greedy text matches
    the PyTorch backend; llama.cpp's own penalty only looks at a window of the last 64 sampled tokens."""
    if penalty == 1.0:
        return None

    def apply(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        seen = np.unique(np.asarray(input_ids, dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < logits.shape[0])]
        values = logits[seen]
        logits[seen] = np.where(values < 0, values * penalty, values / penalty)
        return logits

    return [apply]


def _eos_ids(tokenizer: Any, llm: Any) -> set[int]:
    """Every token that ends a turn: the HF tokenizer's EOS, the GGUF's EOS/EOT, and chat end markers."""
    ids: set[int] = set()
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    for tid in (llm.token_eos(),):
        if isinstance(tid, int) and tid >= 0:
            ids.add(tid)
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """llama.cpp logs model loading on the C stderr; keep it off the user's terminal."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)
