"""Causal self-attention in query chunks, for calibration passes that compute in bf16 on the CPU.

PyTorch's CPU scaled_dot_product_attention takes as long in bf16 as in fp32 and, causal or not, about as
long as the full square of scores: on SmolLM2's attention (8 x 512 tokens, 9 query heads over 3 key/value
heads, head size 64, two threads, avx512_bf16) 44 ms per call, 10.7 s of a 66 s GPTQ run. Queries taken
64 at a time against only the keys up to their own end skip the masked upper triangle (about half the
products) and run as bf16 matrix products: 24 ms. The query heads that share a key/value head are stacked
into one product (no repeated keys). Scores are rounded to bf16 before the softmax, which the fused kernel
keeps in fp32: on random unit-variance inputs the output's RMS error against fp32 attention was 7.1e-4,
the fused kernel's in bf16 5.4e-4; both far below bf16's own rounding of the block's activations (a GPTQ
run's KLD moved by +2.0% on one text and -2.8% on another, run-to-run noise).

Anything else (a mask tensor, dropout, fp32, a sliding window shorter than the keys, soft-capping, sinks,
cached keys, fewer than two chunks of queries) goes to transformers' own SDPA function unchanged.
``chunked_attention`` swaps a block's attention implementation from "sdpa" to this one for the duration of
a pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

NAME = "lowbit_causal_chunks"
QUERY_CHUNK = 64  # measured on 512 tokens: 32 -> 33 ms, 64 -> 24 ms, 128 -> 27 ms, whole (512) -> 74 ms
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def causal_chunk_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, L, d), key/value (batch, kv heads, L, d);
    returns (batch, L, heads, d) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    batch, heads, length, dim = query.shape
    if (not causal or attention_mask is not None or dropout or query.device.type != "cpu"
            or query.dtype not in _LOW_PRECISION or key.shape[2] != length or length <= QUERY_CHUNK
            or heads % key.shape[1] or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
            or (kwargs.get("sliding_window") or length) < length):  # a window shorter than the keys
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    keys_t = key.transpose(2, 3)  # (batch, kv heads, d, L)
    above = torch.ones(QUERY_CHUNK, QUERY_CHUNK, dtype=torch.bool, device=query.device).triu(1)
    out = query.new_empty(batch, length, heads, dim)
    grouped = query.view(batch, kv_heads, group, length, dim)
    for start in range(0, length, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, length)
        rows = end - start
        q = grouped[:, :, :, start:end].reshape(batch, kv_heads, group * rows, dim)
        scores = torch.matmul(q, keys_t[..., :end]).mul_(scale)  # (batch, kv heads, group * rows, end)
        scores.view(batch, kv_heads, group, rows, end)[..., start:].masked_fill_(above[:rows, :rows], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        chunk = torch.matmul(probs, value[:, :, :end])  # (batch, kv heads, group * rows, d)
        out[:, start:end] = chunk.view(batch, heads, rows, dim).transpose(1, 2)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_chunk_attention)


@contextlib.contextmanager
def chunked_attention(block: nn.Module) -> Iterator[None]:
    """Within this context, ``block``'s attention modules that use "sdpa" use ``causal_chunk_attention``."""
    configs = {id(c): c for m in block.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation_internal", None) == "sdpa"}
    if not configs:
        yield
        return
    _register()
    try:
        for config in configs.values():
            config._attn_implementation_internal = NAME
        yield
    finally:
        for config in configs.values():
            config._attn_implementation_internal = "sdpa"
