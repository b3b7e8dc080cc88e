"""The architecture table: lookups, block paths, and one-line refusals for families it does not know."""

from __future__ import annotations

import pytest
import torch

from lowbit.arch import FAMILIES, family_of, require_family
from lowbit.errors import LowbitError
from lowbit.model.conv1d import has_conv1d, linearize_conv1d
from lowbit.pipeline.layers import find_blocks
from tests.arch_models import CONFIGS, DECODERS, ENCODERS, tiny_config, tiny_model


def test_every_family_has_a_tiny_test_model_and_the_required_ones_are_there():
    names = {f.name for f in FAMILIES}
    assert names == set(CONFIGS)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "bert", "xlm-roberta"} <= names


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_blocks_are_found_where_the_table_says(family):
    model = tiny_model(family)
    path, blocks = find_blocks(model)
    assert path in family_of(model).blocks
    assert len(blocks) == 2
    assert family_of(model).encoder == (family in ENCODERS)


def test_unknown_family_is_a_one_line_refusal():
    config = tiny_config("llama")
    config.model_type = "my-new-llm"
    assert family_of(config) is None
    with pytest.raises(LowbitError) as err:
        require_family(config, "awq")
    message = str(err.value)
    assert "\n" not in message and "my-new-llm" in message and "awq" in message and "gemma3" in message


def test_conv1d_becomes_an_identical_linear():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert has_conv1d(model)
    assert linearize_conv1d(model) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert not has_conv1d(model)
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, torch.nn.Linear) and attn.weight.shape == (192, 64)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())
