"""GGUF twins: a checkpoint on TQ2_0/TQ1_0/Q4_0/Q8_0's grids is written without re-quantizing (bytes decoded by
gguf-py equal the checkpoint's values exactly), llama.cpp computes what transformers computes from the
checkpoint, and a checkpoint whose grid is not the planned type is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.llamacpp import gguf_logprobs
from lowbit.export.gguf import export_gguf_checkpoint
from lowbit.formats.quantize import dequantize, quantize
from lowbit.formats.spec import parse_spec
from lowbit.gguf.blocks import get_block_type
from lowbit.gguf.convert import GGUFExportOptions
from lowbit.gguf.twins import TWINS, encode_twin, matches, twin_rules
from lowbit.model.checkpoint import load_checkpoint
from lowbit.workflow import QuantizeOptions, quantize_job
from tests.arch_models import save_tiny, tiny_model


@pytest.mark.parametrize("gguf_type", list(TWINS))
def test_twin_bytes_decode_to_the_qtensor_exactly(gguf_type):
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    qt = quantize(w, parse_spec(TWINS[gguf_type][0]))
    assert matches(qt, gguf_type)
    data = encode_twin(qt, gguf_type, lambda a: a)
    decoded = get_block_type(gguf_type).dequantize(data)
    assert np.array_equal(decoded, dequantize(qt).numpy())


def test_other_grids_are_refused():
    qt = quantize(torch.randn(4, 256), parse_spec("int4:g32:asym"))
    assert not matches(qt, "Q4_0")
    with pytest.raises(LowbitError, match="not on the Q4_0 grid"):
        encode_twin(qt, "Q4_0", lambda a: a)


def test_twin_rules_follow_llamacpp_fallbacks():
    model = tiny_model("llama", hidden_size=256, intermediate_size=512)  # all rows multiples of 256
    rules = dict(r.split("=") for r in twin_rules(model, "TQ2_0"))
    assert set(rules.values()) == {"ternary:g256"} and len(rules) == 14
    narrow = tiny_model("llama", hidden_size=64, intermediate_size=256)  # 64-wide rows fall back to Q4_0
    rules = dict(r.split("=") for r in twin_rules(narrow, "TQ2_0"))
    assert rules["model.layers.0.mlp.down_proj"] == "ternary:g256" and rules["model.layers.0.mlp.up_proj"] == "int4:g32"


def _kld(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family,gguf_type", [("llama", "TQ2_0"), ("qwen2", "TQ1_0"), ("llama", "Q4_0")])
def test_llamacpp_runs_the_checkpoint_as_transformers_does(tmp_path, family, gguf_type):
    hf = save_tiny(family, tmp_path / "hf", hidden_size=256, intermediate_size=512)
    from lowbit.model.load import load_model

    rules = twin_rules(load_model(str(hf)).model, gguf_type)
    _, ckpt = quantize_job(QuantizeOptions(model=str(hf), scheme="W16A16", dtype="fp32", rules=rules,
                                           embeddings="keep", lm_head="keep", out=str(tmp_path / "ckpt"),
                                           evaluate=False), progress=False)
    float_heads = (("token_embd.weight", "F32"), ("output.weight", "F32"))  # only the twins are quantized
    summary = export_gguf_checkpoint(ckpt, GGUFExportOptions(type=gguf_type, types=float_heads,
                                                             out=str(tmp_path / "m.gguf")))
    assert summary["exact_from_codes"] == 14
    model, tokenizer, _ = load_checkpoint(ckpt)
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        original = torch.log_softmax(load_model(str(hf)).model(input_ids=ids).logits[0, :-1].float(), -1)
    got = gguf_logprobs(summary["path"], ids)[0]
    # What llama.cpp adds to the checkpoint: its int8 activations in quantized dot products (the weights are
    # the checkpoint's bit for bit). Small next to what quantization did to the original.
    added, quantization = _kld(ref, got), _kld(original, ref)
    print(f"{family} {gguf_type}: llama.cpp vs checkpoint {added:.4f}, checkpoint vs original {quantization:.4f}")
    assert added < 0.1 * quantization


def test_cli_refuses_a_type_the_grids_do_not_have(tmp_path, capsys):
    hf = save_tiny("llama", tmp_path / "hf", hidden_size=256, intermediate_size=512)
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(hf), "--scheme", "W4A16", "--out", str(ckpt), "--no-eval", "--json"]) == 0
    capsys.readouterr()
    code = main(["export", "gguf", str(ckpt), "--type", "Q4_K_M", "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a grid lowbit trains on" in err[0]
    assert not (tmp_path / "x.gguf").exists()
