"""Named GGUF mixes (``Q4_K_M``, ``Q3_K_S``, ...) and plain types: which tensor gets which block type.

The choices follow llama.cpp's ``llama_tensor_get_type`` for dense models (no experts, not
Falcon, not 70B; a fused ``attn_qkv`` counts as ``attn_v`` there too) without an importance matrix, so a file we write has the same tensor types, hence the same
size, as ``llama-quantize`` makes from the same float file. Tensors whose row length does not fit the chosen
block fall back the way llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS / IQ3_S / IQ3_XXS / IQ2_XXS -> IQ4_NL,
...; F16 if even that does not fit).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Mix:
    """A ``general.file_type``: its default block type and the file-type id llama.cpp records."""

    name: str
    default: str
    file_type: int


def _mix(name: str, default: str, file_type: str) -> Mix:
    return Mix(name, default, int(LlamaFileType[file_type]))


MIXES: dict[str, Mix] = {m.name: m for m in (
    _mix("F32", "F32", "ALL_F32"), _mix("F16", "F16", "MOSTLY_F16"), _mix("BF16", "BF16", "MOSTLY_BF16"),
    _mix("Q8_0", "Q8_0", "MOSTLY_Q8_0"), _mix("Q4_0", "Q4_0", "MOSTLY_Q4_0"), _mix("Q4_1", "Q4_1", "MOSTLY_Q4_1"),
    _mix("Q5_0", "Q5_0", "MOSTLY_Q5_0"), _mix("Q5_1", "Q5_1", "MOSTLY_Q5_1"),
    _mix("Q2_K", "Q2_K", "MOSTLY_Q2_K"), _mix("Q3_K_S", "Q3_K", "MOSTLY_Q3_K_S"),
    _mix("Q3_K_M", "Q3_K", "MOSTLY_Q3_K_M"), _mix("Q3_K_L", "Q3_K", "MOSTLY_Q3_K_L"),
    _mix("Q4_K_S", "Q4_K", "MOSTLY_Q4_K_S"), _mix("Q4_K_M", "Q4_K", "MOSTLY_Q4_K_M"),
    _mix("Q5_K_S", "Q5_K", "MOSTLY_Q5_K_S"), _mix("Q5_K_M", "Q5_K", "MOSTLY_Q5_K_M"),
    _mix("Q6_K", "Q6_K", "MOSTLY_Q6_K"), _mix("TQ1_0", "TQ1_0", "MOSTLY_TQ1_0"),
    _mix("TQ2_0", "TQ2_0", "MOSTLY_TQ2_0"), _mix("MXFP4", "MXFP4", "MOSTLY_MXFP4_MOE"),
    _mix("IQ4_NL", "IQ4_NL", "MOSTLY_IQ4_NL"), _mix("IQ4_XS", "IQ4_XS", "MOSTLY_IQ4_XS"),
    _mix("IQ3_XS", "IQ3_S", "MOSTLY_IQ3_XS"), _mix("IQ3_S", "IQ3_S", "MOSTLY_IQ3_S"),
    _mix("IQ3_M", "IQ3_S", "MOSTLY_IQ3_M"), _mix("IQ2_XXS", "IQ2_XXS", "MOSTLY_IQ2_XXS"),
)}
# Aliases people type for the plain k-quant types.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FLOAT_TYPES = ("F32", "F16", "BF16")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
            "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
            "IQ2_XXS": "IQ4_NL"}
IQ4_MIXES = ("IQ4_NL", "IQ4_XS")
IQ3_MIXES = ("IQ3_XS", "IQ3_S", "IQ3_M")  # not IQ3_XXS: llama.cpp gives its attn_q/attn_k IQ2_S, not written yet


@dataclass(frozen=True)
class TensorRole:
    """What a mix needs to know about one tensor: GGUF name, row length (ne0), dims, layer and model facts."""

    name: str
    ne0: int
    n_dims: int
    layer: int | None
    n_layers: int
    n_gqa: int
    tied_embeddings: bool


@dataclass(frozen=True)
class Choice:
    """The type a tensor gets; ``wanted`` differs from ``type`` when the row length forced a fallback."""

    type: str
    wanted: str

    @property
    def fell_back(self) -> bool:
        return self.type != self.wanted


def get_mix(name: str) -> Mix:
    """The mix called ``name`` (case-insensitive; Q4_K means Q4_K_M), or a one-line error."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in MIXES:
        raise LowbitError(f"unknown GGUF type {name!r}; choose one of {', '.join(MIXES)}")
    return MIXES[key]


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def is_quantizable(name: str, n_dims: int) -> bool:
    """llama.cpp quantizes 2-D ``*.weight`` tensors except norms and position embeddings (GPT-2); everything
    else stays F32."""
    return n_dims >= 2 and name.endswith(".weight") and "_norm.weight" not in name and name != "position_embd.weight"


