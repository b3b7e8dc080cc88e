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
