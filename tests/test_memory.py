"""The allocator policies of lowbit.memory, seen in the page faults of a fresh process that frees and re-allocates
the same 8 MB tensor (what a training step does with its activations)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, torch
from lowbit import memory
getattr(memory, sys.argv[1])()
def step():
    x = torch.ones(2 << 20)  # 8 MB: above give_large_blocks_back's 1 MB, below glibc's 32 MB ceiling
    return float(x[-1])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(policy: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROGRAM, policy], capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_policy_reuses_freed_blocks_instead_of_faulting_fresh_pages():
    fresh = _faults("give_large_blocks_back")
    reused = _faults("reuse_freed_blocks")
    assert fresh > 50 * 2000  # every step maps the tensor's 2,048 pages afresh
    assert reused < fresh / 4, (fresh, reused)  # measured: ~330 a step, as with glibc's own defaults
