"""bf16 calibration passes: the block computes natively in bf16, its fp32 weights come back bit for bit, and its
outputs stay close to the fp32 pass on decoders and encoders alike."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.activation import parse_activation_spec
from lowbit.model.act_quant import attach_input_quantizer
from lowbit.pipeline.compute import as_stored, computing_in, narrowed_for
from lowbit.pipeline.layers import BlockInput, capture_inputs, find_blocks, run_block
from tests.arch_models import random_ids, tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert"])
def test_bf16_pass_is_close_to_fp32_and_puts_the_fp32_weights_back(family):
    model = tiny_model(family, seed=3)
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], random_ids(4, 48), batch_size=2)
    block = blocks[0]
    before = {n: (p.data_ptr(), p.data.clone()) for n, p in block.named_parameters()}
    expected = run_block(block, inputs)
    with computing_in(block, torch.bfloat16) as cast:
        assert all(p.dtype == torch.bfloat16 for p in block.parameters())
        got = as_stored(run_block(block, cast(inputs)), inputs)
    for name, p in block.named_parameters():
        pointer, copy = before[name]
        assert p.data_ptr() == pointer and torch.equal(p.data, copy)  # the same fp32 storage, untouched
    for e, g, b in zip(expected, got, inputs):
        assert g.hidden.dtype == torch.bfloat16 and g.kwargs is b.kwargs  # kept as computed: exact
        assert torch.isfinite(g.hidden).all()
        error = (g.hidden - e.hidden).norm() / e.hidden.norm()
        assert 0 < error < 2e-2  # bf16 rounding: close, not equal


def test_bf16_outputs_feed_the_next_pass_uncopied_and_widen_exactly():
    model = tiny_model("llama", seed=2)
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], random_ids(2, 24), batch_size=1)
    with computing_in(blocks[0], torch.bfloat16) as cast:
        outputs = as_stored(run_block(blocks[0], cast(inputs)), inputs)
    with computing_in(blocks[1], torch.bfloat16) as cast:
        assert all(b.hidden is o.hidden for b, o in zip(cast(outputs), outputs))  # no second copy
    with computing_in(blocks[1], torch.float32) as cast:
        widened = list(cast(outputs))
    for w, o in zip(widened, outputs):
        assert w.hidden.dtype == torch.float32 and torch.equal(w.hidden.to(torch.bfloat16), o.hidden)
        assert w.kwargs is o.kwargs


def test_captured_inputs_are_narrowed_only_where_every_pass_casts_them_so():
    model = tiny_model("llama", seed=3)
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], random_ids(2, 24), batch_size=1)
    narrowed = narrowed_for(inputs, torch.bfloat16, fp32_passes=False)
    with computing_in(blocks[0], torch.bfloat16) as cast:
        from_fp32 = run_block(blocks[0], cast(inputs))
    with computing_in(blocks[0], torch.bfloat16) as cast:
        from_bf16 = run_block(blocks[0], cast(narrowed))
    for a, b, n, i in zip(from_fp32, from_bf16, narrowed, inputs):
        assert n.hidden.dtype == torch.bfloat16 and n.kwargs is i.kwargs
        assert torch.equal(a.hidden, b.hidden)  # the pass computes the same values from half the bytes
    assert narrowed_for(inputs, torch.bfloat16, fp32_passes=True) is inputs  # W8A8's autocast pass reads fp32
    assert narrowed_for(inputs, torch.float32, fp32_passes=False) is inputs


def test_fp32_pass_changes_nothing():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], random_ids(2, 16), batch_size=2)
    with computing_in(blocks[0], torch.float32) as cast:
        batches = list(cast(inputs))
    assert [b.hidden for b in batches] == [b.hidden for b in inputs]


def test_parameters_come_back_when_the_pass_fails():
    block = torch.nn.Linear(8, 4)
    pointer = block.weight.data_ptr()
    with pytest.raises(RuntimeError):
        with computing_in(block, torch.bfloat16):
            raise RuntimeError("boom")
    assert block.weight.data_ptr() == pointer and block.weight.dtype == torch.float32


def test_a_block_with_input_quantizers_keeps_fp32_weights_under_autocast():
    """Fake-quantized inputs must be rounded from fp32 values, as in evaluation: such a block is not cast."""
    block = torch.nn.Sequential(torch.nn.Linear(16, 16))
    attach_input_quantizer(block[0], parse_activation_spec("int8:token:dynamic"))
    x = torch.randn(4, 16)
    with computing_in(block, torch.bfloat16) as cast:
        assert block[0].weight.dtype == torch.float32
        (batch,) = list(cast([BlockInput(x, {})]))
        assert batch.hidden.dtype == torch.float32
        assert block(batch.hidden).dtype == torch.bfloat16  # autocast runs the product in bf16


def test_an_fp32_mask_minimum_stays_finite_in_bf16():
    mask = torch.full((1, 1, 2, 2), torch.finfo(torch.float32).min)
    batch = BlockInput(torch.zeros(1, 2, 4), {"attention_mask": mask, "position_embeddings": (mask, mask),
                                              "position_ids": torch.arange(2)})
    with computing_in(torch.nn.Linear(4, 4), torch.bfloat16) as cast:
        (out,) = list(cast([batch]))
    assert out.kwargs["attention_mask"].dtype == torch.bfloat16
    assert torch.isfinite(out.kwargs["attention_mask"]).all()
    assert all(torch.isfinite(t).all() for t in out.kwargs["position_embeddings"])
    assert out.kwargs["position_ids"].dtype == torch.int64
