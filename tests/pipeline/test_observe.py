"""Observing a block: the statistics are the same whether or not the pass runs past the last target's input."""

from __future__ import annotations

import pytest
import torch

from lowbit.pipeline.layers import capture_inputs, find_blocks
from lowbit.pipeline.observe import observe_block
from tests.arch_models import random_ids, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stopping_after_the_last_target_gives_the_same_statistics(family):
    model = tiny_model(family, seed=5)
    _, blocks = find_blocks(model)
    block = blocks[0]
    inputs = capture_inputs(model, block, random_ids(6, 24), batch_size=2)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = linears or {n: m for n, m in block.named_modules() if type(m).__name__ == "Conv1D"}
    last = list(targets.values())[-1]
    ran = []
    handle = last.register_forward_hook(lambda *_: ran.append(1))
    try:
        full, outputs = observe_block(block, targets, inputs)
        ran.clear()
        early, none = observe_block(block, targets, inputs, outputs=False)
    finally:
        handle.remove()
    assert len(outputs) == 3 and none == []
    assert len(ran) == 1  # the last target ran in the first batch only
    assert full.keys() == early.keys()
    for name in full:
        assert full[name].count == early[name].count == 6 * 24
        assert torch.equal(full[name].xtx, early[name].xtx)
        assert torch.equal(full[name].abs_max, early[name].abs_max)
