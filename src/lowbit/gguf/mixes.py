"""Named GGUF mixes (``Q4_K_M``, ``Q3_K_S``, ...) and plain types: which tensor gets which block type.

The choices follow llama.cpp's ``llama_tensor_get_type`` for dense models (no experts, not Falcon, not 70B; a
fused ``attn_qkv`` counts as ``attn_v`` there too), so a file we write has the same tensor types, hence the same
size, as ``llama-quantize`` makes from the same float file. A few rules depend on whether llama-quantize was given
an importance matrix (IQ3_XXS's attn_v and ffn_down, IQ4's ffn_down, Q4_0/Q5_0's first ffn_down layers): a mix
with ``imatrix=True`` follows them as llama-quantize does with ``--imatrix``, which is the comparison a calibrated
lowbit file (``--method imatrix`` or ``gptq``) is up against. Tensors whose row length does not fit the chosen
block fall back the way llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS / IQ3_S / IQ3_XXS / IQ2_XXS -> IQ4_NL,
...; F16 if even that does not fit).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Mix:
    """A ``general.file_type``: its default block type and the file-type id llama.cpp records."""

    name: str
    default: str
    file_type: int
    imatrix: bool = False  # llama-quantize's choices when it has an importance matrix


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
    _mix("IQ3_M", "IQ3_S", "MOSTLY_IQ3_M"), _mix("IQ3_XXS", "IQ3_XXS", "MOSTLY_IQ3_XXS"),
    _mix("IQ2_M", "IQ2_S", "MOSTLY_IQ2_M"), _mix("IQ2_S", "IQ2_XS", "MOSTLY_IQ2_S"),  # sic: IQ2_S's default is IQ2_XS
    _mix("IQ2_XS", "IQ2_XS", "MOSTLY_IQ2_XS"), _mix("IQ2_XXS", "IQ2_XXS", "MOSTLY_IQ2_XXS"),
    _mix("IQ1_M", "IQ1_M", "MOSTLY_IQ1_M"), _mix("IQ1_S", "IQ1_S", "MOSTLY_IQ1_S"),
)}
# Aliases people type for the plain k-quant types.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FLOAT_TYPES = ("F32", "F16", "BF16")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
            "Q6_K": "Q8_0", **dict.fromkeys(("IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S",
                                             "IQ1_M"), "IQ4_NL")}
IQ4_MIXES = ("IQ4_NL", "IQ4_XS")
IQ3_MIXES = ("IQ3_XS", "IQ3_S", "IQ3_M")
IQ1_MIXES = ("IQ1_S", "IQ1_M")
LOW_BIT_MIXES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", *IQ1_MIXES)  # llama.cpp's own branch of rules
# Types llama-quantize refuses to write without an importance matrix ("the result will be garbage").
NEED_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")


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


def get_mix(name: str, imatrix: bool = False) -> Mix:
    """The mix called ``name`` (case-insensitive; Q4_K means Q4_K_M), or a one-line error; ``imatrix``: the
    choices llama-quantize makes when it has an importance matrix."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in MIXES:
        raise LowbitError(f"unknown GGUF type {name!r}; choose one of {', '.join(MIXES)}")
    return replace(MIXES[key], imatrix=imatrix)


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
    """llama_tensor_get_type_impl for a dense model (``mix.imatrix``: llama-quantize was given an imatrix)."""
    new, cat, m = mix.default, _category(role.name), mix.name
    i, n, gqa4 = role.layer or 0, role.n_layers, role.n_gqa >= 4
    if cat == "output" or (cat == "token_embd" and role.tied_embeddings):
        if role.ne0 % block_size(new) != 0:
            return "Q8_0"
        return new if new == "Q8_0" else "Q5_K" if m in (*LOW_BIT_MIXES, "IQ3_XXS") else "Q6_K"
    if cat == "token_embd":
        return {**dict.fromkeys(("TQ1_0", "TQ2_0"), "Q4_K"), **dict.fromkeys(("IQ2_S", "IQ2_M", "IQ3_XXS"), "IQ3_S"),
                **dict.fromkeys(("IQ2_XXS", "IQ2_XS", *IQ1_MIXES), "Q2_K")}.get(m, new)
    if m in LOW_BIT_MIXES:
        wider = "IQ3_S" if m in ("IQ2_S", "IQ2_M") else "Q2_K"  # what attn_v and the first ffn_down layers get
        if cat == "attn_v":
            return "Q4_K" if gqa4 else wider
        if cat == "ffn_down":
            return wider if i < n // 8 else new
        if cat == "attn_output":
            return "IQ2_XXS" if m in IQ1_MIXES else "IQ3_S" if m in ("IQ2_S", "IQ2_M") else new
        return new
    if cat == "attn_v":
        rules = {"Q2_K": "Q4_K" if gqa4 else "Q3_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K",
                 "Q3_K_L": "Q5_K", "Q4_K_S": "Q5_K" if i < 4 else new,
                 **dict.fromkeys(IQ4_MIXES, "Q5_K" if gqa4 else new),
                 **dict.fromkeys(IQ3_MIXES, "Q4_K" if gqa4 else new), "IQ3_M": "Q4_K",
                 "IQ3_XXS": "Q4_K" if gqa4 else "IQ3_XXS" if mix.imatrix else "IQ3_S"}
        if m in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if _more_bits(i, n) else new
        return rules.get(m, new)
    if cat == "ffn_down":
        first = i < n // 8
        rules = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K", "Q3_K_L": "Q5_K",
                 "Q4_K_S": "Q5_K" if first else new, "IQ3_M": "Q4_K" if first else new}
        if mix.imatrix:
            rules.update({"Q4_0": "Q4_1" if first else new, "Q5_0": "Q5_1" if first else new})
        else:
            rules.update({**dict.fromkeys(IQ4_MIXES, "Q5_K" if first else new), "IQ3_XXS": "Q4_K" if first else "Q3_K"})
        if m in ("Q4_K_M", "Q5_K_M"):
            return "Q6_K" if _more_bits(i, n) else new
        return rules.get(m, new)
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(m, new)
    if cat in ("attn_k", "attn_q") and m in ("IQ3_XS", "IQ3_XXS"):
        return "IQ3_XXS" if m == "IQ3_XS" else "IQ2_S"
    if m == "IQ3_XS" and cat in ("ffn_gate", "ffn_up") and n // 8 <= i < 7 * n // 8:
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
