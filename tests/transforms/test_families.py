"""Every scale pair in the architecture table is an exact equivalence on a tiny model of its family:
AWQ- and SmoothQuant-style folds leave the float model's outputs unchanged (1e-4 relative)."""

from __future__ import annotations

import pytest
import torch

from lowbit.arch import ScalePair, family_of
from lowbit.pipeline.layers import find_blocks
from lowbit.transforms.mappings import applicable_mappings
from tests.arch_models import DECODERS, ENCODERS, fold_everything, lowbit_model, outputs, random_ids, tiny_model


@pytest.mark.parametrize("kind", ["awq", "smoothquant"])
@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_every_table_fold_keeps_the_float_model(family, kind):
    model = lowbit_model(family)
    entry = family_of(model)
    assert entry is not None and entry.name == family
    ids = random_ids()
    before = outputs(model, ids)
    folds = fold_everything(model, entry.scale_pairs, entry.norm_offset, kind)
    after = outputs(model, ids)
    assert folds >= 2, "at least one fold per block"
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel < 1e-4, f"{family}: folds changed the float model by {rel:.2e} relative"


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_table_pairs_exist_in_the_model(family):
    """Each pair names real modules; only v_proj -> o_proj may be skipped (grouped-query attention)."""
    model = lowbit_model(family)
    entry = family_of(model)
    _, blocks = find_blocks(model)
    found = {m.producer for m, _, _ in applicable_mappings(blocks[0], entry.scale_pairs)}
    missing = {p.producer for p in entry.scale_pairs} - found
    assert missing <= {"self_attn.v_proj"}, f"{family}: pairs not found in the model: {missing}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_llama_pairs_or_convention_would_break_gemma(family):
    """Why Gemma needs its own entry: folding its post-attention norm into the MLP, or ignoring the
    1 + weight convention, changes the model (what made AWQ write NaN/garbage before the table)."""
    ids = random_ids()
    wrong_pair = (ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),)
    for pairs, offset in ((wrong_pair, 1.0), (family_of(tiny_model(family)).scale_pairs, 0.0)):
        model = lowbit_model(family)
        before = outputs(model, ids)
        fold_everything(model, pairs, offset, "smoothquant")
        rel = float((outputs(model, ids) - before).abs().max() / before.abs().max())
        assert rel > 1e-2
