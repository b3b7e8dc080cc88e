"""What the machine can do that changes how lowbit computes (native bf16 matrix units), and the C allocator's
settings for long calibration runs."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN says so: AVX512-BF16 or AMX); without them
    bf16 autocast is several times slower than fp32 (measured 8x on an AVX2-only EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def kernel_class(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What picks onnxruntime's int8 kernels on x86: AVX-512 VNNI, AVX-VNNI, or plain AVX2. Benchmarks keep one
    results section per class: the kernels, and so the speeds, differ by class."""
    info = cpuinfo.read_text() if cpuinfo.is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    return "AVX2" if "avx2" in flags else "no AVX2"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
KEPT_HEAP_BYTES = 256 << 20  # free heap the steady allocator keeps (its trim threshold; memory estimates add it)
_steady = False


def steady_allocator() -> bool:
    """Tell glibc's malloc to keep and reuse freed blocks instead of handing them back to the kernel; True if set.

    A calibration pass allocates and frees activations of 5-15 MB per op, in up to one thread per batch
    (``lowbit.pipeline.sequential``). With glibc's defaults each was mapped and unmapped again: on the 2-core
    machine the CLI's GPTQ run spent 98 s in the kernel zeroing 40 million fresh pages, against 10 s with
    blocks up to 32 MB served from the heap, up to 256 MB of free heap kept, one arena (threads run one at a
    time there anyway): quantization 190 s -> 140 s, peak RSS 1.9 -> 2.4 GB (bench/RESULTS.md). Process-wide
    and once; skipped without glibc or when the user set any MALLOC_* variable (their choice stands).
    """
    global _steady
    if _steady:
        return True
    if any(k.startswith("MALLOC_") for k in os.environ) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, KEPT_HEAP_BYTES), (_M_ARENA_MAX, 1)))
    except (OSError, AttributeError):
        return False
    _steady = ok
    return ok
