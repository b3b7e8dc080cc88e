"""Named mixes pick llama.cpp's types for a Llama-style model, fall back the way llama.cpp does, and refuse
types without a fallback."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError
from lowbit.gguf.mixes import choose_type, get_mix

SMOL = dict(n_layers=30, n_gqa=3, tied_embeddings=True)  # SmolLM2-135M: 576 wide, ffn 1536


def _role(name, ne0, layer=None, n_dims=2, **over):
    from lowbit.gguf.mixes import TensorRole

    facts = {**SMOL, **over}
    return TensorRole(name, ne0, n_dims, layer, facts["n_layers"], facts["n_gqa"], facts["tied_embeddings"])


def test_q4_k_m_on_smollm2_shapes():
    mix = get_mix("Q4_K_M")
    assert choose_type(mix, _role("blk.0.ffn_down.weight", 1536, 0)).type == "Q6_K"       # use_more_bits
    assert choose_type(mix, _role("blk.4.ffn_down.weight", 1536, 4)).type == "Q4_K"
    assert choose_type(mix, _role("blk.5.ffn_down.weight", 1536, 5)).type == "Q6_K"       # (5-3) % 3 == 2
    v0 = choose_type(mix, _role("blk.0.attn_v.weight", 576, 0))
    assert (v0.wanted, v0.type, v0.fell_back) == ("Q6_K", "Q8_0", True)
    q = choose_type(mix, _role("blk.7.attn_q.weight", 576, 7))
    assert (q.wanted, q.type) == ("Q4_K", "Q5_0")
    assert choose_type(mix, _role("token_embd.weight", 576)).type == "Q8_0"                 # tied output
    assert choose_type(mix, _role("blk.0.attn_norm.weight", 576, 0, n_dims=1)).type == "F32"


def test_k_mix_rules_on_256_wide_model():
    role = dict(n_layers=16, n_gqa=2, tied_embeddings=False)
    assert choose_type(get_mix("Q2_K"), _role("blk.3.attn_v.weight", 256, 3, **role)).type == "Q3_K"
    assert choose_type(get_mix("Q2_K"), _role("blk.3.attn_output.weight", 256, 3, **role)).type == "Q3_K"
    assert choose_type(get_mix("Q2_K"), _role("blk.3.ffn_up.weight", 256, 3, **role)).type == "Q2_K"
    assert choose_type(get_mix("Q3_K_M"), _role("blk.0.attn_v.weight", 256, 0, **role)).type == "Q5_K"
    assert choose_type(get_mix("Q3_K_M"), _role("blk.2.attn_v.weight", 256, 2, **role)).type == "Q4_K"
    assert choose_type(get_mix("Q3_K_M"), _role("blk.0.ffn_down.weight", 512, 0, **role)).type == "Q5_K"
    assert choose_type(get_mix("Q3_K_L"), _role("blk.9.ffn_down.weight", 512, 9, **role)).type == "Q5_K"
    assert choose_type(get_mix("Q4_K_S"), _role("blk.1.attn_v.weight", 256, 1, **role)).type == "Q5_K"
    assert choose_type(get_mix("Q5_K_S"), _role("blk.1.attn_v.weight", 256, 1, **role)).type == "Q5_K"
    assert choose_type(get_mix("Q4_0"), _role("output.weight", 256, **role)).type == "Q6_K"
    assert choose_type(get_mix("Q8_0"), _role("output.weight", 256, **role)).type == "Q8_0"
    assert choose_type(get_mix("Q4_K_M"), _role("token_embd.weight", 256, **role)).type == "Q4_K"
    assert choose_type(get_mix("F16"), _role("blk.0.ffn_up.weight", 256, 0, **role)).type == "F16"


def test_fallback_to_f16_and_no_fallback_errors():
    assert choose_type(get_mix("Q4_K_M"), _role("blk.2.ffn_up.weight", 48, 2)).type == "F16"
    with pytest.raises(LowbitError, match="no fallback"):
        choose_type(get_mix("Q4_0"), _role("blk.2.ffn_up.weight", 48, 2))
    with pytest.raises(LowbitError, match="unknown GGUF type"):
        get_mix("Q4_K_XL")
    assert get_mix("q4_k").name == "Q4_K_M"


@pytest.mark.parametrize("mix_name", ["IQ3_XS", "IQ3_S", "IQ3_M"])
def test_iq3_mixes_on_smollm2_shapes(mix_name):
    """576-wide rows fit no 256-value block: IQ3_S / IQ3_XXS fall back to IQ4_NL, Q4_K to Q5_0; ffn_down's
    1536-wide rows keep IQ3_S (IQ3_M: Q4_K in the first eighth of the layers); the tied output takes Q8_0."""
    mix, xs, m = get_mix(mix_name), mix_name == "IQ3_XS", mix_name == "IQ3_M"
    q = choose_type(mix, _role("blk.7.attn_q.weight", 576, 7))
    assert (q.wanted, q.type) == ("IQ3_XXS" if xs else "IQ3_S", "IQ4_NL")
    up = choose_type(mix, _role("blk.7.ffn_up.weight", 576, 7))
    assert (up.wanted, up.type) == ("IQ3_XXS" if xs else "IQ3_S", "IQ4_NL")
    assert choose_type(mix, _role("blk.1.ffn_up.weight", 576, 1)).wanted == "IQ3_S"
    v = choose_type(mix, _role("blk.7.attn_v.weight", 576, 7))
    assert (v.wanted, v.type) == (("Q4_K", "Q5_0") if m else ("IQ3_S", "IQ4_NL"))
    assert choose_type(mix, _role("blk.2.ffn_down.weight", 1536, 2)).type == ("Q4_K" if m else "IQ3_S")
    assert choose_type(mix, _role("blk.3.ffn_down.weight", 1536, 3)).type == "IQ3_S"
    assert choose_type(mix, _role("token_embd.weight", 576)).type == "Q8_0"


def test_rules_that_depend_on_an_importance_matrix():
    """llama_tensor_get_type's imatrix-dependent rules (llama-quant.cpp): with an imatrix IQ3_XXS keeps attn_v and
    ffn_down on IQ3_XXS (without: IQ3_S; Q4_K / Q3_K), IQ4's first ffn_down layers are not bumped to Q5_K, and
    Q4_0 / Q5_0 put the first eighth of ffn_down on Q4_1 / Q5_1."""
    role = dict(n_layers=16, n_gqa=2, tied_embeddings=False)
    for imatrix in (False, True):
        xxs = get_mix("IQ3_XXS", imatrix=imatrix)
        assert choose_type(xxs, _role("blk.3.attn_v.weight", 256, 3, **role)).type == ("IQ3_XXS" if imatrix else "IQ3_S")
        assert choose_type(xxs, _role("blk.0.ffn_down.weight", 512, 0, **role)).type == ("IQ3_XXS" if imatrix else "Q4_K")
        assert choose_type(xxs, _role("blk.5.ffn_down.weight", 512, 5, **role)).type == ("IQ3_XXS" if imatrix else "Q3_K")
        assert choose_type(get_mix("IQ4_XS", imatrix), _role("blk.0.ffn_down.weight", 512, 0, **role)).type == (
            "IQ4_XS" if imatrix else "Q5_K")
        assert choose_type(get_mix("Q4_0", imatrix), _role("blk.1.ffn_down.weight", 512, 1, **role)).type == (
            "Q4_1" if imatrix else "Q4_0")
        assert choose_type(get_mix("Q5_0", imatrix), _role("blk.2.ffn_down.weight", 512, 2, **role)).type == "Q5_0"
        assert choose_type(get_mix("Q4_K_M", imatrix), _role("blk.0.ffn_down.weight", 512, 0, **role)).type == "Q6_K"


def test_low_bit_i_quant_mixes():
    """IQ2_* / IQ1_* / IQ3_XXS (llama.cpp's very-low-bit branch): IQ2_S's default type is IQ2_XS and IQ2_M's IQ2_S;
    attn_v, the first eighth of ffn_down and attn_output get IQ3_S under IQ2_S / IQ2_M, Q2_K (attn_v, ffn_down) and
    IQ2_XXS (attn_output, IQ1_*) otherwise; IQ3_XXS puts attn_q / attn_k on IQ2_S and attn_output on IQ3_S;
    the output takes Q5_K, an untied token_embd Q2_K or IQ3_S."""
    role = dict(n_layers=16, n_gqa=2, tied_embeddings=False)
    assert (get_mix("IQ2_S").default, get_mix("IQ2_M").default) == ("IQ2_XS", "IQ2_S")
    expect = {  # mix: attn_v, ffn_down (layer 0), ffn_down (layer 5), attn_output, attn_q, token_embd
        "IQ2_M": ("IQ3_S", "IQ3_S", "IQ2_S", "IQ3_S", "IQ2_S", "IQ3_S"),
        "IQ2_S": ("IQ3_S", "IQ3_S", "IQ2_XS", "IQ3_S", "IQ2_XS", "IQ3_S"),
        "IQ2_XS": ("Q2_K", "Q2_K", "IQ2_XS", "IQ2_XS", "IQ2_XS", "Q2_K"),
        "IQ1_M": ("Q2_K", "Q2_K", "IQ1_M", "IQ2_XXS", "IQ1_M", "Q2_K"),
        "IQ1_S": ("Q2_K", "Q2_K", "IQ1_S", "IQ2_XXS", "IQ1_S", "Q2_K"),
        "IQ3_XXS": ("IQ3_XXS", "IQ3_XXS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ3_S"),
    }
    for name, types in expect.items():
        mix = get_mix(name, imatrix=True)
        got = tuple(choose_type(mix, _role(t, 256 if "attn" in t else 512, layer, **role)).type for t, layer in (
            ("blk.3.attn_v.weight", 3), ("blk.0.ffn_down.weight", 0), ("blk.5.ffn_down.weight", 5),
            ("blk.3.attn_output.weight", 3), ("blk.3.attn_q.weight", 3), ("token_embd.weight", None)))
        assert got == types, name
        assert choose_type(mix, _role("output.weight", 256, **role)).type == "Q5_K"
        assert choose_type(mix, _role("blk.3.attn_v.weight", 256, 3, n_layers=16, n_gqa=4,
                                      tied_embeddings=False)).type == "Q4_K"
        wide = choose_type(mix, _role("blk.5.ffn_up.weight", 96, 5, **role))
        assert wide.type == "IQ4_NL" and wide.fell_back
