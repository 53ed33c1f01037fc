"""fslm.heap: freed heap pages go back to the OS (glibc), `import fslm` turns on PyTorch's huge-page allocation
unless the user chose, training commands restart under tcmalloc when it is there, and nothing breaks elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import skip_or_fail

CHILD = r"""
import torch
from fslm import heap

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # glibc raises its mmap threshold to 16 MB: smaller blocks now come from the heap
blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(64)]  # 256 MiB in 4 MiB heap blocks
keep = torch.ones(4 << 20, dtype=torch.uint8)  # allocated last, at the top of the heap: nothing below it is trimmed
before = rss_mib()
del blocks
freed = rss_mib()
released = heap.release()
after = rss_mib()
print(before, freed, after, released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_returns_freed_heap_pages():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # glibc's own malloc and behaviour,
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # which release() is for
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    out = out.stdout.split()
    before, freed, after, released = float(out[0]), float(out[1]), float(out[2]), out[3]
    assert freed > before - 64  # free() alone kept (nearly) all of the 256 MiB resident
    assert released == "True" and after < freed - 192  # malloc_trim gave it back


TCMALLOC_CHILD = r"""
import torch
from fslm import heap

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(64)]  # 256 MiB
before = rss_mib()
del blocks
freed = rss_mib()
heap.return_free_memory()
print(before, freed, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_return_free_memory_empties_tcmallocs_cache():
    """Under tcmalloc, freed blocks stay resident (its speed) until return_free_memory hands them back, so the
    resident memory that --gradient-checkpointing auto reads before each adapter is what is in use."""
    from fslm import heap

    library = heap.allocator_library("auto")
    if library is None:  # .ci/run installs it (Debian: libtcmalloc-minimal4)
        skip_or_fail("tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    env = {**os.environ, "LD_PRELOAD": library, "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", TCMALLOC_CHILD], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    before, freed, after = (float(x) for x in out.stdout.split())
    assert freed > before - 64  # tcmalloc kept the freed 256 MiB
    assert after < freed - 192  # and gave it back when asked


HUGE = r"""
import os
import fslm
import torch
t = torch.empty(4 << 20, dtype=torch.uint8)
print(os.environ["THP_MEM_ALLOC_ENABLE"], t.data_ptr() % 4096)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's huge-page allocation is Linux only")
@pytest.mark.parametrize("user", [None, "0"])
def test_import_fslm_turns_on_huge_page_allocation_unless_the_user_chose(user):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user
    out = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, check=True, env=env, timeout=120)
    setting, offset = out.stdout.split()
    if user is None:
        assert setting == "1" and offset == "0"  # PyTorch honoured it: a large tensor starts on a page (else at 64 B)
    else:
        assert setting == "0"


PRELOAD = r"""
import os, sys
from fslm import heap
heap.preload_allocator(sys.argv[1:])
print(os.environ.get("FSLM_ALLOCATOR_PRELOADED"), os.path.basename(sys.argv[-1]), sep="|", end="|")
print(",".join(sorted({line.split("/")[-1].strip() for line in open("/proc/self/maps") if "malloc" in line
                       or "global_deps" in line})))
"""


def _preload(command: str, allocator: str | None) -> list[str]:
    unset = ("FSLM_ALLOCATOR", "FSLM_ALLOCATOR_PRELOADED", "LD_PRELOAD")  # the outer run's choices stay out
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if allocator is not None:
        env["FSLM_ALLOCATOR"] = allocator
    out = subprocess.run([sys.executable, "-c", PRELOAD, command], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split("|")


def _stand_in_library() -> str:
    """A shared library every install has and `import fslm` never maps: stands in for an allocator."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent / "lib" / "libtorch_global_deps.so")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_a_training_command_restarts_once_under_the_chosen_allocator():
    library = _stand_in_library()
    marker, last_arg, mapped = _preload("train", library)
    assert marker == library and last_arg == "train"  # restarted with the same arguments, and only once
    assert "libtorch_global_deps.so" in mapped  # the loader really preloaded it
    # other commands, and FSLM_ALLOCATOR=system, run on in the first process
    for command, allocator in (("run", library), ("train", "system")):
        marker, last_arg, mapped = _preload(command, allocator)
        assert marker == "None" and last_arg == command and "libtorch_global_deps.so" not in mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_training_runs_under_tcmalloc_when_it_is_installed():
    from fslm import heap

    library = heap.allocator_library("auto")
    if library is None:  # .ci/run installs it (Debian: libtcmalloc-minimal4)
        skip_or_fail("tcmalloc is not installed (Debian: libtcmalloc-minimal4)")
    marker, _, mapped = _preload("train", None)
    assert marker == library and "tcmalloc" in mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_a_missing_allocator_library_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "FSLM_ALLOCATOR": str(tmp_path / "libnope.so")}
    env.pop("FSLM_ALLOCATOR_PRELOADED", None)
    env.pop("LD_PRELOAD", None)
    cmd = [sys.executable, "-m", "fslm", "train", "x"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "FSLM_ALLOCATOR" in out.stderr and "libnope.so" in out.stderr
    assert "Traceback" not in out.stderr
