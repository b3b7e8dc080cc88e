"""Process memory: keep the resident set close to what is live.

glibc's malloc serves large blocks with their own mmap (given back to the OS on free) but raises that
threshold as such blocks are freed, up to 32 MB; below it, freed blocks stay in its heap. Between lowbit's
phases (evaluation windows of [length, vocab] log-probabilities, quantization, packing, checkpoint writing)
that heap fragmented and kept 300-700 MB of freed tensors resident, so peak RSS depended on the order of
allocations rather than on the model. A fixed threshold makes every block of 1 MB or more its own mapping
(measured on `lowbit quantize` of the default model: peak RSS 1.45 GB instead of 1.55-2.2 GB, for a few
seconds more of page faults).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_done = False


def give_large_blocks_back(threshold: int = 1 << 20) -> None:
    """Make glibc map every allocation of ``threshold`` bytes or more separately (freed = returned to the OS).
    Once per process; a no-op off Linux/glibc or when MALLOC_MMAP_THRESHOLD_ is set in the environment."""
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _done = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


_M_TRIM_THRESHOLD = -1


def reuse_freed_blocks() -> None:
    """For training: keep freed blocks (up to glibc's 32 MB ceiling) in the heap and do not trim it.

    A training step frees and re-allocates the same activations every step. With every block of 1 MB or more
    mapped on its own (``give_large_blocks_back``), each step touched fresh pages: on the default model's
    block-wise QAT, 100-170k page faults per second and ~40% of the CPU time in the kernel. Peak memory is
    set by one step's activations anyway, so keeping them costs nothing more. No-op off Linux/glibc or when
    MALLOC_MMAP_THRESHOLD_ is set in the environment."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass
