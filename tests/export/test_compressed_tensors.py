"""compressed-tensors export, checked by its real consumers on the tiny Llama (rows of 96 and 160).

- compressed-tensors' own compressors (the registry ``decompress`` of each module's format, applied to the
  config groups it parses from our config.json) give lowbit's dequantized weights: bit for bit in float32
  when the scales are fed in float32 (as transformers does: it creates them in the model dtype), and equal
  to lowbit's weights rounded to the scale dtype (fp16) when fed as stored, because it multiplies in the
  scale's dtype. NVFP4 decompresses to bfloat16 (its unpacker's dtype): lowbit's weights rounded to bf16.
- transformers ``AutoModelForCausalLM.from_pretrained`` (CPU, float32) gives our fake-quant model's logits:
  on the default route (decompress on the first forward pass, activations quantized by compressed-tensors)
  to 1e-5; asymmetric pack-quantized, NVFP4 and MX formats go through ``dequantize=True`` (the default route
  cannot load them in compressed-tensors 0.20: zero points are not packed when compressing on the meta device
  -- llm-compressor issue 1618 -- and FP4/MX weights come back in bf16 next to float32 activations); there the
  reference weights are rounded the way compressed-tensors computes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import export_hf
from lowbit.formats.quantize import dequantize
from lowbit.model.checkpoint import load_checkpoint, read_qtensors
from tests.export.helpers import assert_export_refused, quantize_folder

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.utils.match import match_name  # noqa: E402

# name: (lowbit quantize arguments, forced --format or None)
CASES = {
    "w4-g32-sym": (["--scheme", "W4A16", "--group-size", "32"], None),
    "w4-g32-asym": (["--scheme", "W4A16", "--group-size", "32", "--asym"], None),
    "w8-channel": (["--scheme", "W8A16"], None),
    "w3-g32-asym": (["--scheme", "W3A16", "--group-size", "32", "--asym"], None),
    "w4-block-asym": (["--scheme", "W4A16", "--rule", "Linear=int4:b32x64:asym"], None),
    "w8-tensor-asym": (["--scheme", "W8A16", "--rule", "Linear=int8:tensor:asym"], None),
    "w4-fp32-scales": (["--scheme", "W4A16", "--rule", "Linear=int4:g32:scale=fp32"], None),
    "w4-naive": (["--scheme", "W4A16", "--group-size", "32", "--asym"], "naive-quantized"),
    "mixed": (["--scheme", "W4A16", "--group-size", "32", "--rule", "*.down_proj=int8:channel",
               "--ignore", "*.layers.0.self_attn.o_proj"], None),
    "w8a8-dynamic": (["--scheme", "W8A8"], None),
    "w8a8-static": (["--scheme", "W8A8", "--act", "int8:tensor:static:minmax", "--calib-samples", "4",
                     "--calib-length", "64"], None),
    "fp8": (["--scheme", "FP8"], None),
    "fp8-dynamic": (["--scheme", "FP8-dynamic"], None),
    "nvfp4": (["--scheme", "NVFP4"], None),
    "mxfp4": (["--scheme", "MXFP4"], None),
    "mxfp8": (["--scheme", "MXFP8"], None),
}
EXPECTED_FORMAT = {"w8a8-dynamic": "int-quantized", "w8a8-static": "int-quantized", "fp8": "naive-quantized",
                   "fp8-dynamic": "float-quantized", "nvfp4": "nvfp4-pack-quantized",
                   "mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized", "w4-naive": "naive-quantized"}
BF16_FORMATS = ("nvfp4", "mxfp4", "mxfp8")


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """name -> (lowbit checkpoint, compressed-tensors folder), made on first use."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            args, fmt = CASES[name]
            ckpt = quantize_folder(tiny_llama_dir, root / "lowbit", args)
            export_hf(ckpt, root / "ct", format=fmt or "auto")
            made[name] = (ckpt, root / "ct")
        return made[name]

    return get


def _ct_config(folder: Path) -> QuantizationConfig:
    return QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])


def _scheme_of(config: QuantizationConfig, module: str):
    for scheme in config.config_groups.values():
        if any(t == "Linear" or match_name(module, t) for t in scheme.targets):
            return scheme
    raise AssertionError(f"{module} is in no config group")


def _decompress(folder: Path, module: str, config: QuantizationConfig, float32_scales: bool) -> torch.Tensor:
    """compressed-tensors' own decompression of one module's stored tensors."""
    from safetensors import safe_open

    scheme = _scheme_of(config, module)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        state = {p: f.get_tensor(f"{module}.{p}") for p in compressor.compression_param_names(scheme)
                 if f"{module}.{p}" in f.keys()}
    if float32_scales and state["weight_scale"].dtype in (torch.float16, torch.bfloat16):
        state["weight_scale"] = state["weight_scale"].float()
    return compressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("name", list(CASES))
