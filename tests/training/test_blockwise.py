"""Block-wise reconstruction: on tiny models of two families each block's error against the original falls, the
model's output gets closer to the original's, and what the layers write is still what they compute."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.formats.quantize import dequantize, quantize
from lowbit.formats.spec import parse_spec
from lowbit.training.blockwise import BlockOptions, reconstruct_blocks
from lowbit.training.fake_quant import QATLinear
from tests.arch_models import outputs, random_ids, tiny_model


def _fake_quantized(model: torch.nn.Module, spec: str) -> dict[str, QATLinear]:
    """Every linear inside the blocks as a QATLinear at its RTN start (latent = original weight)."""
    layers = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            qt = quantize(module.weight.data, parse_spec(spec))
            layer = QATLinear.from_qtensor(qt, module.weight.data, module.bias.data if module.bias is not None else None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            layers[name] = layer
    model.requires_grad_(False)
    for layer in layers.values():
        layer.requires_grad_(True)
    for param in model.parameters():
        if param.dim() == 1:
            param.requires_grad_(True)
    return layers


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_blocks_learn_to_reproduce_the_original(family):
    teacher = tiny_model(family).requires_grad_(False)
    student = copy.deepcopy(teacher)
    layers = _fake_quantized(student, "int2:g32:asym")
    ids = random_ids(24, 32)[:16]
    held_out = random_ids(24, 32)[16:]
    before = (outputs(student, held_out) - outputs(teacher, held_out)).pow(2).mean()
    records = reconstruct_blocks(student, teacher, ids, BlockOptions(epochs=20, batch_windows=2, dtype="fp32"),
                                 progress=False)
    assert len(records) == teacher.config.num_hidden_layers
    for record in records:
        assert record["rel_mse_after"] < 0.5 * record["rel_mse_before"], record
    after = (outputs(student, held_out) - outputs(teacher, held_out)).pow(2).mean()
    assert after < 0.85 * before  # held-out windows: less than on the trained ones, (float(before), float(after))
    for layer in layers.values():  # still exactly what gets written
        assert torch.equal(dequantize(layer.to_qtensor()), layer.quantized_weight().detach())


def test_a_spent_time_cap_leaves_the_blocks_at_their_start():
    teacher = tiny_model("llama").requires_grad_(False)
    student = copy.deepcopy(teacher)
    _fake_quantized(student, "int3:g32")
    records = reconstruct_blocks(student, teacher, random_ids(4, 16), BlockOptions(epochs=1, max_minutes=0.0,
                                                                                  dtype="fp32"), progress=False)
    assert all(r["rel_mse_after"] == r["rel_mse_before"] and r["seconds"] == 0.0 for r in records)
