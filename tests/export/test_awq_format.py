"""AWQ GEMM checkpoint export, decoded by an independent loop-based reader written from the documented layout.

No AWQ reader runs here (AutoAWQ needs CUDA kernels; transformers loads AWQ only through gptqmodel, which needs
a newer torch than the project pins), so ``decode_awq`` below follows the layout of AutoAWQ's
``WQLinear_GEMM`` element by element: ``qweight`` [in, out/8] holds, in word k of input row i, the codes of
outputs 8k..8k+7 with nibble j (bits 4j..4j+3) holding output 8k + ORDER[j], ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
``qzeros`` [in/G, out/8] packs zero points the same way, stored as they are; ``scales`` [in/G, out] fp16.
W[o, i] = scales[i // G, o] * (q[i, o] - z[i // G, o]) must equal lowbit's dequantized weight exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.awq import export_awq_folder, module_tensors
from lowbit.formats.quantize import dequantize
from lowbit.model.checkpoint import read_qtensors
from tests.conftest import TINY_VOCAB, make_tokenizer
from tests.export.helpers import assert_export_refused, constant_qtensor, quantize_folder

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _unpack_row(words: list[int], n: int) -> list[int]:
    """The n 4-bit codes of one packed row, un-interleaving AWQ's order nibble by nibble."""
    codes = [-1] * n
    for k, word in enumerate(words):
        for j in range(8):
            codes[8 * k + AWQ_ORDER[j]] = ((word & 0xFFFFFFFF) >> (4 * j)) & 0xF
    assert -1 not in codes
    return codes


