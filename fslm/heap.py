"""Keep a long command's heap near what it uses: freed pages handed back, huge pages, tcmalloc (Linux).

PyTorch on CPU allocates through the C library's malloc. glibc serves blocks below its mmap threshold (which grows
to 32 MB after the first large free) from its heaps, and pages freed there stay in the process: a phase that
needed 1 GB of activations leaves most of that resident for the next one (docs/train.md, "Memory").
`malloc_trim(0)` returns the free pages of every arena; it changes no value the program computes.

`prefer_huge_pages()` bounds the same growth within a phase: PyTorch's CPU allocator then page-aligns each large
tensor and marks it for transparent huge pages (`madvise(MADV_HUGEPAGE)`; PyTorch's `THP_MEM_ALLOC_ENABLE`), and
far less of what a training step frees stays resident, at about the same speed (docs/train.md, "Memory", has the
figures of benchmarks/train_step_memory.py).

`preload_allocator()` goes further for the commands that train: it restarts them under tcmalloc, which reuses what
a step frees instead of keeping it (below).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any

from fslm.errors import FslmError


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another C library: nothing to trim
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release() -> bool:
    """Collect garbage, then give the heap's free pages back; True when glibc released something."""
    gc.collect()
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def return_free_memory() -> None:
    """Hand every free page back to the OS, whichever malloc holds it, so resident memory says what the process uses.

    For what reads resident memory to decide (`--gradient-checkpointing auto`, once per adapter): tcmalloc keeps what
    an adapter's steps freed, and the next adapter would see a full budget. Not per step: that tcmalloc keeps the pages
    is what makes its steps fast.
    """
    release()
    tcmalloc = _tcmalloc_release()
    if tcmalloc is not None:
        tcmalloc()


@functools.cache
def _tcmalloc_release() -> Any:
    """tcmalloc's `MallocExtension_ReleaseFreeMemory` when the process runs under it (preloaded), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        return None


THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def prefer_huge_pages() -> bool:
    """Turn on PyTorch's huge-page CPU allocation unless the user chose (True when it will apply).

    PyTorch reads the variable once, at its first allocation: it has to be set before torch is imported, which is
    why `import fslm` calls this first. A user's own `THP_MEM_ALLOC_ENABLE=0` wins.
    """
    if not sys.platform.startswith("linux") or not os.path.exists(THP_SYSFS):
        return False  # no transparent huge pages in this kernel: PyTorch's madvise would fail and warn
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1" and "torch" not in sys.modules


ALLOCATOR_ENV = "FSLM_ALLOCATOR"
PRELOADED_ENV = "FSLM_ALLOCATOR_PRELOADED"  # set in the restarted process: never restart twice
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
PRELOAD_COMMANDS = frozenset({"train", "quickstart"})


def allocator_library(setting: str | None = None) -> str | None:
    """The malloc library a training command should run under, or None for the C library's own.

    `FSLM_ALLOCATOR` (the `setting`): `auto` (default) is tcmalloc when it is installed (Debian/Ubuntu:
    `libtcmalloc-minimal4`), `system` is glibc's malloc, anything else a library name or path to preload (jemalloc).
    """
    setting = setting if setting is not None else os.environ.get(ALLOCATOR_ENV, "auto").strip() or "auto"
    if setting == "system" or not sys.platform.startswith("linux"):
        return None
    if setting != "auto":
        if "/" in setting and not os.path.isfile(setting):
            raise FslmError(f"{ALLOCATOR_ENV}={setting}: no such file (use auto, system, or a malloc library)")
        return setting
    return next((found for name in TCMALLOC if (found := ctypes.util.find_library(name))), None)


def preload_allocator(argv: Sequence[str]) -> None:
    """Restart a training command under tcmalloc when it is installed (Linux; `FSLM_ALLOCATOR` chooses).

    Why: glibc's heap keeps most of what a training step frees, and no setting of it both bounds that and keeps
    the step's speed; tcmalloc reuses freed blocks, and its steps are faster (docs/train.md, "Speed on a CPU"). A malloc can
    only be chosen before a process starts, so the command re-executes itself once with `LD_PRELOAD`; `argv` is the
    command line after the program name.
    """
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command in PRELOAD_COMMANDS:
        restart_under_allocator()


def allocator_in_use() -> str:
    """The malloc this process runs under, for reports: the library it was restarted with, or the C library's."""
    return os.environ.get(PRELOADED_ENV) or "system"


def restart_under_allocator() -> None:
    """Re-execute this process (same interpreter, same command line) under the allocator `allocator_library` picks,
    once, unless the user preloaded a malloc: for any program that trains in-process (benchmarks/experiment2.py,
    benchmarks/prompt_forms.py) as `fslm train` does. Returns when there is nothing to do."""
    if os.environ.get(PRELOADED_ENV):
        return
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preloaded:  # the user already chose an allocator
        return
    library = allocator_library()
    if library is None:
        return
    env = {**os.environ, PRELOADED_ENV: library, "LD_PRELOAD": f"{library} {preloaded}".strip()}
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no stderr line per block over 1 GB
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot re-execute (unusual launchers): run on as we are
        return
