"""Causal attention in query chunks: the same numbers as transformers' SDPA attention (exactly in fp32, to
bf16 rounding in bf16), used in bf16 calibration passes only, and every other case handed to SDPA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lowbit.pipeline.attention as attention
from lowbit.pipeline.attention import causal_chunk_attention
from lowbit.pipeline.compute import as_stored, computing_in
from lowbit.pipeline.layers import capture_inputs, find_blocks, run_block
from tests.arch_models import random_ids, tiny_model


def _qkv(heads, kv_heads, length, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, length, dim, generator=g), torch.randn(2, kv_heads, length, dim, generator=g),
            torch.randn(2, kv_heads, length, dim, generator=g))


@pytest.mark.parametrize("heads, kv_heads, length", [(4, 4, 200), (6, 2, 64 * 3), (9, 3, 97)])
def test_chunks_compute_sdpa_attention(monkeypatch, heads, kv_heads, length):
    module = SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads, training=False)
    q, k, v = _qkv(heads, kv_heads, length)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    monkeypatch.setattr(attention, "_LOW_PRECISION", (torch.float32,))  # the chunked path, in fp32
    got, weights = causal_chunk_attention(module, q, k, v, None, scaling=0.3)
    assert weights is None and got.shape == expected.shape == (2, length, heads, q.shape[-1])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    low, _ = causal_chunk_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.3)
    assert low.dtype == torch.bfloat16
    assert (low.float() - expected).norm() / expected.norm() < 1e-2  # bf16 rounding of scores and values


def test_other_cases_go_to_sdpa_unchanged():
    q, k, v = (t.bfloat16() for t in _qkv(4, 2, 130))
    causal = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    encoder = SimpleNamespace(is_causal=False, num_key_value_groups=2, training=False)
    mask = torch.zeros(2, 1, 130, 130, dtype=torch.bfloat16)
    for module, m, extra in [(encoder, None, {}), (causal, mask, {}), (causal, None, {"sliding_window": 32}),
                             (causal, None, {"dropout": 0.1})]:
        torch.manual_seed(0)  # the same dropout draws for both
        got, _ = causal_chunk_attention(module, q, k, v, m, scaling=0.25, **extra)
        torch.manual_seed(0)
        assert torch.equal(got, sdpa_attention_forward(module, q, k, v, m, scaling=0.25, **extra)[0])
    short = [t[:, :, :40] for t in (q, k, v)]  # one chunk of queries or fewer
    assert torch.equal(causal_chunk_attention(causal, *short, None)[0], sdpa_attention_forward(causal, *short, None)[0])


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2"])
def test_bf16_block_passes_use_the_chunks_and_put_sdpa_back(family):
    """Mistral's sliding window (4096) is longer than the batch: no restriction, the chunks run. Gemma2 (soft-
    capping) runs transformers' eager attention, which is left alone."""
    model = tiny_model(family, seed=1)
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], random_ids(2, 150), batch_size=2)
    block = blocks[0]
    seen = []
    attn = next(m for name, m in block.named_modules() if name.endswith("self_attn"))
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    expected = run_block(block, inputs)
    with computing_in(block, torch.bfloat16) as cast:
        got = as_stored(run_block(block, cast(inputs)), inputs)
    handle.remove()
    before = model.config._attn_implementation
    during = attention.NAME if before == "sdpa" else before
    assert before == ("eager" if family == "gemma2" else "sdpa")
    assert seen == [before] * len(inputs) + [during] * len(inputs)
    for e, g in zip(expected, got):
        assert torch.isfinite(g.hidden).all()
        assert (g.hidden - e.hidden).norm() / e.hidden.norm() < 2e-2
