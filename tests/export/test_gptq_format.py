"""GPTQ checkpoint export, decoded by an independent loop-based reader written from the documented layout.

No GPTQ reader runs here (transformers needs optimum + gptqmodel, and gptqmodel 7.x needs a newer torch
than the project pins), so ``decode_gptq`` below follows the layout AutoGPTQ's ``QuantLinear.pack``
documents, element by element: for 2/4/8 bits, 32/b codes per int32 word with code j at bits b*j; for
3 bits, 32 codes in 3 words as 10 codes, one code split over the word boundary, 10 codes, one split code,
10 codes; zero points packed the same way along the output dimension and stored minus one (v1).
W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) must equal lowbit's dequantized weight exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.gptq import export_gptq_folder, module_tensors
from lowbit.formats.quantize import dequantize
from lowbit.model.checkpoint import read_qtensors
from tests.export.helpers import assert_export_refused, constant_qtensor, quantize_folder


def _word_bits(word: int, start: int, count: int) -> int:
    return ((word & 0xFFFFFFFF) >> start) & ((1 << count) - 1)


def _unpack_column(words: list[int], bits: int, n: int) -> list[int]:
    """The n codes of one packed column, read the way AutoGPTQ writes them (not as a generic bit stream)."""
    codes: list[int] = []
    if bits in (2, 4, 8):
        per_word = 32 // bits
        for k in range(n):
            codes.append(_word_bits(words[k // per_word], bits * (k % per_word), bits))
        return codes
    assert bits == 3
    for block in range(n // 32):
        w0, w1, w2 = words[3 * block: 3 * block + 3]
        codes += [_word_bits(w0, 3 * j, 3) for j in range(10)]
        codes.append(_word_bits(w0, 30, 2) | (_word_bits(w1, 0, 1) << 2))
        codes += [_word_bits(w1, 3 * j + 1, 3) for j in range(10)]
        codes.append(_word_bits(w1, 31, 1) | (_word_bits(w2, 0, 2) << 1))
        codes += [_word_bits(w2, 3 * j + 2, 3) for j in range(10)]
    return codes


def decode_gptq(tensors: dict[str, torch.Tensor], module: str, bits: int, v1: bool = True) -> torch.Tensor:
    """Dequantized weight [out, in] of one GPTQ linear, in float32."""
    qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
    scales, g_idx = tensors[f"{module}.scales"].float().tolist(), tensors[f"{module}.g_idx"].tolist()
    n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = [_unpack_column(column, bits, n_in) for column in qweight.t().tolist()]
    zeros = [_unpack_column(row, bits, n_out) for row in qzeros.tolist()]
    stored_offset = 1 if v1 else 0
    rows = [[scales[g_idx[i]][o] * (q[o][i] - zeros[g_idx[i]][o] - stored_offset) for i in range(n_in)]
            for o in range(n_out)]
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


KV_FLOAT = ["--ignore", "*.k_proj", "--ignore", "*.v_proj"]  # 3-bit GPTQ needs outputs in multiples of 32, not 48
CASES = {  # name: (lowbit quantize arguments, expected bits, group size, sym)
    "w4-g32-sym": (["--scheme", "W4A16", "--group-size", "32"], 4, 32, True),
    "w4-g32-asym": (["--scheme", "W4A16", "--group-size", "32", "--asym"], 4, 32, False),
    "w4-g64-ragged": (["--scheme", "W4A16", "--group-size", "64", "--asym"], 4, 64, False),
    "w8-channel": (["--scheme", "W8A16"], 8, -1, True),
    "w3-g32-asym": (["--scheme", "W3A16", "--group-size", "32", "--asym", *KV_FLOAT], 3, 32, False),
    "w3-g32-sym": (["--scheme", "W3A16", "--group-size", "32", *KV_FLOAT], 3, 32, True),
    "w2-g32-asym": (["--scheme", "W2A16", "--group-size", "32", "--asym"], 2, 32, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decoded_gptq_weights_equal_ours(tiny_llama_dir, tmp_path, name):
    args, bits, group, sym = CASES[name]
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", args)
    out = tmp_path / "gptq"
    summary = export_gptq_folder(ckpt, out)
    assert (summary["bits"], summary["group_size"], summary["sym"]) == (bits, group, sym)
    tensors = load_file(str(out / "model.safetensors"))
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    for param, qt in qtensors.items():
        module = param.removesuffix(".weight")
        n_out, n_in = qt.codes.shape
        n_groups = 1 if group == -1 else -(-n_in // group)
        assert tensors[f"{module}.qweight"].shape == (n_in * bits // 32, n_out)
        assert tensors[f"{module}.qzeros"].shape == (n_groups, n_out * bits // 32)
        assert tensors[f"{module}.scales"].dtype == torch.float16
        assert tensors[f"{module}.scales"].shape == (n_groups, n_out)
        expected_gidx = [0] * n_in if group == -1 else [i // group for i in range(n_in)]
        assert tensors[f"{module}.g_idx"].dtype == torch.int32 and tensors[f"{module}.g_idx"].tolist() == expected_gidx
        assert torch.equal(decode_gptq(tensors, module, bits), dequantize(qt)), param
        if sym and bits in (4, 8):  # v1 symmetric zeros: 2^(b-1) - 1 in every field
            assert set(tensors[f"{module}.qzeros"].flatten().tolist()) == {0x77777777 if bits == 4 else 0x7F7F7F7F}


def test_quantize_config_and_transformers_gptq_config(tiny_llama_dir, tmp_path):
    from transformers import GPTQConfig

    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", ["--scheme", "W4A16", "--group-size", "32",
                                                           "--ignore", "*.layers.1.mlp.up_proj"])
    out = tmp_path / "gptq"
    assert main(["export", "gptq", str(ckpt), "--out", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    keys = ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")
    assert [qc[k] for k in keys] == ["gptq", 4, 32, False, True, "gptq"]
    assert qc["dynamic"] == {r"-:^model\.layers\.1\.mlp\.up_proj$": {}}
    parsed = GPTQConfig.from_dict(qc)  # transformers' own config class accepts it (loading needs gptqmodel)
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.desc_act, parsed.format) == (4, 32, True, False, "gptq")
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight" in tensors and "model.layers.1.mlp.up_proj.qweight" not in tensors


def test_gptq_v2_stores_zeros_as_they_are(tiny_llama_dir, tmp_path):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", ["--scheme", "W4A16", "--group-size", "32", "--asym"])
    out = tmp_path / "gptq2"
    export_gptq_folder(ckpt, out, checkpoint_format="gptq_v2")
    tensors = load_file(str(out / "model.safetensors"))
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    for param, qt in qtensors.items():
        assert torch.equal(decode_gptq(tensors, param.removesuffix(".weight"), 4, v1=False), dequantize(qt))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "gptq_v2"


def test_module_level_refusals():
    with pytest.raises(LowbitError, match="zero point of 0 cannot be stored in GPTQ v1"):
        module_tensors("m", constant_qtensor("int4:g32:asym", 32, 64, zero=0))
    assert module_tensors("m", constant_qtensor("int4:g32:asym", 32, 64, zero=0), "gptq_v2")["qzeros"].abs().sum() == 0
    with pytest.raises(LowbitError, match="input size must be a multiple of 32, got 48"):
        module_tensors("m", constant_qtensor("int3:g16", 32, 48, zero=None))
    with pytest.raises(LowbitError, match="formats that hold int4:b32x32"):
        module_tensors("m", constant_qtensor("int4:b32x32", 32, 64, zero=None))


@pytest.mark.parametrize("args,expected", [
    (["--scheme", "W8A8"], "GPTQ checkpoints are weight-only"),
    (["--scheme", "W4A16", "--group-size", "32", "--rule", "*.down_proj=int8:channel"], "mixes int4:g32, int8:channel"),
    (["--scheme", "NF4", "--group-size", "32"], "nf4:g32 cannot be written as GPTQ"),
    (["--scheme", "W4A16", "--group-size", "32", "--method", "hqq", "--asym"], "zero points are floats"),
    (["--scheme", "W4A16", "--rule", "Linear=int4:g32:scale=fp32"], "not all exact in float16"),
])
def test_unsupported_checkpoints_fail_in_one_line_with_nothing_written(tiny_llama_dir, tmp_path, capsys, args,
                                                                       expected):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", args)
    out = tmp_path / "exports" / "gptq"
    assert_export_refused(["export", "gptq", str(ckpt), "--out", str(out)], tmp_path / "exports", capsys, expected)
