"""One pass per block: groups quantized when every batch reached them, equal to re-running the block per group."""

from __future__ import annotations

import gc

import greenlet
import pytest
import torch
from torch import nn

from lowbit.formats import dequantize, parse_spec
from lowbit.formats.qtensor import split_rows
from lowbit.methods.gptq import GPTQOptions, gptq
from lowbit.observers.input_stats import InputStats
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.pipeline.layers import BlockInput, capture_inputs, find_blocks, run_block
from lowbit.pipeline.observe import observe_block
from lowbit.pipeline.sequential import NotSequential, run_sequential, trace_calls
from lowbit.recipe import Recipe, Rule
from tests.arch_models import random_ids, tiny_model


class _Toy(nn.Module):
    """a and b read the same input; c reads their sum; ``route`` sends batches whose mean is negative past c."""

    def __init__(self, route: bool = False, twice: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.route, self.twice = route, twice

    def forward(self, x):
        h = self.a(x) + self.b(x)
        if self.route and float(x.mean()) < 0:
            return h
        y = self.c(h)
        return self.c(y) if self.twice else y


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [BlockInput(torch.randn(2, 5, 8, generator=g) + (0.5 if k % 2 else -0.5), {}) for k in range(n)]


def _halve(targets, log):
    """A quantizer that halves the group's weights and records what it saw."""

    def quantize(group, stats):
        log.append((list(group), stats.count))
        for name in group:
            targets[name].weight.data = targets[name].weight.data * 0.5

    return quantize


def _targets(block):
    return {"a": block.a, "b": block.b, "c": block.c}


def _paused_batches() -> int:
    """Batch greenlets started and not finished (a pass must end every one of them, however it ends)."""
    return sum(1 for g in gc.get_objects() if type(g) is greenlet.greenlet and g.parent is not None and g
               and not g.dead)


def test_each_group_sees_every_batch_and_the_outputs_are_the_quantized_blocks():
    block, batches, log = _Toy(), _batches(), []
    targets = _targets(block)
    assert trace_calls(block, targets, batches[0]) == {"a": 0, "b": 0, "c": 1}
    assert torch.is_grad_enabled()
    out = run_sequential(block, batches, targets, [["a", "b"], ["c"]], lambda f: InputStats(f), _halve(targets, log))
    assert log == [(["a", "b"], 30), (["c"], 30)]  # 3 batches x 2 x 5 rows each time
    expected = run_block(block, batches)  # the block with every weight halved, as the pass ended
    assert all(torch.equal(o, e.hidden) for o, e in zip(out, expected))
    assert _paused_batches() == 0 and not any(m._forward_pre_hooks for m in targets.values())
    assert torch.is_grad_enabled()  # the pass ran without gradients and left the caller's mode as it was


def test_the_later_group_sees_inputs_through_the_quantized_earlier_one():
    block, batches = _Toy(), _batches()
    targets = _targets(block)
    seen = {}

    def quantize(group, stats):
        seen[group[0]] = stats.xtx.clone()
        for name in group:
            targets[name].weight.data = targets[name].weight.data * 0.5

    run_sequential(block, batches, targets, [["a", "b"], ["c"]], lambda f: InputStats(f), quantize)
    expected = InputStats(8)
    for b in batches:  # c's input after a and b were halved
        expected.update(block.a(b.hidden) + block.b(b.hidden))
    assert torch.allclose(seen["c"], expected.xtx, rtol=1e-5, atol=1e-6)


def test_batches_that_take_other_paths_stop_every_batch():
    block, batches = _Toy(route=True), _batches()
    targets = _targets(block)
    with pytest.raises(NotSequential):
        run_sequential(block, batches, targets, [["a", "b"], ["c"]], lambda f: InputStats(f), _halve(targets, []))
    assert _paused_batches() == 0 and not any(m._forward_pre_hooks for m in targets.values())


def test_a_linear_called_twice_is_not_traced_and_errors_reach_the_caller():
    block = _Toy(twice=True)
    assert trace_calls(block, _targets(block), _batches()[0]) is None
    block, batches = _Toy(), _batches()
    targets = _targets(block)

    def fail(group, stats):
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        run_sequential(block, batches, targets, [["a", "b"], ["c"]], lambda f: InputStats(f), fail)
    assert _paused_batches() == 0 and not any(m._forward_pre_hooks for m in targets.values())


GROUPS = {"llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
          "qwen2": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]}


def _reference(model, spec, ids, options):
    """True-sequential GPTQ the slow way (GPTQModel's): the block re-run up to each group, groups in order."""
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], ids, batch_size=2)
    codes = {}
    for index, block in enumerate(blocks):
        for group in GROUPS[model.config.model_type]:
            first = block.get_submodule(group[0])
            stats, _ = observe_block(block, {group[0]: first}, inputs, outputs=False, want_abs=False)
            modules = [block.get_submodule(n) for n in group]
            qt = gptq(torch.cat([m.weight.data for m in modules]), spec, stats[group[0]].hessian(), options)
            for name, m, part in zip(group, modules, split_rows(qt, [m.weight.shape[0] for m in modules])):
                m.weight.data.copy_(dequantize(part))
                codes[f"model.layers.{index}.{name}.weight"] = part.codes
        inputs = run_block(block, inputs)
    return codes


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_pass_equals_rerunning_the_block_for_each_group(family):
    spec = parse_spec("int4:g16:asym").with_options(scale_search="mse")
    ids = random_ids(6, 24)
    options = GPTQOptions(act_order=True, clip_objective="output")
    expected = _reference(tiny_model(family, seed=3), spec, ids, options)
    recipe = Recipe(scheme="W4A16", method="gptq", rules=(Rule(("Linear",), spec),),
                    options={"true_sequential": True})
    model = tiny_model(family, seed=3)
    qm = quantize_calibrated(model, recipe, ids, batch_size=2, progress=False)
    assert set(qm.qtensors) == set(expected)
    for name, codes in expected.items():
        assert torch.equal(qm.qtensors[name].codes, codes), name
        assert torch.equal(model.get_parameter(name).data, dequantize(qm.qtensors[name]))
