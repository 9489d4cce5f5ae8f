"""segan.allocator: freed training buffers are reused instead of re-faulted from the kernel."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from segan.allocator import ENV_SWITCH

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A training-like loop: the same few large buffers (above glibc's largest dynamic mmap
# threshold, 32 MiB, and below it) allocated, touched and freed every step, with small
# allocations in between; after a warm-up, count the page faults per step.
PROBE = """
import resource, sys, torch
from segan.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tune" else False
def step():
    buffers = [torch.ones(n) for n in (16 << 20, 3 << 20, 10 << 20)]  # 64, 12 and 40 MiB
    small = [str(i) for i in range(100)]
    del buffers, small
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def _probe(mode: str, env_switch: str | None = None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != ENV_SWITCH}
    if env_switch is not None:
        env[ENV_SWITCH] = env_switch
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc-only")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    applied, tuned_faults = _probe("tune")
    _, default_faults = _probe("default")
    assert applied
    # 116 MiB is 29696 pages of 4 KiB: by default glibc unmaps (64 MiB) or trims most of it
    assert default_faults > 8000, default_faults
    assert tuned_faults < 500, tuned_faults


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc-only")
def test_environment_switch_leaves_malloc_alone() -> None:
    applied, faults = _probe("tune", env_switch="0")
    assert not applied
    assert faults > 8000, faults
