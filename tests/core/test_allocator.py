"""bsf_nnunet.allocator: with the tuning, a large tensor freed and allocated again reuses its pages (no page fault per
allocation); BSF_CPU_MALLOC=0 keeps glibc's defaults. Page-fault counts, not times: deterministic."""
import ctypes.util
import os
import subprocess
import sys

import pytest

from bsf_nnunet.allocator import MALLOC_ENV, cpu_malloc_wanted

PROBE = r"""
import resource, sys
import torch
from bsf_nnunet.allocator import release_free_cpu_memory, tune_cpu_allocator
print(tune_cpu_allocator())


def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


def step():  # as a training step: activations of 40-68 MB alive together, then freed
    activations = [torch.ones(10 + i, 1024, 1024) for i in range(8)]
    del activations


step()  # first touch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
kept = resident()
release_free_cpu_memory()  # hands the kept blocks back
print("RELEASED", kept - resident())
"""
PAGES = 4 * sum(10 + i for i in range(8)) * 2 ** 22 // 4096  # pages the four repeated steps touch


def _faults(env_value):
    env = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
    if env_value is not None:
        env[MALLOC_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0], int(out.split("FAULTS")[1].split()[0]), int(out.split("RELEASED")[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc only")
def test_freed_large_blocks_are_reused_unless_turned_off():
    line, faults, released = _faults(None)
    assert "glibc reuses freed memory" in line and f"{MALLOC_ENV}=0" in line
    assert faults < 0.3 * PAGES, (faults, PAGES)
    assert released > 200 * 2 ** 20, released  # the step's ~430 MB were kept, then handed back
    line, faults, _ = _faults("0")
    assert line == f"CPU allocator: the C library's defaults ({MALLOC_ENV}=0)"
    assert faults > 0.8 * PAGES, (faults, PAGES)  # glibc's default: a fresh mmap, and its page faults, every time


def test_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, "maybe")
    with pytest.raises(ValueError, match="BSF_CPU_MALLOC='maybe': use 1"):
        cpu_malloc_wanted()
    monkeypatch.setenv(MALLOC_ENV, "0")
    assert not cpu_malloc_wanted()
