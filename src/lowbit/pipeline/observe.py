"""One float pass through a block with hooks that accumulate every target linear's input statistics.

Linears that read the very same input tensor (q/k/v after the same norm, gate/up) share one accumulator,
so each distinct Hessian is computed once. Hooks are removed even when the pass fails.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lowbit.observers.input_stats import InputStats
from lowbit.pipeline.layers import BlockInput, run_block


class _Observed(Exception):
    """Raised by the last hook of a batch: everything after the last target's input is not needed."""


def observe_block(block: nn.Module, targets: dict[str, nn.Linear], inputs: Iterable[BlockInput],
                  want_hessian: bool = True, sample_rows: int = 0, hessian_dtype: torch.dtype = torch.float32,
                  outputs: bool = True, want_abs: bool = True) -> tuple[dict[str, InputStats], list[BlockInput]]:
    """Input statistics per target name, and the block's float outputs (an empty list with ``outputs=False``).

    ``sample_rows`` > 0 keeps that many random input rows per batch (for static activation ranges); ``want_abs``
    False skips the per-channel |x| sums and maxima (GPTQ alone reads only the Hessian). Without
    ``outputs``, every batch after the first stops as soon as the hooks have fired as often as they did in the
    first (the last target's input is in): the rest of the block, typically the MLP's down projection and the
    residual add, is not computed.
    """
    stats: dict[str, InputStats] = {}
    by_input: dict[int, InputStats] = {}
    alive: list = []  # inputs of this batch, kept alive so that id() identifies the same tensor object
    seen_in_batch: set[int] = set()
    calls = [0, 0]  # hook calls in this batch, in the first batch (0 until it is done)

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            alive.append(x)
            if name not in stats:
                if id(x) not in by_input:
                    by_input[id(x)] = InputStats(x.shape[-1], want_hessian, sample_rows, hessian_dtype,
                                                 want_abs=want_abs)
                stats[name] = by_input[id(x)]
            acc = stats[name]
            if id(acc) not in seen_in_batch:  # a shared accumulator takes each batch once
                seen_in_batch.add(id(acc))
                acc.update(x)
            calls[0] += 1
            if calls[0] == calls[1]:
                raise _Observed

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    try:
        results = []
        for batch in inputs:
            seen_in_batch.clear()
            calls[0] = 0
            try:
                results.extend(run_block(block, [batch]))
            except _Observed:
                pass
            if not outputs and not calls[1]:
                calls[1] = calls[0]
            alive.clear()
            by_input.clear()
    finally:
        for h in handles:
            h.remove()
    return stats, results if outputs else []
