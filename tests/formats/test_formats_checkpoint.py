"""Every number format through lowbit's checkpoint: QTensors written and read back bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowbit.eval.size import quantized_bits_per_weight
from lowbit.formats import dequantize, parse_spec
from lowbit.model.apply import quantize_model
from lowbit.model.checkpoint import WEIGHTS_FILE, read_header, read_qtensors, write_checkpoint
from lowbit.recipe import Recipe, Rule
from lowbit.schemes import SCHEMES


class _Config:
    def to_json_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({}, f)


class _Tokenizer:
    def save_pretrained(self, path: str) -> None:
        pass


def _write(tmp_path, spec_text: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64, bias=False))
    recipe = Recipe(scheme="test", rules=(Rule(("Linear",), parse_spec(spec_text)),), ignore=())
    qm = quantize_model(model, recipe, progress=False)
    write_checkpoint(qm, tmp_path, _Config(), _Tokenizer(), {"kind": "test"})
    return qm, tmp_path / WEIGHTS_FILE


SPECS = sorted({s.weights for s in SCHEMES.values() if s.weights} | {"fp8_e5m2:tensor", "log2_3:channel",
                                                                    "fp4_e2m1:g16:scale=e4m3", "int8:g32:scale=e8m0"})


@pytest.mark.parametrize("spec_text", SPECS)
def test_checkpoint_round_trip_is_exact(tmp_path, spec_text):
    qm, path = _write(tmp_path, spec_text)
    qtensors, floats = read_qtensors(path)
    assert set(qtensors) == set(qm.qtensors) and "0.bias" in floats
    for name, qt in qm.qtensors.items():
        back = qtensors[name]
        assert back.spec == qt.spec and back.shape == qt.shape
        assert torch.equal(back.codes, qt.codes)
        assert back.scales.dtype == qt.scales.dtype
        assert torch.equal(back.scales.view(torch.uint8), qt.scales.view(torch.uint8))
        assert (back.global_scale is None) == (qt.global_scale is None)
        if qt.global_scale is not None:
            assert torch.equal(back.global_scale, qt.global_scale)
        assert torch.equal(dequantize(back), dequantize(qt))


@pytest.mark.parametrize("spec_text,code_bits,group,scale_bits", [
    ("nvfp4", 4, 16, 8), ("mxfp4", 4, 32, 8), ("mxfp8", 8, 32, 8), ("fp4_e2m1:g32", 4, 32, 16),
    ("nf4:g64", 4, 64, 16), ("ternary:g64", 2, 64, 16), ("binary:g64", 1, 64, 16), ("fp8_e4m3:channel", 8, 64, 32),
])
def test_bits_per_weight_counts_codes_scales_and_global_scales(tmp_path, spec_text, code_bits, group, scale_bits):
    _, path = _write(tmp_path, spec_text)
    numel = 2 * 64 * 32
    n_scales = 32 * -(-64 // group) + 64 * -(-32 // group)  # Linear(64, 32) then Linear(32, 64)
    expected = code_bits + scale_bits * n_scales / numel
    if spec_text == "nvfp4":
        expected += 2 * 32 / numel  # one fp32 global scale per tensor
    assert quantized_bits_per_weight(path) == pytest.approx(expected)


def test_integer_checkpoints_have_no_new_tensors(tmp_path):
    _, path = _write(tmp_path, "int4:g32:asym")
    header, _ = read_header(path)
    parts = {k.rsplit(".", 1)[1] for k in header if k.startswith("2.")}
    assert parts == {"qcodes", "scales", "qzeros"}


def test_block_scale_dtypes_are_stored_as_float8(tmp_path):
    _, path = _write(tmp_path, "nvfp4")
    header, _ = read_header(path)
    assert header["0.weight.scales"]["dtype"] == "F8_E4M3"
    assert header["0.weight.global_scale"]["dtype"] == "F32" and header["0.weight.global_scale"]["shape"] == [1]
    _, path = _write(tmp_path, "mxfp4")
    assert read_header(path)[0]["0.weight.scales"]["dtype"] == "F8_E8M0"


@pytest.mark.parametrize("scheme", ["NVFP4"])
def test_cli_quantize_then_eval_reloads_the_same_model(tmp_path, tiny_llama_dir, capsys, scheme):
    from lowbit.cli import main

    out = tmp_path / scheme
    evals = ["--windows", "2", "--window-length", "64", "--json"]
    assert main(["quantize", str(tiny_llama_dir), "--scheme", scheme, "--out", str(out), *evals]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == parse_spec(SCHEMES[scheme].weights).__str__()
    assert main(["eval", str(out), *evals]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["eval"]["kld"] == pytest.approx(report["eval"]["kld"], rel=1e-5)
    assert again["bits_per_weight"] == report["bits_per_weight"]


def test_cli_refuses_a_bad_block_spec_in_one_line(tmp_path, tiny_llama_dir, capsys):
    from lowbit.cli import main

    out = tmp_path / "o"
    code = main(["quantize", str(tiny_llama_dir), "--scheme", "NVFP4", "--group-size", "32", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("lowbit: error:") == 1 and "groups of 16" in err
    assert not (tmp_path / "o").exists()


def test_inspect_counts_the_global_scale_with_its_tensor(tmp_path):
    from lowbit.inspect_files import inspect_path

    _write(tmp_path, "nvfp4")
    names = [t["name"] for t in inspect_path(str(tmp_path))["tensors"]]
    assert "0.weight" in names and not any(n.endswith("global_scale") for n in names)
