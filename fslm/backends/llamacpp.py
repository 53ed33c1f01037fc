"""llama.cpp backend: the GGUF files of `fslm export` on llama-cpp-python's low-level API, one context for all stages.

Prompts are rendered AND tokenised by the base model's Hugging Face tokenizer (`fslm.backends.Backend`), and output
ids are decoded by it too: llama.cpp only ever sees token ids, so a stage sees exactly the tokens the PyTorch
backend and training see, whatever llama.cpp's own tokenizer would do.

Where the time goes is measured in docs/export.md; what keeps it on the matrix work:
- One context holds every stage's adapter; a stage activates its own (`llama_set_adapters_lora`). The alternative,
  one context per stage over the same memory-mapped base, costs a KV cache and compute buffers per stage.
- Rows decode together: each row of a `generate` call is a sequence in one unified KV cache, and one
  `llama_decode` per step evaluates the next token of every live row (rows still reading their prompt join the
  same batches), so a stage batch shares each forward pass. Rows wait for room when the cache is full.
- Sampling is native: greedy / temperature / top-p and the repetition penalty are llama.cpp's sampler chain, one
  per row, with the penalty over the whole context (transformers' semantics, so greedy text matches PyTorch's).
  A sampled call with `GenerationSettings.seed` seeds its rows seed, seed + 1, ...: the same seed draws the same
  text, as it does on PyTorch.
- Each stage's shared prompt prefix (chat header, role, template text before the first variable) stays in the
  KV cache, per adapter, as its own sequence; a new row copies it (`llama_memory_seq_cp`, which in a unified
  cache only shares the cells) and evaluates just its own tokens.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fslm import models
from fslm.backends import GENERATE, SCORE, Backend, Completion, TextCallback, cut_at_stop, fit_to_context
from fslm.config import BaseModelSettings, GenerationSettings
from fslm.errors import FslmError
from fslm.files import sha256_file
from fslm.stackdir import GGUF as GGUF_DIR


def default_threads() -> int:
    """All cores up to 4 (llama-cpp-python defaults to half of them, and more than 4 gains little for small models),
    or $FSLM_LLAMACPP_THREADS. On a machine that other work keeps busy, fewer threads are much faster: llama.cpp's
    threads spin-wait for each other, and one descheduled thread stalls them all (docs/export.md, "Threads")."""
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
    capabilities = frozenset({GENERATE, SCORE})

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer: Any,
        prompt_format: str = "auto",
        n_ctx: int | None = None,
        n_threads: int | None = None,
        seed: int = 0,
        max_sequences: int = 32,
        prefix_cache: bool = True,
        native_greedy: bool = False,
        **llama_params: Any,
    ) -> None:
        """Load `gguf_path` into one llama.cpp context.

        n_ctx: KV cells shared by all sequences (default: the model's training context); one sequence may use up to
        the training context. max_sequences: rows decoded together (more wait for a free slot).
        prefix_cache: keep each stage's shared prompt prefix in the KV cache across calls.
        seed: the first seed of sampled rows whose settings carry none (`GenerationSettings.seed` wins).
        native_greedy: greedy rows also use llama.cpp's sampler chain (same tokens; by default greedy is an argmax
        over llama.cpp's logits in numpy, which is cheaper per token: docs/export.md).
        llama_params: fields of llama.cpp's llama_context_params or llama_model_params, e.g. type_k=0, type_v=0
        for an f32 KV cache (exactness checks) or flash_attn_type=0 (off; default: llama.cpp's auto).
        """
        try:
            import llama_cpp.llama_cpp as lc
        except ImportError:
            raise FslmError("the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
        self._lc = lc
        self._model: Any = None
        self._ctx: Any = None
        self._handles: dict[str, Any] = {}
        path = Path(gguf_path)
        if not path.is_file():
            raise FslmError(f"{path}: GGUF file not found (run `fslm export DIR --format gguf` first)")
        avoid_amx()
        _init_llama_backend(lc)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.max_sequences = max(1, max_sequences)
        self.prefix_slots = PREFIX_SLOTS if prefix_cache else 0
        self.native_greedy = native_greedy
        self._open(path, n_ctx, n_threads, llama_params)
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(self._model))
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model)))
        self.n_batch = int(lc.llama_n_batch(self._ctx))  # llama.cpp caps it at n_ctx
        self._batch = _Batch(lc, self.n_batch)
        self.adapters: dict[str, Path] = {}
        self._active: str | None = None
        self._prefixes: dict[tuple[str | None, str], _Prefix] = {}  # (adapter, stage label) -> cached prefix
        self._seeds = itertools.count(seed)
        self._lock = threading.Lock()  # one context: callers from several threads (serve) take turns
        self.eos_ids = _eos_ids(tokenizer, lc.llama_vocab_eos(lc.llama_model_get_vocab(self._model)))
        self.stats = {"prompt_tokens": 0, "prompt_tokens_evaluated": 0, "reused_tokens": 0, "decode_calls": 0}
        # Free adapters and context before interpreter teardown (late in exit the ctypes library may be gone).
        ref = weakref.ref(self)
        atexit.register(lambda: (b := ref()) is not None and b.close())

    def _open(self, path: Path, n_ctx: int | None, n_threads: int | None, llama_params: dict[str, Any]) -> None:
        """Load the model and create its one context (every row of every stage decodes in its unified KV cache)."""
        lc = self._lc
        model_params, context_params = self._params(n_threads, llama_params)
        with _quiet_stderr():
            self._model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise FslmError(f"{path}: llama.cpp cannot load this GGUF file")
        context_params.n_ctx = n_ctx or lc.llama_model_n_ctx_train(self._model)
        with _quiet_stderr():
            self._ctx = lc.llama_init_from_model(self._model, context_params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            self._model = None
            raise FslmError(f"{path}: llama.cpp cannot create a context (n_ctx={context_params.n_ctx})")

    def _params(self, n_threads: int | None, llama_params: dict[str, Any]) -> tuple[Any, Any]:
        """llama.cpp's model and context parameters: its defaults, fslm's choices, then the caller's `llama_params`."""
        lc = self._lc
        model_params = lc.llama_model_default_params()  # after avoid_amx: without AMX buffers where they fault
        context_params = lc.llama_context_default_params()
        context_params.n_batch = context_params.n_ubatch = N_BATCH
        context_params.n_threads = context_params.n_threads_batch = n_threads or default_threads()
        # llama.cpp's own default (on where the device supports it): flash attention skips the cells a row's mask
        # hides instead of multiplying through every live row's cells (docs/export.md has the figures).
        context_params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_AUTO
        context_params.n_seq_max = self.max_sequences + self.prefix_slots
        context_params.kv_unified = True  # one cell pool: a shared prefix is shared cells, any sequence may be long
        context_params.no_perf = True
        for key, value in llama_params.items():
            target = _field_owner(key, context_params, model_params)
            if target is None:
                raise FslmError(
                    f"unknown llama.cpp parameter {key!r} (not in llama_context_params or llama_model_params)"
                )
            setattr(target, key, value)
        return model_params, context_params

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
        cls,
        settings: BaseModelSettings,
        stack_dir: str | Path | None = None,
        gguf: str | Path | None = None,
        **llama_kwargs: Any,
    ) -> LlamaCppBackend:
        """The exported stack in `stack_dir/gguf/` (base.gguf + manifest.json; adapters come via add_adapter), or
        the bare GGUF file `gguf` (a teacher: no export, no adapters), each with the HF tokenizer of the base. A
        stack without an export whose base is itself a GGUF file (a teacher's stack, an untrained stack on the
        embedded model) runs that file bare: an adapter then asks for an export."""
        out = Path(stack_dir) / GGUF_DIR if stack_dir is not None else None
        manifest = out / "manifest.json" if out is not None else None
        if gguf is None and (manifest is None or not manifest.is_file()):
            ref = models.resolve(settings.model, stack_dir)
            gguf = ref.location if ref.kind == "gguf" else None
        if gguf is not None:
            tokenizer = models.load_tokenizer(models.resolve(settings.model, stack_dir), settings)
            return cls(gguf, tokenizer, settings.prompt_format, **llama_kwargs)
        if out is None or manifest is None:
            raise FslmError("the llamacpp backend needs a stack directory with an export (fslm export DIR)")
        if not manifest.is_file():
            raise FslmError(f"{out}: no GGUF export; run `fslm export {stack_dir} --format gguf` first")
        try:
            info = json.loads(manifest.read_text())
            base = out / info["base"]["file"]
        except (ValueError, KeyError, TypeError) as e:
            raise FslmError(f"{manifest}: unreadable export manifest ({e}); re-run fslm export") from None
        exported_for = info["base"].get("model") if isinstance(info.get("base"), dict) else None
        if exported_for is not None and exported_for != settings.model:
            raise FslmError(
                f"{manifest}: exported for base {exported_for!r}, but stack.yaml says {settings.model!r}; "
                "re-run fslm export"
            )
        tokenizer = models.load_tokenizer(models.resolve_base(settings, stack_dir), settings)
        backend = cls(base, tokenizer, settings.prompt_format, **llama_kwargs)
        backend.export_dir = out
        backend.manifest = info
        return backend

    # --- the Backend interface --------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """The longest prompt + output of one sequence: the model's training context, or less when n_ctx (the KV
        cells all sequences share) is smaller."""
        return min(int(self._lc.llama_n_ctx(self._ctx)), self.n_ctx_train)

    @property
    def kv_cells(self) -> int:
        return int(self._lc.llama_n_ctx(self._ctx))

    def add_adapter(self, name: str, path: Path) -> None:
        """Load a GGUF LoRA adapter; a PEFT adapter directory of a stack maps to its exported `<name>.lora.gguf`."""
        path = Path(path)
        if path.is_dir():
            # a stack's adapters/<stage>/ -> the stack's gguf/<stage>.lora.gguf
            gguf_file = getattr(self, "export_dir", path.parent.parent / GGUF_DIR) / f"{name}.lora.gguf"
            if not gguf_file.is_file():
                raise FslmError(f"{gguf_file}: {name!r} has an adapter but no GGUF export of it; re-run fslm export")
            manifest = getattr(self, "manifest", {}).get("adapters", {}).get(name, {})
            weights = path / "adapter_model.safetensors"
            if manifest.get("source_sha256") and weights.is_file():
                if sha256_file(weights) != manifest["source_sha256"]:
                    raise FslmError(f"{weights}: changed since the GGUF export; re-run fslm export")
            path = gguf_file
        with self._lock:
            with _quiet_stderr():
                handle = self._lc.llama_adapter_lora_init(self._model, str(path).encode())
            if not handle:
                raise FslmError(
                    f"{path}: llama.cpp cannot load this LoRA adapter (wrong base model or not a GGUF LoRA)"
                )
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
        """All rows decode together: one `llama_decode` per step for every live row (see the module docstring)."""
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
        if not prompts:
            return []
        encoded = [self.tokenizer(p, add_special_tokens=not self.chat)["input_ids"] for p in prompts]
        if not all(encoded):
            raise FslmError(f"stage {label!r}: a prompt has no tokens (nothing to continue from)")
        max_new = fit_to_context([len(e) for e in encoded], settings.max_new_tokens, self.context_length, label)
        self.use_adapter(adapter)
        rows = [_Row(i, ids) for i, ids in enumerate(encoded)]
        try:
            prefix = self._shared_prefix(adapter, label, encoded)
            # A seeded call draws the same text every time (as on PyTorch); an unseeded one continues this
            # backend's own sequence of seeds, so repeated calls draw anew.
            seeds = self._seeds if settings.seed is None else itertools.count(settings.seed)
            self._decode_rows(rows, prefix, max_new, settings, on_text, seeds)
        finally:
            for row in rows:
                if row.sampler is not None:
                    self._lc.llama_sampler_free(row.sampler)
                if row.seq >= 0:
                    self._lc.llama_memory_seq_rm(self._mem, row.seq, -1, -1)
        results = []
        for row in rows:
            text = self.tokenizer.decode(row.new, skip_special_tokens=True)
            if on_text is not None and len(text) > len(row.sent) and text.startswith(row.sent):
                on_text(row.index, text[len(row.sent) :])
            results.append(Completion(cut_at_stop(text, settings.stop).strip(), len(row.ids), len(row.new)))
        return results

    def score(
        self, requests: Sequence[tuple[list[int], list[int]]], adapter: str | None, batch_size: int = 8
    ) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation after its context, and whether greedy decoding yields it
        (lm-eval's loglikelihood), as the torch backend scores: float32 log-softmax, a context too long for the
        model left-truncated. Requests sharing a context (a question's choices) evaluate it once: its cells are
        shared (`llama_memory_seq_cp`) by one sequence per continuation, and several questions go through each
        `llama_decode` together, within the row and KV-cell budgets. `batch_size` is not used: the budgets decide."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        limit = self.context_length
        for i, (ctx, cont) in enumerate(requests):
            cont = list(cont)[-limit:]
            if not cont:
                raise FslmError("scoring: an empty continuation has no log-probability")
            if not ctx:
                start = self._bos()
                if start is None:
                    raise FslmError("scoring: a request without context, and the model has no BOS or EOS token")
                ctx = [start]
            whole = (list(ctx) + cont)[-(limit + 1) :]  # lm-eval's left truncation
            groups.setdefault(tuple(whole[: len(whole) - len(cont)]), []).append((i, cont))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with self._lock:
            self.use_adapter(adapter)
            wave: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = []
            for group in sorted(groups.items(), key=lambda g: (-len(g[0]), g[1][0][0])):
                if wave and not self._wave_fits([*wave, group]):
                    self._score_wave(wave, results)
                    wave = []
                wave.append(group)
            if wave:
                self._score_wave(wave, results)
        return results

    def _wave_fits(self, wave: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]) -> bool:
        """Questions scored together: one sequence per continuation, their cells within the free KV cache, and
        about two batches of tokens (more gains little on a CPU and holds more logits)."""
        rows = sum(len(m) for _, m in wave)
        cells = sum(len(c) + sum(len(t) for _, t in m) for c, m in wave)
        return rows <= self.max_sequences and cells <= min(2 * self.n_batch, self.kv_cells - self._held())

    def _score_wave(
        self, wave: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]], results: list[tuple[float, bool]]
    ) -> None:
        """Contexts first (the last position's logits kept), then every continuation but its last token on its own
        copy of the context's sequence; each position's log-softmax is taken as soon as its batch is decoded."""
        lc = self._lc
        seqs = itertools.count()
        plans = []  # (context, continuation, request index, sequence id)
        for ctx, members in wave:
            first = next(seqs)
            plans.append((ctx, members, first, [first] + [next(seqs) for _ in members[1:]]))
        if sum(len(c) + sum(len(t) for _, t in m) for c, m, *_ in plans) > self.kv_cells - self._held():
            while self._evict(keep=None):
                pass  # one long question: cached prefixes make room
        picks: dict[tuple[int, int], np.ndarray] = {}  # (sequence, position) -> logits row (log-softmax)
        try:
            self._feed([(list(ctx), 0, first, {len(ctx) - 1}) for ctx, _, first, _ in plans], picks)
            for ctx, _, first, ids in plans:
                for seq in ids[1:]:
                    lc.llama_memory_seq_cp(self._mem, first, seq, 0, len(ctx))
            self._feed(
                [(cont[:-1], len(ctx), seq, set(range(len(ctx), len(ctx) + len(cont) - 1)))
                 for ctx, members, _, ids in plans for (_, cont), seq in zip(members, ids, strict=True)],
                picks,
            )  # fmt: skip
        finally:
            for _, _, _, ids in plans:
                for seq in ids:
                    lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        for ctx, members, first, ids in plans:
            for (index, cont), seq in zip(members, ids, strict=True):
                rows = [picks[(first, len(ctx) - 1)]] + [picks[(seq, len(ctx) + j)] for j in range(len(cont) - 1)]
                total, greedy = 0.0, True
                for row, token in zip(rows, cont, strict=True):
                    total += float(row[token])
                    greedy = greedy and int(row.argmax()) == token
                results[index] = (total, greedy)

    def _feed(
        self,
        parts: list[tuple[list[int], int, int, set[int]]],
        picks: dict[tuple[int, int], np.ndarray],
    ) -> None:
        """Evaluate (tokens, first position, sequence, positions whose logits are wanted) in batches of n_batch; the
        wanted rows are kept as float32 log-softmax."""
        lc = self._lc
        batch = self._batch
        wanted: list[tuple[int, int, int]] = []  # (batch index, sequence, position)

        def flush() -> None:
            if batch.size == 0:
                return
            self._decode(batch)
            for index, seq, pos in wanted:
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,))
                top = logits.max()
                picks[(seq, pos)] = logits - (top + np.log(np.exp(logits - top, dtype=np.float32).sum()))
            wanted.clear()

        for tokens, first, seq, keep in parts:
            done = 0
            while done < len(tokens):
                n = min(len(tokens) - done, batch.capacity - batch.size)
                start = batch.size
                batch.add(tokens[done : done + n], first + done, seq, False)
                for j in range(n):
                    if first + done + j in keep:
                        batch.logits[start + j] = 1
                        wanted.append((start + j, seq, first + done + j))
                done += n
                if batch.size == batch.capacity:
                    flush()
        flush()
        self._count_prompt(sum(len(t) for t, *_ in parts), sum(len(t) for t, *_ in parts))

    def _bos(self) -> int | None:
        """The token an empty context starts from (lm-eval: the end-of-text token when there is no BOS)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def parameter_count(self, adapters: set[str]) -> int:
        """Parameters touched per query: the base once plus the LoRA weights of each adapter used."""
        total = int(self._lc.llama_model_n_params(self._model))
        if adapters:
            from gguf import GGUFReader

            for name in adapters:
                if name in self.adapters:
                    total += sum(int(t.n_elements) for t in GGUFReader(self.adapters[name]).tensors)
        return total

    # --- batched decoding -------------------------------------------------------------------------

    def _decode_rows(
        self,
        rows: list[_Row],
        prefix: _Prefix | None,
        max_new: int,
        settings: GenerationSettings,
        on_text: TextCallback | None,
        seeds: Iterator[int],
    ) -> None:
        """Admit rows while their prompt + output fit in the free KV cells, step all live rows together."""
        lc = self._lc
        reuse = len(prefix.tokens) if prefix is not None else 0
        pending = list(reversed(rows))
        free_seqs = list(reversed(range(self.max_sequences)))
        active: list[_Row] = []
        reserved = 0
        while pending or active:
            while pending and free_seqs:
                row = pending[-1]
                need = len(row.ids) - reuse + max_new
                if self._held() + reserved + need > self.kv_cells:
                    if active:
                        break  # wait until a live row finishes and frees its cells
                    if not self._evict(keep=prefix):
                        raise FslmError(f"a prompt of {len(row.ids)} tokens does not fit the KV cache")
                    continue
                pending.pop()
                row.seq, row.need = free_seqs.pop(), need
                if reuse:
                    lc.llama_memory_seq_cp(self._mem, prefix.seq, row.seq, 0, reuse)  # type: ignore[union-attr]
                row.n_past, row.todo = reuse, row.ids[reuse:]
                if settings.temperature > 0 or self.native_greedy:
                    row.sampler = self._sampler(settings, row.ids, seeds)
                else:
                    row.greedy = _Greedy(settings.repetition_penalty, row.ids, self.n_vocab)
                self._count_prompt(len(row.ids), len(row.ids) - reuse)
                reserved += need
                active.append(row)
            self._step(active, lambda row, token: self._take(row, token, max_new, settings, on_text))
            for row in [r for r in active if r.done]:
                lc.llama_memory_seq_rm(self._mem, row.seq, -1, -1)
                free_seqs.append(row.seq)
                row.seq = -1
                reserved -= row.need
                active.remove(row)

    def _step(self, active: list[_Row], take: Callable[[_Row, int], None]) -> None:
        """Evaluate every live row's pending tokens (one sampled token, or the rest of its prompt) in batches of at
        most n_batch tokens, and sample each row right after the batch holding its last token.

        Rows with one token go first, so decoding rows are sampled after the first batch even when new rows'
        prompts follow."""
        batch = self._batch
        outputs: list[tuple[int, _Row]] = []
        for row in sorted(active, key=lambda r: len(r.todo)):
            todo, first = row.todo, row.n_past
            row.todo = []
            row.n_past += len(todo)
            done = 0
            while done < len(todo):
                n = min(len(todo) - done, batch.capacity - batch.size)
                last = done + n == len(todo)
                batch.add(todo[done : done + n], first + done, row.seq, last)
                done += n
                if last:
                    outputs.append((batch.size - 1, row))
                if batch.size == batch.capacity:
                    self._flush(outputs, take)
        self._flush(outputs, take)

    def _flush(self, outputs: list[tuple[int, _Row]], take: Callable[[_Row, int], None]) -> None:
        if self._batch.size == 0:
            return
        self._decode(self._batch)
        lc = self._lc
        for index, row in outputs:
            if row.greedy is not None:
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,))
                take(row, row.greedy.pick(logits))
            else:
                take(row, lc.llama_sampler_sample(row.sampler, self._ctx, index))
        outputs.clear()

    def _decode(self, batch: _Batch) -> None:
        rc = self._lc.llama_decode(self._ctx, batch.struct)
        self.stats["decode_calls"] += 1
        batch.clear()
        if rc != 0:
            what = "no free KV cache cells" if rc == 1 else "aborted" if rc == 2 else "error"
            raise FslmError(f"llama.cpp could not decode a batch ({what}, code {rc})")

    def _take(
        self, row: _Row, token: int, max_new: int, settings: GenerationSettings, on_text: TextCallback | None
    ) -> None:
        """A row's newly sampled token: stop at EOS, a stop string or max_new; stream its text; else feed it back."""
        row.new.append(token)
        if token in self.eos_ids:
            row.done = True
            return
        if on_text is not None or settings.stop:
            text = self.tokenizer.decode(row.new, skip_special_tokens=True)
            if on_text is not None:
                shown = text.rstrip("\ufffd")  # hold back half a multi-byte character
                if len(shown) > len(row.sent) and shown.startswith(row.sent):
                    on_text(row.index, shown[len(row.sent) :])
                    row.sent = shown
            if settings.stop and any(s in text for s in settings.stop):
                row.done = True
                return
        if len(row.new) >= max_new:
            row.done = True
            return
        row.todo = [token]

    def _sampler(self, settings: GenerationSettings, prompt: list[int], seeds: Iterator[int]) -> Any:
        """llama.cpp's sampler chain for one row: penalty, then greedy or temperature -> top-p -> random draw.

        The order is transformers' (repetition penalty, temperature, top-p). The penalty sampler counts the tokens
        it is shown in a window of n_ctx, i.e. the whole context: the prompt's distinct tokens are fed to it here and
        each sampled token is fed by llama_sampler_sample. It divides a positive logit by the penalty and multiplies
        a negative one, once per distinct token, which is transformers' RepetitionPenaltyLogitsProcessor."""
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        penalty = settings.repetition_penalty
        if penalty != 1.0:
            window = self.context_length
            # n_vocab first: this llama.cpp's signature (n_vocab, last_n, repeat, freq, present)
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(self.n_vocab, window, penalty, 0.0, 0.0))
        if settings.temperature > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(settings.temperature))
            if settings.top_p < 1.0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(settings.top_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(next(seeds) % 0xFFFFFFFF))
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        if penalty != 1.0:
            for token in dict.fromkeys(prompt):  # presence is all the penalty uses: each distinct token once
                lc.llama_sampler_accept(chain, token)
        return chain

    # --- prefix reuse -------------------------------------------------------------------------------

    def _shared_prefix(self, adapter: str | None, label: str, encoded: list[list[int]]) -> _Prefix | None:
        """The cached prefix these prompts start with, trimmed to what they share, or a new one evaluated now.

        Keyed by (adapter, stage label): the stage's prompts share its chat header, role and template text, and the
        keys/values depend on the adapter. The shared part is the longest common prefix of token ids (the prompts
        seen so far and these), so it is always exactly how the whole prompt tokenises. Each prompt keeps at least
        its last token to evaluate (its logits give the first output token)."""
        if not self.prefix_slots:
            return None
        key = (adapter, label)
        entry = self._prefixes.pop(key, None)  # re-inserted last: most recently used
        limit = min(len(ids) for ids in encoded) - 1
        shared = (entry.tokens if entry is not None else encoded[0])[:limit]
        for ids in encoded:
            shared = shared[: _common_length(shared, ids)]
        if entry is not None:
            if not shared:
                self._drop(entry)
                return None
            if len(shared) < len(entry.tokens):
                self._lc.llama_memory_seq_rm(self._mem, entry.seq, len(shared), -1)
                entry.tokens = shared
            self._prefixes[key] = entry
            return entry
        if not shared:
            return None
        while len(self._prefixes) >= self.prefix_slots or self._held() + len(shared) > self.kv_cells // 2:
            if not self._evict(keep=None):
                return None
        used = {e.seq for e in self._prefixes.values()}
        seq = next(s for s in range(self.max_sequences, self.max_sequences + self.prefix_slots) if s not in used)
        entry = _Prefix(seq, shared)
        try:
            for start in range(0, len(shared), self.n_batch):
                part = shared[start : start + self.n_batch]
                self._batch.add(part, start, seq, False)
                self._decode(self._batch)
            self._count_prompt(0, len(shared))
        except FslmError:
            self._drop(entry)
            raise
        self._prefixes[key] = entry
        return entry

    def _count_prompt(self, tokens: int, evaluated: int) -> None:
        """stats: prompt tokens of the rows, how many were evaluated, how many came from a cached prefix."""
        self.stats["prompt_tokens"] += tokens
        self.stats["prompt_tokens_evaluated"] += evaluated
        self.stats["reused_tokens"] = self.stats["prompt_tokens"] - self.stats["prompt_tokens_evaluated"]

    def _held(self) -> int:
        """KV cells held by cached prefixes (a row that copies a prefix shares its cells)."""
        return sum(len(e.tokens) for e in self._prefixes.values())

    def _evict(self, keep: _Prefix | None) -> bool:
        """Drop the least recently used cached prefix other than `keep`; False when there is none."""
        for key, entry in self._prefixes.items():
            if entry is not keep:
                del self._prefixes[key]
                self._drop(entry)
                return True
        return False

    def _drop(self, entry: _Prefix) -> None:
        self._lc.llama_memory_seq_rm(self._mem, entry.seq, -1, -1)

    def clear_prefixes(self, adapter: str | None | object = ...) -> None:
        """Forget cached prefixes (all, or those computed under `adapter`)."""
        for key in [k for k in self._prefixes if adapter is ... or k[0] == adapter]:
            self._drop(self._prefixes.pop(key))

    # --- helpers ------------------------------------------------------------------------------------

    def use_adapter(self, adapter: str | None) -> None:
        """Make `adapter` (None: the bare base) the active one. Cached prefixes are keyed by adapter, and rows'
        sequences never outlive a call, so nothing in the KV cache needs clearing."""
        if adapter is not None and adapter not in self._handles:
            raise FslmError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._handles) or 'none'})")
        if adapter == self._active:
            return
        lc = self._lc
        if adapter is None:
            rc = lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(self._handles[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            rc = lc.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if rc != 0:
            raise FslmError(f"llama.cpp refused to activate adapter {adapter!r} (code {rc})")
        self._active = adapter

    def logits(self, token_ids: list[int], adapter: str | None) -> np.ndarray:
        """Logits at every position of `token_ids`: for agreement checks against torch."""
        lc = self._lc
        out = np.empty((len(token_ids), self.n_vocab), dtype=np.float32)
        with self._lock:
            self.use_adapter(adapter)
            try:
                for start in range(0, len(token_ids), self.n_batch):
                    part = token_ids[start : start + self.n_batch]
                    self._batch.add(part, start, 0, True, every=True)
                    self._decode(self._batch)
                    for i in range(len(part)):
                        row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                        out[start + i] = row
            finally:
                lc.llama_memory_seq_rm(self._mem, 0, -1, -1)
        return out

    def _free(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        self.adapters.pop(name, None)
        if handle is not None:
            if self._active == name:
                self.use_adapter(None)
            self.clear_prefixes(name)
            self._lc.llama_adapter_lora_free(handle)

    def close(self) -> None:
        """Free the adapters, the context and the model now (idempotent)."""
        for name in list(self._handles):
            self._free(name)
        if self._ctx is not None:
            self._lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._lc.llama_model_free(self._model)
            self._model = None


PREFIX_SLOTS = 8  # cached prefixes (stages x adapters in use); each is its own sequence id
N_BATCH = 512  # tokens per llama_decode call


@dataclass
class _Prefix:
    """A prompt prefix held in the KV cache as sequence `seq`, computed under the adapter it is keyed by."""

    seq: int
    tokens: list[int]


@dataclass
class _Row:
    """One prompt of a generate call while it decodes."""

    index: int
    ids: list[int]
    seq: int = -1  # its sequence id while live
    need: int = 0  # KV cells reserved for it
    n_past: int = 0  # its tokens in the KV cache
    todo: list[int] = field(default_factory=list)  # tokens to evaluate next
    new: list[int] = field(default_factory=list)  # output ids (an ending EOS included, as the torch backend counts)
    sent: str = ""  # text streamed so far
    sampler: Any = None  # llama.cpp's sampler chain, or
    greedy: _Greedy | None = None  # greedy in numpy
    done: bool = False


class _Greedy:
    """Greedy decoding with transformers' repetition penalty, on a view of llama.cpp's logits (no copy without one).

    The penalty divides a positive logit by `penalty` and multiplies a negative one, once per distinct token of the
    prompt and output so far: transformers' RepetitionPenaltyLogitsProcessor, and llama.cpp's penalties sampler with
    a window of the whole context. Ties go to the lowest token id, as with torch's argmax and llama.cpp's greedy."""

    def __init__(self, penalty: float, prompt: list[int], n_vocab: int) -> None:
        self.penalty = penalty
        self.seen = np.zeros(n_vocab, dtype=bool)
        ids = np.asarray(prompt, dtype=np.int64)
        self.seen[ids[(ids >= 0) & (ids < n_vocab)]] = True
        self.ids = np.flatnonzero(self.seen)

    def pick(self, logits: np.ndarray) -> int:
        if self.penalty == 1.0:
            return int(logits.argmax())
        scores = logits.copy()
        values = scores[self.ids]
        scores[self.ids] = np.where(values < 0, values * self.penalty, values / self.penalty)
        token = int(scores.argmax())
        if not self.seen[token]:
            self.seen[token] = True
            self.ids = np.append(self.ids, token)
        return token


class _Batch:
    """A `llama_batch` over numpy arrays owned here (one sequence id per token), filled a slice at a time."""

    def __init__(self, lc: Any, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_p = ctypes.POINTER(lc.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_p * capacity)(*(ctypes.cast(base + 4 * i, seq_p) for i in range(capacity)))
        self.struct = lc.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(lc.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_p)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def add(self, tokens: list[int], first_pos: int, seq: int, last_logits: bool, every: bool = False) -> None:
        """Append tokens of one sequence at positions first_pos...; logits for the last one (or every one)."""
        a, b = self.size, self.size + len(tokens)
        self.token[a:b] = tokens
        self.pos[a:b] = np.arange(first_pos, first_pos + len(tokens), dtype=np.int32)
        self.seq[a:b] = seq
        self.logits[a:b] = 1 if every else 0
        if last_logits and b > a:
            self.logits[b - 1] = 1
        self.size = b
        self.struct.n_tokens = b

    def clear(self) -> None:
        self.size = 0
        self.struct.n_tokens = 0


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _field_owner(name: str, *structs: Any) -> Any:
    for struct in structs:
        if any(f[0] == name for f in type(struct)._fields_):
            return struct
    return None


_BACKEND_READY = False


def _init_llama_backend(lc: Any) -> None:
    """llama_backend_init once per process, and llama.cpp's log (routed to the "llama-cpp-python" logger, which
    prints everything down to debug while its level is unset) limited to errors, as llama_cpp.Llama(verbose=False)
    does."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        import logging

        llama_log = logging.getLogger("llama-cpp-python")
        if llama_log.level == logging.NOTSET:
            llama_log.setLevel(logging.ERROR)
        with _quiet_stderr():
            lc.llama_backend_init()
        _BACKEND_READY = True


def _eos_ids(tokenizer: Any, gguf_eos: int) -> set[int]:
    """Every token that ends a turn: the HF tokenizer's EOS, the GGUF's EOS, and chat end markers."""
    ids: set[int] = set()
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    if gguf_eos >= 0:
        ids.add(int(gguf_eos))
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
