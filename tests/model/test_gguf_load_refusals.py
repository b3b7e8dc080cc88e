"""A GGUF file whose header reads but whose metadata transformers cannot turn into a model is refused by
``load_model`` in one LowbitError line naming the file, quickly and without allocating what the metadata claims:
each shape found by bench/fuzz_readers.py's load stage, on a small file written by gguf-py's GGUFWriter."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.model.load import load_model
from tests.model.untrusted_samples import (FF, HEADS, HIDDEN, KV_HEADS, MERGES, _tensors, add_tensor, finish,
                                           tiny_tokens)

# GGUFWriter.add_<name> -> value: the metadata of tests/model/untrusted_samples.py's write_tiny_gguf
METADATA = dict(context_length=128, embedding_length=HIDDEN, block_count=1, feed_forward_length=FF, head_count=HEADS,
                head_count_kv=KV_HEADS, rope_dimension_count=HIDDEN // HEADS, rope_freq_base=10000.0,
                layer_norm_rms_eps=1e-5, tokenizer_model="gpt2", tokenizer_pre="default", token_list=tiny_tokens(),
                token_types=[3] + [1] * (len(tiny_tokens()) - 1), token_merges=MERGES, bos_token_id=0, eos_token_id=0,
                add_bos_token=False)


def write_gguf(path: Path, u32: dict[str, int] | None = None, rows: dict[str, int] | None = None, **changes) -> Path:
    """The tiny Llama GGUF with ``changes`` to its metadata (None leaves an entry out), entries ``u32`` written as
    uint32 under their raw keys, and the tensors named in ``rows`` given that many rows."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in (METADATA | changes).items():
        if value is not None:
            getattr(writer, f"add_{name}")(value)
    for key, value in (u32 or {}).items():
        writer.add_uint32(key, value)
    rng = np.random.default_rng(0)
    for name, data, type_name in _tensors(rng, len(tiny_tokens())):
        if name in (rows or {}):
            data = rng.standard_normal((rows[name], data.shape[1])).astype(np.float32)
        add_tensor(writer, name, data, type_name)
    finish(writer)
    return path


def refused(path: Path, match: str) -> str:
    """The one-line refusal ``load_model`` gives for ``path``, within seconds."""
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=match) as err:
        load_model(str(path))
    message = str(err.value)
    assert "\n" not in message and "\r" not in message and message.startswith(str(path)), message
    assert time.perf_counter() - t0 < 10, "a refusal must not build or allocate what the metadata claims first"
    return message


def test_the_unchanged_file_loads_with_real_buffers(tmp_path):
    """Built on the meta device, the model still gets its rotary frequencies, equal to a CPU-built twin's."""
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(write_gguf(tmp_path / "tiny.gguf")))
    assert not any(p.is_meta for p in loaded.model.parameters())
    twin = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.float32)
    buffers = dict(loaded.model.named_buffers())
    assert buffers.keys() == dict(twin.named_buffers()).keys() and buffers
    for name, value in twin.named_buffers():
        assert torch.equal(buffers[name], value), name


def test_merges_naming_a_token_not_in_the_vocabulary(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", token_merges=[*MERGES, "q q"])  # "qq" is no token
    assert "out of vocabulary" in refused(path, "transformers cannot read its metadata .*Exception")


def test_a_head_count_that_does_not_divide_the_hidden_size(tmp_path):
    refused(write_gguf(tmp_path / "m.gguf", head_count=9), "StrictDataclass.*not a multiple of the number of attention")


def test_an_odd_rotary_dimension(tmp_path):
    refused(write_gguf(tmp_path / "m.gguf", rope_dimension_count=31), "StrictDataclass.*RoPE requires an even")


def test_an_int_where_a_float_is_expected(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", layer_norm_rms_eps=None,
                      u32={"llama.attention.layer_norm_rms_epsilon": 5})
    refused(path, "StrictDataclass.*rms_norm_eps.*expected float")


def test_a_bos_id_past_the_vocabulary(tmp_path):
    refused(write_gguf(tmp_path / "m.gguf", bos_token_id=len(tiny_tokens()) + 30), "IndexError")


def test_a_head_count_of_zero(tmp_path):
    refused(write_gguf(tmp_path / "m.gguf", head_count=0), "ZeroDivisionError")


@pytest.mark.parametrize("change", [dict(embedding_length=2**31), dict(feed_forward_length=2**31 - 1),
                                    dict(feed_forward_length=2**20)])
def test_dimensions_the_tensors_do_not_back_are_refused_before_allocating(tmp_path, change):
    """An embedding length of 2**31 made transformers allocate up to 549 GB (it allocates each parameter before
    moving it to the meta device); now the model is built on the meta device and its size checked first."""
    message = refused(write_gguf(tmp_path / "m.gguf", **change), "its metadata describes a model of")
    assert "parameters" in message and "the file is corrupt" in message


def test_a_block_count_of_2_to_the_31_does_not_build_forever(tmp_path):
    message = refused(write_gguf(tmp_path / "m.gguf", block_count=2**31), "says 2147483648 blocks")
    assert "holds tensors for 1 (none for blk.1)" in message


def test_a_tensor_that_does_not_fit_the_head_layout(tmp_path):
    """Llama's q/k row order is undone by a reshape by head count: 66 query rows do not split into 2 heads."""
    path = write_gguf(tmp_path / "m.gguf", rows={"blk.0.attn_q.weight": 66})
    refused(path, "cannot fit its tensor blk.0.attn_q.weight to the model .*ValueError: cannot reshape")
