"""Streaming: at most one block's float weights in memory, and the same result as the in-memory pipeline."""

from __future__ import annotations

import torch

from lowbit.formats import parse_spec
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.recipe import Recipe, Rule
from tests.conftest import make_tiny_llama


def test_streaming_matches_in_memory_and_holds_one_block(tiny_llama_dir, monkeypatch):
    from lowbit.model.streaming import StreamingSource

    recipe = Recipe(scheme="W4A16", method="gptq", rules=(Rule(("Linear",), parse_spec("int4:g32:asym")),))
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    source = StreamingSource(tiny_llama_dir)
    assert source.materialized_blocks() == []
    seen = []
    load = source.load_block

    def spy(index):
        load(index)
        seen.append(source.materialized_blocks())

    monkeypatch.setattr(source, "load_block", spy)
    streamed = quantize_calibrated(source.model, recipe, ids, batch_size=2, progress=False, source=source)
    assert seen == [[0], [1]]  # never two blocks at once
    assert source.materialized_blocks() == []

    in_memory = quantize_calibrated(make_tiny_llama(), recipe, ids, batch_size=2, progress=False)
    assert set(streamed.qtensors) == set(in_memory.qtensors)
    for name, qt in in_memory.qtensors.items():
        assert torch.equal(streamed.qtensors[name].codes, qt.codes), name
    assert set(streamed.float_tensors) == set(in_memory.float_tensors)
    for name, t in in_memory.float_tensors.items():
        assert torch.equal(streamed.float_tensors[name], t), name
