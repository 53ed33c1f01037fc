"""fslm.heap: freed heap pages go back to the OS (glibc), `import fslm` turns on PyTorch's huge-page allocation
unless the user chose, and nothing breaks elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}  # glibc's own behaviour, which release() is for
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env)
    out = out.stdout.split()
    before, freed, after, released = float(out[0]), float(out[1]), float(out[2]), out[3]
    assert freed > before - 64  # free() alone kept (nearly) all of the 256 MiB resident
    assert released == "True" and after < freed - 192  # malloc_trim gave it back


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
    out = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, check=True, env=env)
    setting, offset = out.stdout.split()
    if user is None:
        assert setting == "1" and offset == "0"  # PyTorch honoured it: a large tensor starts on a page (else at 64 B)
    else:
        assert setting == "0"
