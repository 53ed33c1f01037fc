"""Hand freed heap memory back to the OS between the phases of a long command (glibc only; a no-op elsewhere).

PyTorch on CPU allocates through the C library's malloc. glibc serves blocks below its mmap threshold (which grows
to 32 MB after the first large free) from its heaps, and pages freed there stay in the process: a phase that
needed 1 GB of activations leaves most of that resident for the next one (docs/train.md, "Memory").
`malloc_trim(0)` returns the free pages of every arena; it changes no value the program computes.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from typing import Any


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
