"""Input quantizers are explicit submodules with removable hooks; W8A8 runs through both pipelines."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats import parse_spec
from lowbit.formats.activation import fake_quantize_activation, parse_activation_spec
from lowbit.model.act_quant import attach_input_quantizer, detach_input_quantizer, input_quantizers
from lowbit.model.apply import quantize_model
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.recipe import Recipe, Rule
from tests.conftest import make_tiny_llama


def test_attach_and_detach():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    x = torch.randn(3, 16)
    spec = parse_activation_spec("int8:token:dynamic")
    attach_input_quantizer(lin, spec)
    assert torch.equal(lin(x), nn.functional.linear(fake_quantize_activation(x, spec), lin.weight, lin.bias))
    assert set(input_quantizers(nn.Sequential(lin))) == {"0"}
    detach_input_quantizer(lin)
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    assert not hasattr(lin, "input_quantizer")


def _w8a8(act: str, method: str = "rtn") -> Recipe:
    return Recipe(scheme="W8A8", method=method,
                  rules=(Rule(("Linear",), parse_spec("int8:channel"), parse_activation_spec(act)),))


def test_dynamic_w8a8_is_data_free():
    model = make_tiny_llama()
    quantize_model(model, _w8a8("int8:token:dynamic"), progress=False)
    assert len(input_quantizers(model)) == 14


def test_static_observers_and_smoothquant_through_the_pipeline():
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    scales = {}
    for observer in ("minmax", "percentile", "mse", "kl"):
        model = make_tiny_llama()
        quantize_calibrated(model, _w8a8(f"int8:tensor:static:{observer}"), ids, batch_size=4, progress=False)
        quants = input_quantizers(model)
        assert len(quants) == 14 and all(q.scale is not None and float(q.scale) > 0 for q in quants.values())
        scales[observer] = float(quants["model.layers.0.mlp.down_proj"].scale)
    assert scales["percentile"] <= scales["minmax"] and scales["kl"] <= scales["minmax"]
    model = make_tiny_llama()
    quantize_calibrated(model, _w8a8("int8:tensor:static", "smoothquant"), ids, batch_size=4, progress=False)
    assert len(input_quantizers(model)) == 14


def test_checkpoint_keeps_activation_specs_scales_and_float_zeros(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from lowbit.model.checkpoint import load_checkpoint, write_checkpoint

    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    model = make_tiny_llama()
    recipe = Recipe(scheme="mixed", method="smoothquant+hqq", rules=(
        Rule(("*.down_proj",), parse_spec("int8:channel:asym"), parse_activation_spec("int8:tensor:static:kl")),
        Rule(("Linear",), parse_spec("int4:g32:asym"), parse_activation_spec("int8:token:dynamic"))))
    qm = quantize_calibrated(model, recipe, ids, batch_size=2, progress=False)
    assert qm.qtensors["model.layers.0.self_attn.q_proj.weight"].zeros.dtype == torch.float16  # HQQ float zeros
    write_checkpoint(qm, tmp_path, model.config, AutoTokenizer.from_pretrained(str(tiny_llama_dir)), {"kind": "causal-lm"})
    reloaded, _, _ = load_checkpoint(tmp_path)
    ours, theirs = input_quantizers(model), input_quantizers(reloaded)
    assert set(ours) == set(theirs) and len(ours) == 14
    for name, q in ours.items():
        assert q.spec == theirs[name].spec
        assert (q.scale is None and theirs[name].scale is None) or torch.equal(q.scale, theirs[name].scale)
    test_ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=test_ids).logits, model(input_ids=test_ids).logits)


def test_fp8_dynamic_scheme_quantizes_inputs_onto_the_fp8_grid():
    from lowbit.workflow import QuantizeOptions, build_recipe

    model = make_tiny_llama()
    quantize_model(model, build_recipe(QuantizeOptions(scheme="FP8-dynamic")), progress=False)
    quants = input_quantizers(model)
    assert len(quants) == 14 and all(str(q.spec) == "fp8_e4m3:token:dynamic" for q in quants.values())
    x = torch.randn(3, 96) * 5
    out = quants["model.layers.0.mlp.up_proj"](x)
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(out, (x / scale).to(torch.float8_e4m3fn).float() * scale)
