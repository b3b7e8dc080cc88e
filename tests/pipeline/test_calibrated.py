"""The block-by-block pipeline on a tiny Llama: exact weights, hooks removed, methods ranked as expected."""

from __future__ import annotations

import pytest
import torch

from lowbit.eval.lm import compare_lm, lm_reference
from lowbit.formats import dequantize, parse_spec
from lowbit.model.apply import quantize_model
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.pipeline.layers import capture_inputs, find_blocks, run_block
from lowbit.recipe import Recipe, Rule
from tests.conftest import make_tiny_llama


def _recipe(method, spec="int3:g32:asym", **options):
    return Recipe(scheme="W3A16", method=method, rules=(Rule(("Linear",), parse_spec(spec)),), options=options)


def _ids(n, length=64, seed=0):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_blocks_and_captured_inputs_reproduce_the_model():
    model = make_tiny_llama()
    hooks = _hooks(model)
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    ids = _ids(4)
    inputs = capture_inputs(model, blocks[0], ids, batch_size=3)
    assert [b.hidden.shape[0] for b in inputs] == [3, 1]
    for block in blocks:
        inputs = run_block(block, inputs)
    assert _hooks(model) == hooks
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    ours = model.model.norm(torch.cat([b.hidden for b in inputs]))
    assert torch.allclose(ours, full, atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq", "smoothquant+rtn"])
def test_weights_are_exactly_the_dequantized_codes(method):
    model = make_tiny_llama()
    hooks = _hooks(model)
    qm = quantize_calibrated(model, _recipe(method), _ids(8), batch_size=4, progress=False)
    assert len(qm.qtensors) == 14
    for name, qt in qm.qtensors.items():
        assert torch.equal(model.get_parameter(name).data, dequantize(qt))
    assert _hooks(model) == hooks
    assert qm.peak_rss_mb and qm.peak_rss_mb > 0


def test_hooks_are_removed_when_quantization_fails():
    model = make_tiny_llama()
    hooks = _hooks(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(Exception):
        quantize_calibrated(model, _recipe("gptq"), _ids(4), progress=False)
    model = make_tiny_llama()
    bad = Recipe(scheme="x", method="gptq", rules=(Rule(("Linear",), parse_spec("int4:g32")),), options={"damp": "x"})
    with pytest.raises(ValueError):
        quantize_calibrated(model, bad, _ids(4), progress=False)
    assert _hooks(model) == hooks


def test_gptq_beats_rtn_on_held_out_text():
    from lowbit.data.text import default_text, tokenize
    from tests.conftest import make_tokenizer

    # a tiny model is random, but GPTQ still minimizes its own layer-output error on in-distribution tokens
    tok = make_tokenizer(default_text())
    stream = tokenize(tok, default_text()[:200_000])
    evals, calib = stream[:2048].reshape(16, 128), stream[4096 : 4096 + 32 * 128].reshape(32, 128)
    base = make_tiny_llama()
    ref = lm_reference(base, evals, progress=False)
    kld = {}
    for method in ("rtn", "gptq"):
        model = make_tiny_llama()
        recipe = _recipe(method, "int3:g32:asym")
        if method == "rtn":
            quantize_model(model, recipe, progress=False)
        else:
            quantize_calibrated(model, recipe, calib, batch_size=8, progress=False)
        kld[method] = compare_lm(model, ref, progress=False)["kld"]
    assert kld["gptq"] < kld["rtn"]


def test_bf16_calibration_passes_give_nearly_the_same_codes():
    codes = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny_llama()
        qm = quantize_calibrated(model, _recipe("gptq", "int4:g32:asym"), _ids(8), batch_size=4, progress=False,
                                 compute_dtype=dtype)
        codes[dtype] = torch.cat([q.codes.flatten() for q in qm.qtensors.values()])
        for name, qt in qm.qtensors.items():
            assert torch.equal(model.get_parameter(name).data, dequantize(qt))
    agree = float((codes[torch.float32] == codes[torch.bfloat16]).float().mean())
    assert agree > 0.9


def test_stacking_linears_that_share_an_input_gives_the_same_codes():
    from lowbit.methods.gptq import gptq
    from lowbit.observers.input_stats import InputStats

    torch.manual_seed(0)
    x = torch.randn(256, 64)
    stats = InputStats(64)
    stats.update(x)
    ws = [torch.randn(n, 64) for n in (32, 16, 16)]
    spec = parse_spec("int4:g16:asym")
    from lowbit.formats.qtensor import split_rows

    stacked = split_rows(gptq(torch.cat(ws), spec, stats.hessian()), [32, 16, 16])
    for w, part in zip(ws, stacked):
        alone = gptq(w, spec, stats.hessian())
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.scales, alone.scales)
        assert torch.equal(part.zeros, alone.zeros) and part.shape == alone.shape


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_bf16_activations_held_between_blocks_give_the_codes_of_fp32_ones(monkeypatch, family, true_sequential):
    """A bf16 pass's outputs are kept in bf16 for the next block, and the first block's captured inputs too (half
    the memory); holding them in fp32, as lowbit once did, gives bit for bit the same QTensors (one-pass and
    two-pass pipelines)."""
    import lowbit.pipeline.calibrated as calibrated
    from lowbit.pipeline.compute import as_stored
    from tests.arch_models import lowbit_model

    def widened(outputs, inputs):
        return [type(o)(o.hidden.float(), o.kwargs) for o in as_stored(outputs, inputs)]

    real = calibrated._quantize_block
    seen: list[torch.dtype] = []

    def spy(run, block, index, block_prefix, inputs):
        seen.append(inputs[0].hidden.dtype)
        return real(run, block, index, block_prefix, inputs)

    monkeypatch.setattr(calibrated, "_quantize_block", spy)
    results, dtypes = {}, []
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(calibrated, "as_stored", widened)
            monkeypatch.setattr(calibrated, "narrowed_for", lambda batches, dtype, fp32_passes: batches)
        seen.clear()
        model = lowbit_model(family)
        ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
        recipe = _recipe("gptq", "int4:g32", true_sequential=true_sequential)
        results[keep] = quantize_calibrated(model, recipe, ids, batch_size=2, progress=False,
                                            compute_dtype=torch.bfloat16).qtensors
        dtypes.append(list(seen))
    assert set(dtypes[0]) == {torch.bfloat16} and set(dtypes[1]) == {torch.float32}
    assert results[True].keys() == results[False].keys()
    for name, qt in results[True].items():
        other = results[False][name]
        assert torch.equal(qt.codes, other.codes) and torch.equal(qt.scales, other.scales), name
