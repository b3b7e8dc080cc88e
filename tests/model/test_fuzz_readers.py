"""Fuzzing the readers (hypothesis): mutated copies of small real GGUF and safetensors files either read fully or
are refused with a one-line LowbitError, never another exception or a hang. The mutations (bit flips, byte
writes, edge-case integers over length/count/type/dimension/offset fields, inserted or deleted bytes, truncation)
come from tests/model/untrusted_samples.py, shared with bench/fuzz_readers.py, which runs 100,000+ cases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from tests.model.untrusted_samples import (gguf_seed, mutate, one_line, open_gguf_as_lowbit,
                                           open_safetensors_as_lowbit, random_mutations, safetensors_seed, time_limit,
                                           write_tiny_gguf, write_tiny_safetensors)

GGUF_CASES = 2000
SAFETENSORS_CASES = 1000
CASE_LIMIT_S = 20  # a hard stop for a hang; the hypothesis deadline flags anything slow long before it
FUZZ = settings(deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gguf_sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-gguf")
    return gguf_seed(write_tiny_gguf(folder / "seed.gguf")), folder / "case.gguf"


@pytest.fixture(scope="module")
def safetensors_sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-safetensors")
    return safetensors_seed(write_tiny_safetensors(folder / "seed.safetensors")), folder / "case.safetensors"


def _read_or_refuse(open_file, sample, rng) -> None:
    seed, path = sample
    mutations = random_mutations(rng, seed)
    note(f"mutations: {mutations}")
    path.write_bytes(mutate(seed, mutations))
    with time_limit(CASE_LIMIT_S):
        try:
            open_file(path)
        except LowbitError as exc:
            assert one_line(str(exc)), str(exc)


@settings(FUZZ, max_examples=GGUF_CASES)
@given(rng=st.randoms(use_true_random=False))
def test_mutated_gguf_is_read_or_refused_in_one_line(gguf_sample, rng):
    _read_or_refuse(open_gguf_as_lowbit, gguf_sample, rng)


@settings(FUZZ, max_examples=SAFETENSORS_CASES)
@given(rng=st.randoms(use_true_random=False))
def test_mutated_safetensors_is_read_or_refused_in_one_line(safetensors_sample, rng):
    _read_or_refuse(open_safetensors_as_lowbit, safetensors_sample, rng)


def test_the_unmutated_samples_load(gguf_sample, safetensors_sample):
    assert open_gguf_as_lowbit(gguf_sample[1].with_name("seed.gguf")) == "loaded"
    assert open_safetensors_as_lowbit(safetensors_sample[1].with_name("seed.safetensors")) == "loaded"