def decode_awq(tensors: dict[str, torch.Tensor], module: str, group: int) -> torch.Tensor:
    """Dequantized weight [out, in] of one AWQ GEMM linear, in float32 (group -1: one group per row)."""
    qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
    scales = tensors[f"{module}.scales"].float().tolist()
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    group = n_in if group == -1 else group
    q = [_unpack_row(row, n_out) for row in qweight.tolist()]  # q[i][o]
    zeros = [_unpack_row(row, n_out) for row in qzeros.tolist()]  # zeros[g][o]
    rows = [[scales[i // group][o] * (q[i][o] - zeros[i // group][o]) for i in range(n_in)] for o in range(n_out)]
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


def test_decoder_reads_the_interleave_the_way_awq_documents_it():
    words = [0x76543210]  # nibble j = j
    assert _unpack_row(words, 8) == [0, 4, 1, 5, 2, 6, 3, 7]  # output o holds the nibble AWQ_ORDER.index(o)


@pytest.fixture(scope="module")
def llama128_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose rows (128, 256) are whole groups of 64, which AWQ GEMM needs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.data.text import default_text

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama-128")
    LlamaForCausalLM(config).eval().save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(default_text()).save_pretrained(str(path))
    return path


CASES = {  # name: (model fixture, lowbit quantize arguments, expected group size, sym)
    "g32-sym": ("tiny_llama_dir", ["--scheme", "W4A16", "--group-size", "32"], 32, True),
    "g32-asym": ("tiny_llama_dir", ["--scheme", "W4A16", "--group-size", "32", "--asym"], 32, False),
    "g64-sym": ("llama128_dir", ["--scheme", "W4A16", "--group-size", "64"], 64, True),
    "g64-asym": ("llama128_dir", ["--scheme", "W4A16", "--group-size", "64", "--asym"], 64, False),
    "channel-asym": ("tiny_llama_dir", ["--scheme", "W4A16", "--rule", "Linear=int4:channel:asym"], -1, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decoded_awq_weights_equal_ours(request, tmp_path, name):
    fixture, args, group, sym = CASES[name]
    ckpt = quantize_folder(request.getfixturevalue(fixture), tmp_path / "lowbit", args)
    out = tmp_path / "awq"
    summary = export_awq_folder(ckpt, out)
    assert (summary["bits"], summary["group_size"], summary["sym"]) == (4, group, sym)
    tensors = load_file(str(out / "model.safetensors"))
    qtensors, _ = read_qtensors(ckpt / "model.safetensors")
    assert len(qtensors) == 14
    for param, qt in qtensors.items():
        module = param.removesuffix(".weight")
        n_out, n_in = qt.codes.shape
        n_groups = 1 if group == -1 else n_in // group
        assert tensors[f"{module}.qweight"].dtype == torch.int32
        assert tensors[f"{module}.qweight"].shape == (n_in, n_out // 8)
        assert tensors[f"{module}.qzeros"].dtype == torch.int32
        assert tensors[f"{module}.qzeros"].shape == (n_groups, n_out // 8)
        assert tensors[f"{module}.scales"].dtype == torch.float16
        assert tensors[f"{module}.scales"].shape == (n_groups, n_out)
        assert f"{module}.g_idx" not in tensors and param not in tensors
        assert torch.equal(decode_awq(tensors, module, group), dequantize(qt)), param
        if sym:  # symmetric codes are stored unsigned around z = 8 in every nibble
            assert set(tensors[f"{module}.qzeros"].flatten().tolist()) == {-0x77777778}  # 0x88888888 as int32


def test_quantization_config_and_transformers_awq_config(tiny_llama_dir, tmp_path):
    from transformers import AwqConfig

    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", ["--scheme", "W4A16", "--group-size", "32", "--asym",
                                                           "--ignore", "*.layers.1.mlp.up_proj"])
    out = tmp_path / "awq"
    assert main(["export", "awq", str(ckpt), "--out", str(out), "--json"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    keys = ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert")
    assert [qc[k] for k in keys] == ["awq", 4, 32, True, "gemm", ["lm_head", "model.layers.1.mlp.up_proj"]]
    assert qc["meta"]["lowbit_spec"] == "int4:g32:asym"
    assert json.loads((out / "quant_config.json").read_text()) == {
        "zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM",
        "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.up_proj"]}
    parsed = AwqConfig.from_dict(qc)  # transformers' own config class accepts it (loading needs gptqmodel)
    assert (parsed.bits, parsed.group_size, parsed.zero_point, parsed.format) == (4, 32, True, "gemm")
    assert parsed.modules_to_not_convert == ["lm_head", "model.layers.1.mlp.up_proj"]
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight" in tensors and "model.layers.1.mlp.up_proj.qweight" not in tensors
    assert json.loads((out / "lowbit_export.json").read_text())["format"] == "awq:gemm"


def test_quantize_writes_awq_beside_the_lowbit_folder(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", str(tiny_llama_dir), "--scheme", "W4A16", "--group-size", "32", "--format",
                 "lowbit,awq", "--out", str(out), "--no-eval"]) == 0, capsys.readouterr().err
    assert (out / "report.json").is_file()
    assert f"wrote {tmp_path / 'w4-awq'} (awq:gemm)" in capsys.readouterr().out
    qc = json.loads((tmp_path / "w4-awq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["group_size"], qc["version"]) == ("awq", 32, "gemm")


def test_module_level_refusals():
    assert module_tensors("m", constant_qtensor("int4:g32:asym", 32, 64, zero=0))["qzeros"].abs().sum() == 0  # z=0 is fine
    with pytest.raises(LowbitError, match="output size must be a multiple of 8, got 36"):
        module_tensors("m", constant_qtensor("int4:g32", 36, 64, zero=None))
    with pytest.raises(LowbitError, match="input size 96 is not a multiple of 64"):
        module_tensors("m", constant_qtensor("int4:g64", 32, 96, zero=None))
    with pytest.raises(LowbitError, match="int3:g32 cannot be written as AWQ GEMM, which holds int4"):
        module_tensors("m", constant_qtensor("int3:g32", 32, 64, zero=None))
    with pytest.raises(LowbitError, match="formats that hold int4:b32x32"):
        module_tensors("m", constant_qtensor("int4:b32x32", 32, 64, zero=None))


@pytest.mark.parametrize("args,expected", [
    (["--scheme", "W4A16", "--group-size", "64"], "input size 96 is not a multiple of 64"),
    (["--scheme", "W3A16", "--group-size", "32"], "int3:g32 cannot be written as AWQ GEMM"),
    (["--scheme", "W8A16"], "int8:channel cannot be written as AWQ GEMM"),
    (["--scheme", "W8A8"], "AWQ checkpoints are weight-only"),
    (["--scheme", "W4A16", "--group-size", "32", "--rule", "*.down_proj=int4:channel"], "mixes int4:channel, int4:g32"),
    (["--scheme", "W4A16", "--group-size", "32", "--method", "hqq", "--asym"], "zero points are floats"),
    (["--scheme", "W4A16", "--rule", "Linear=int4:g32:scale=fp32"], "not all exact in float16"),
])
def test_unsupported_checkpoints_fail_in_one_line_with_nothing_written(tiny_llama_dir, tmp_path, capsys, args,
                                                                       expected):
    ckpt = quantize_folder(tiny_llama_dir, tmp_path / "lowbit", args)
    out = tmp_path / "exports" / "awq"
    assert_export_refused(["export", "awq", str(ckpt), "--out", str(out)], tmp_path / "exports", capsys, expected)
