"""The allocator settings for calibration runs: applied once on glibc, never over the user's own MALLOC_* choice."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHECK = "from lowbit.hardware import steady_allocator; print(steady_allocator(), steady_allocator())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_allocator_applies_once_and_respects_the_users_malloc_settings():
    assert _run({}).split() == ["True", "True"]
    assert _run({"MALLOC_ARENA_MAX": "4"}).split() == ["False", "False"]


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_vnni", "AVX-512 VNNI"),
                                             ("fpu avx2 avx_vnni", "AVX-VNNI"), ("fpu sse4_2 avx2", "AVX2"),
                                             ("fpu sse4_2", "no AVX2")])
def test_kernel_class_reads_the_cpu_flags(tmp_path, flags, expected):
    from lowbit.hardware import kernel_class

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert kernel_class(info) == expected
    assert kernel_class(tmp_path / "absent") == "no AVX2"