def test_compressed_tensors_decompresses_to_our_weights(exported, name):
    ckpt, folder = exported(name)
    config = _ct_config(folder)
    assert config.quant_method == "compressed-tensors" and config.quantization_status == "compressed"
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    for param, qt in qtensors.items():
        module = param.removesuffix(".weight")
        scheme = _scheme_of(config, module)
        if CASES[name][1] is None:  # our choice is the one compressed-tensors itself infers for the scheme
            assert scheme.format == infer_module_format(torch.nn.Linear, scheme).value
        ours = dequantize(qt)
        stored = _decompress(folder, module, config, float32_scales=False)
        if qt.spec.format in BF16_FORMATS:
            assert stored.dtype == torch.bfloat16 and torch.equal(stored, ours.to(torch.bfloat16)), param
        else:
            assert torch.equal(stored, ours.to(qt.scales.dtype)), param
            assert torch.equal(_decompress(folder, module, config, float32_scales=True), ours), param
    if name in EXPECTED_FORMAT:
        assert {g.format for g in config.config_groups.values()} == {EXPECTED_FORMAT[name]}


def test_config_groups_targets_and_ignore(exported):
    _, single = exported("w4-g32-sym")
    qc = json.loads((single / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert list(qc["config_groups"]) == ["group_0"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "group_size": 32, "strategy": "group", "dynamic": False}
    assert json.loads((single / "config.json").read_text())["dtype"] == "float16"
    _, mixed = exported("mixed")
    qc = json.loads((mixed / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.self_attn.o_proj"]
    targets = {tuple(g["targets"]): g["weights"]["num_bits"] for g in qc["config_groups"].values()}
    assert targets[("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")] == 8
    _, static = exported("w8a8-static")
    acts = json.loads((static / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert acts["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                         "strategy": "tensor", "dynamic": False}


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_loads_the_folder_and_agrees(exported, name):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt, folder = exported(name)
    ours, _, _ = load_checkpoint(ckpt)
    dequant_route = _default_route_fails(ckpt, name)
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequant_route else {}
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    if dequant_route:  # weights come back as compressed-tensors computes them: in the scale dtype / bf16
        _round_like_compressed_tensors(ours, ckpt)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _default_route_fails(ckpt: Path, name: str) -> bool:
    """Whether compressed-tensors 0.20's default route cannot load it: packed asymmetric zero points, FP4/MX."""
    packed = CASES[name][1] in (None, "pack-quantized")
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    return any(qt.spec.format in BF16_FORMATS
               or (packed and qt.zeros is not None and qt.spec.granularity in ("group", "channel"))
               for qt in qtensors.values())


def _round_like_compressed_tensors(model: torch.nn.Module, ckpt: Path) -> None:
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    with torch.no_grad():
        for param, qt in qtensors.items():
            dtype = torch.bfloat16 if qt.spec.format in BF16_FORMATS else qt.scales.dtype
            model.get_parameter(param).copy_(dequantize(qt).to(dtype).float())


@pytest.mark.parametrize("args,fmt,expected", [
    (["--scheme", "TERNARY"], "auto", "formats that hold ternary:g64: lowbit checkpoint (`lowbit quantize`), "
                                      "GGUF TQ1_0/TQ2_0"),
    (["--scheme", "NF4", "--group-size", "32"], "auto", "cannot be written as compressed-tensors"),
    (["--scheme", "LOG2"], "auto", "cannot be written as compressed-tensors"),
    (["--scheme", "W4A16", "--group-size", "64"], "auto", "re-quantize with --group-size 32"),
    (["--scheme", "FP8"], "pack-quantized", "cannot be written as compressed-tensors pack-quantized"),
])
def test_unsupported_specs_fail_in_one_line_with_nothing_written(tiny_llama_dir, tmp_path, capsys, args, fmt,
                                                                  expected):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", args)
    out = tmp_path / "exports" / "ct"
    assert_export_refused(["export", "hf", str(ckpt), "--out", str(out), "--format", fmt], tmp_path / "exports",
                          capsys, expected)
    assert not out.exists()


def test_cli_writes_the_folder_and_refuses_to_overwrite(exported, tmp_path, capsys):
    ckpt, _ = exported("w4-g32-sym")
    out = tmp_path / "ct"
    assert main(["export", "hf", str(ckpt), "--out", str(out)]) == 0
    assert "compressed-tensors:pack-quantized" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "lowbit_export.json"}
    with pytest.raises(LowbitError, match="already exists"):
        export_hf(ckpt, out)


@pytest.mark.parametrize("name", ["w4-g32-sym", "w4-g32-asym", "w3-g32-asym", "w8-channel", "nvfp4"])
def test_packing_is_byte_identical_to_compressed_tensors_own_compressor(exported, name):
    """Feeding our dequantized weight, scales and zero points to compressed-tensors' compressor gives our bytes."""
    from safetensors.torch import load_file

    ckpt, folder = exported(name)
    config = _ct_config(folder)
    stored = load_file(str(folder / "model.safetensors"))
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    for param, qt in qtensors.items():
        module = param.removesuffix(".weight")
        scheme = _scheme_of(config, module)
        scales = qt.scales.float() if qt.scales.element_size() == 1 else qt.scales  # fp8 scales go in as floats
        state = {"weight": dequantize(qt), "weight_scale": scales}
        if qt.zeros is not None:
            state["weight_zero_point"] = (qt.zeros - (1 << (qt.spec.bits - 1))).to(torch.int8)
        if qt.global_scale is not None:
            state["weight_global_scale"] = qt.global_scale
        theirs = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        for key in ("weight_packed", "weight_zero_point", "weight_shape", "weight_scale"):
            if key in theirs:
                assert torch.equal(theirs[key], stored[f"{module}.{key}"]), f"{param} {key}"
