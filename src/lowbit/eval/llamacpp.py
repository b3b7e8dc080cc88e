"""Evaluate a GGUF file in llama.cpp itself (through llama-cpp-python): next-token log-probabilities on the
same token windows lowbit evaluates, and PPL / KL divergence / top-1 agreement (and the distribution of the
per-token KL divergence) against a reference."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.eval.kld_stats import DivergenceStats
from lowbit.eval.lm import divergence_sums


def gguf_logprobs(path: str | Path, windows: torch.Tensor, threads: int | None = None,
                  f32_cache: bool = False) -> list[torch.Tensor]:
    """Per window (length L), llama.cpp's log-probabilities [L-1, vocab] of the next token at each position.

    ``f32_cache`` keeps llama.cpp's KV cache in F32 instead of its default F16 (which alone moves log-probs by
    ~2e-3): for checking that a file computes exactly what the float model does.
    """
    return list(iter_gguf_logprobs(path, windows, threads, f32_cache))


def iter_gguf_logprobs(path: str | Path, windows: torch.Tensor, threads: int | None = None,
                       f32_cache: bool = False) -> Iterator[torch.Tensor]:
    """``gguf_logprobs`` one window at a time (a 262k-token vocabulary makes each window ~0.5 GB)."""
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError("evaluating in llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    length = int(windows.shape[1])
    try:
        cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=length, n_batch=length,
                              n_threads=threads or min(2, os.cpu_count() or 1), verbose=False, **cache)
    except ValueError as exc:
        raise LowbitError(f"llama.cpp cannot load {path}: {exc}") from None
    try:
        for ids in windows:
            llm.reset()
            llm.eval(ids.tolist())
            # llama-cpp-python's own float32 buffer, read without a copy: log_softmax makes the only new tensor
            logits = torch.from_numpy(np.asarray(llm.scores[: length - 1], dtype=np.float32))
            yield torch.log_softmax(logits, dim=-1)
    finally:
        llm.close()


def compare_logprobs(ref: Sequence[torch.Tensor], test: Iterable[torch.Tensor],
                     windows: torch.Tensor) -> dict[str, Any]:
    """PPL of both, mean KL(ref || test) per predicted token, top-1 agreement (windows taken one at a time), plus
    ``kld_stats``: the distribution of the per-token divergence, as ``llama-perplexity --kl-divergence`` prints it."""
    nll_ref = nll = kld = agree = 0.0
    n = 0
    stats = DivergenceStats()
    for base, lp, ids in zip(ref, test, windows):
        target = ids[1:, None]
        nll_ref += float(-base.gather(1, target).sum())
        nll += float(-lp.gather(1, target).sum())
        window_kld, window_agree = divergence_sums(base, lp, stats, ids[1:])
        kld, agree = kld + window_kld, agree + window_agree
        n += base.shape[0]
    return {"ppl_base": math.exp(nll_ref / n), "ppl": math.exp(nll / n), "kld": kld / n, "top1": agree / n,
            "kld_stats": stats.summary("the compared model")}
