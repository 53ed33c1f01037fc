"""Which backend a stack runs on, decided in one place, and the one place a backend is made.

`auto` is one rule for every caller (`fslm serve`, the stages of `fslm eval`, train's student outputs):
- the manifest's own choice when it names one besides PyTorch (`base.backend: openai` or `llamacpp`);
- else llama.cpp when the export in DIR/gguf/ is current, or, for a caller that refreshes the export before loading
  (`refresh=True`: eval and train export first), when the base architecture exports to GGUF and llama-cpp-python is
  installed (serve does not export, and says why it passes over a stale export);
- else PyTorch.
A caller that needs this directory's adapters as they are now, such as train's student outputs right after
training, passes `local=True`: the manifest's server does not have them, so its choice does not count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fslm import models
from fslm.backends import Backend
from fslm.config import BaseModelSettings, StackConfig
from fslm.errors import FslmError
from fslm.stackdir import StackDir
from fslm.trust import check_trust

log = logging.getLogger("fslm")
AUTO = "auto"
BACKENDS = ("torch", "openai", "llamacpp")


def choose_backend(
    stack_dir: StackDir,
    requested: str = AUTO,
    *,
    refresh: bool = False,
    local: bool = False,
    config: StackConfig | None = None,
) -> str:
    """The backend `requested` (auto or a name) means for this stack, by the rule of the module docstring."""
    if requested != AUTO:
        if requested not in BACKENDS:
            raise FslmError(f"unknown backend {requested!r} (available: {AUTO}, {', '.join(BACKENDS)})")
        return requested
    config = config or stack_dir.load()
    if config.base.backend != "torch" and not local:
        return config.base.backend
    if refresh:
        return "llamacpp" if llamacpp_runs(stack_dir, config) else "torch"
    problem = stack_dir.export_problem(config)
    if problem is None:
        return "llamacpp"
    if problem != "no GGUF export":
        log.warning("not using the GGUF export (%s); re-run fslm export to use it", problem)
    return "torch"


def llamacpp_runs(stack_dir: StackDir, config: StackConfig) -> bool:
    """llama-cpp-python is installed and the base architecture exports to GGUF (any doubt means no)."""
    try:
        import llama_cpp  # noqa: F401

        return models.architecture(models.resolve(config.base.model, stack_dir.root)) in models.GGUF_ARCH
    except Exception:  # any reason the fast path is unavailable means PyTorch
        return False


def export_is_current(stack_dir: StackDir) -> bool:
    """A GGUF export exists and holds exactly the stack's trained stage adapters, each from today's weights (the
    baselines it also holds do not count: stages run on it)."""
    config = stack_dir.load()
    if stack_dir.export_problem(config) is not None:
        return False
    exported = json.loads(stack_dir.gguf_manifest.read_text(encoding="utf-8")).get("adapters", {})
    return set(exported) & set(config.stage_names) == set(stack_dir.trained_stages(config))


def create_backend(
    name: str, settings: BaseModelSettings, stack_dir: Path | str | None = None, **options: Any
) -> Backend:
    """A backend by name, from the manifest's base settings and the stack directory (llama.cpp: its export);
    `options` go to the class (llama.cpp: `n_ctx`, or `gguf`, a bare GGUF file such as a teacher's, instead of the
    export). The user's consent to what the settings ask for is checked first, before any slow load."""
    if name not in BACKENDS:
        raise FslmError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    check_trust(settings, code=True, server=name == "openai")
    return _backend_class(name).from_settings(settings, stack_dir, **options)


def _backend_class(name: str) -> type[Backend]:
    """A backend's class, its module imported only when it is chosen (PyTorch's takes seconds to import)."""
    if name == "llamacpp":
        from fslm.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend
    if name == "openai":
        from fslm.backends.openai import OpenAIBackend

        return OpenAIBackend
    from fslm.backends.pytorch import TorchBackend

    return TorchBackend
