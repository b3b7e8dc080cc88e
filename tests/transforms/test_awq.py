"""AWQ and SmoothQuant folds leave the float model's outputs unchanged; the AWQ search never hurts its loss."""

from __future__ import annotations

import pytest
import torch

from lowbit.arch import family_of
from lowbit.formats import fake_quantize, parse_spec
from lowbit.observers.input_stats import InputStats
from lowbit.pipeline.layers import capture_inputs, find_blocks, run_block
from lowbit.pipeline.observe import observe_block
from lowbit.transforms.awq import output_error, search_scales
from lowbit.transforms.mappings import applicable_mappings, fold_scales
from lowbit.transforms.smoothquant import smoothing_scales
from tests.conftest import make_tiny_llama


def _block_io(model, n=4, length=32):
    ids = torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(model)
    return blocks, capture_inputs(model, blocks[0], ids, batch_size=2), ids


def test_mappings_skip_v_to_o_under_grouped_query_attention():
    model = make_tiny_llama()
    _, blocks = find_blocks(model)
    producers = [m.producer for m, _, _ in applicable_mappings(blocks[0], family_of(model).scale_pairs)]
    assert producers == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]


@pytest.mark.parametrize("kind", ["awq", "smoothquant"])
def test_folding_scales_keeps_the_float_model(kind):
    model = make_tiny_llama()
    with torch.no_grad():  # give the norms non-trivial weights so folding is really exercised
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    blocks, inputs, ids = _block_io(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    spec = parse_spec("int4:g32:asym")
    for block in blocks:
        targets = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        stats, _ = observe_block(block, targets, inputs)
        for mapping, producer, consumers in applicable_mappings(block, family_of(model).scale_pairs):
            st = stats[mapping.consumers[0]]
            weights = [c.weight.data for c in consumers]
            if kind == "awq":
                scales, _ = search_scales(weights, st.mean_abs(), st.hessian(), spec, grid=5)
                scales = scales * torch.linspace(0.5, 2.0, scales.numel())  # make sure a real fold happens
            else:
                scales = smoothing_scales(st.abs_max, weights)
            with torch.no_grad():
                fold_scales(producer, consumers, scales)
        inputs = run_block(block, inputs)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_search_is_never_worse_than_no_scaling():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * (torch.rand(64) * 4) ** 2  # a few loud channels
    w = torch.randn(48, 64) * 0.05
    stats = InputStats(64)
    stats.update(x)
    spec = parse_spec("int3:g32:asym")
    H = stats.hessian()
    scales, alpha = search_scales([w], stats.mean_abs(), H, spec)
    plain = output_error(w, fake_quantize(w, spec), H)
    scaled = output_error(w, fake_quantize(w * scales, spec) / scales, H)
    assert scaled <= plain
    assert alpha is not None and scaled < 0.9 * plain  # loud channels: scaling must help here
