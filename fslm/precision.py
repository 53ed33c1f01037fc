"""Which precision PyTorch work runs in: bfloat16 where the hardware computes it natively, float32 elsewhere.

Intel AMX and AVX-512-BF16 (and CUDA GPUs of compute capability 8.0+) multiply bfloat16 matrices several times
faster than float32 (a 2048x2048 matmul on a 2-core Xeon VM with AMX: 1,995 vs 305 GFLOP/s); without them PyTorch
emulates bfloat16 and it is *slower* than float32. So bf16 is chosen by detection, never assumed: `auto` means bf16
only where it is native. Training uses autocast (matrix products in bf16; LoRA weights, optimizer state and the saved
adapters stay float32); inference and scoring use autocast too, so the same loaded model serves either precision.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp32")
log = logging.getLogger("fslm")


def bf16_support() -> tuple[bool, str]:
    """(native bf16 here?, why) — the reason is one line a user can read."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(0)} supports bfloat16"
        return False, f"CUDA device {torch.cuda.get_device_name(0)} has no bfloat16 support"
    amx = _cpu_flag("_is_amx_tile_supported", "amx_bf16")
    avx512 = _cpu_flag("_is_avx512_bf16_supported", "avx512_bf16")
    if amx or avx512:
        return True, f"the CPU computes bfloat16 natively ({'AMX' if amx else 'AVX-512-BF16'})"
    return False, "the CPU has neither AMX nor AVX-512-BF16, so bfloat16 would be emulated (slower than float32)"


def _cpu_flag(torch_probe: str, cpuinfo_flag: str) -> bool:
    import torch

    probe = getattr(torch.cpu, torch_probe, None)
    if probe is not None:
        try:
            return bool(probe())
        except Exception:  # a private torch probe: fall back to /proc/cpuinfo
            pass
    try:
        return cpuinfo_flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def resolve(precision: str, purpose: str = "") -> Literal["bf16", "fp32"]:
    """`auto` -> bf16 where native, else fp32 (with one line saying why); explicit choices are kept."""
    if precision == "bf16":
        native, why = bf16_support()
        if not native:
            log.warning("bf16 asked for%s although %s", f" ({purpose})" if purpose else "", why)
        return "bf16"
    if precision == "fp32":
        return "fp32"
    native, why = bf16_support()
    if not native:
        log.info("%sfloat32: %s", f"{purpose}: " if purpose else "", why)
    return "bf16" if native else "fp32"


def autocast(precision: str, device: Any = "cpu") -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    kind = getattr(device, "type", str(device)).split(":")[0]
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)