def quantizable(role: TensorRole) -> bool:
    """``is_quantizable`` for a tensor's role."""
    return is_quantizable(role.name, role.n_dims)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if ".attn_qkv.weight" in name:  # llama.cpp treats a fused QKV (Phi-3, GPT-2) like attn_v
        return "attn_v"
    for key in ("attn_v", "attn_k", "attn_q", "attn_output", "ffn_down", "ffn_gate", "ffn_up"):
        if f".{key}.weight" in name:
            return key
    return {"output.weight": "output", "token_embd.weight": "token_embd"}.get(name, "other")


def _mixed_type(mix: Mix, role: TensorRole) -> str:
    """llama_tensor_get_type_impl for a dense Llama, no imatrix."""
    new, cat, m = mix.default, _category(role.name), mix.name
    i, n = role.layer or 0, role.n_layers
    if cat == "output" or (cat == "token_embd" and role.tied_embeddings):
        if role.ne0 % block_size(new) != 0:
            return "Q8_0"
        return new if new == "Q8_0" else "Q5_K" if m == "IQ2_XXS" else "Q6_K"
    if cat == "token_embd":
        return {"TQ1_0": "Q4_K", "TQ2_0": "Q4_K", "IQ2_XXS": "Q2_K"}.get(m, new)
    if cat == "attn_v":
        rules = {"Q2_K": "Q4_K" if role.n_gqa >= 4 else "Q3_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K",
                 "Q3_K_L": "Q5_K", "Q4_K_S": "Q5_K" if i < 4 else new,
                 **dict.fromkeys(IQ4_MIXES, "Q5_K" if role.n_gqa >= 4 else new),
                 **dict.fromkeys(IQ3_MIXES, "Q4_K" if role.n_gqa >= 4 else new), "IQ3_M": "Q4_K",
                 "IQ2_XXS": "Q4_K" if role.n_gqa >= 4 else "Q2_K"}
        if m in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if _more_bits(i, n) else new
        return rules.get(m, new)
    if cat == "ffn_down":
        rules = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K", "Q3_K_L": "Q5_K",
                 "Q4_K_S": "Q5_K" if i < n // 8 else new,
                 # llama.cpp bumps IQ4 ffn_down this way only without an imatrix (like every rule here)
                 **dict.fromkeys(IQ4_MIXES, "Q5_K" if i < n // 8 else new), "IQ3_M": "Q4_K" if i < n // 8 else new,
                 "IQ2_XXS": "Q2_K" if i < n // 8 else new}
        if m in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if _more_bits(i, n) else new
        return rules.get(m, new)
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(m, new)
    if m == "IQ3_XS" and (cat in ("attn_k", "attn_q") or (cat in ("ffn_gate", "ffn_up") and n // 8 <= i < 7 * n // 8)):
        return "IQ3_XXS"
    return new


def choose_type(mix: Mix, role: TensorRole) -> Choice:
    """The block type ``role`` gets under ``mix``, with llama.cpp's fallback for rows that do not fit."""
    if not quantizable(role):
        return Choice("F32", "F32")
    if mix.default in FLOAT_TYPES:
        return Choice(mix.default, mix.default)
    wanted = _mixed_type(mix, role)
    if role.ne0 % block_size(wanted) == 0:
        return Choice(wanted, wanted)
    if wanted not in FALLBACK:
        raise LowbitError(f"{role.name} has rows of {role.ne0} values, not a multiple of {wanted}'s block of "
                          f"{block_size(wanted)}, and {wanted} has no fallback type; choose another --type")
    fallback = FALLBACK[wanted]
    return Choice(fallback if role.ne0 % block_size(fallback) == 0 else "F16", wanted)
