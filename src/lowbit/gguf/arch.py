"""How a decoder of a known family becomes a llama.cpp GGUF: hyper-parameter keys, tensor names and layouts.

The family comes from lowbit's architecture table (``lowbit.arch.family_of``); its ``gguf_arch`` names the
``gguf.MODEL_ARCH`` llama.cpp runs it as. Per MODEL_ARCH, ``RULES`` holds, as data, which ``<arch>.*`` keys
llama.cpp reads (key names from gguf-py's ``Keys``), which tensors it re-lays out (Llama's Q/K row permutation),
whether it reads a separate output head, and what its graph does itself (Gemma's sqrt(hidden) embedding scale).
Tensor names come from gguf-py's own HF -> GGUF ``TensorNameMap``. What llama.cpp expects per architecture was
read from its ``convert_hf_to_gguf`` and ``src/models/*.cpp`` (the version bundled with llama-cpp-python 0.3.36).

Norms: transformers' Gemma norms compute ``x_hat * (1 + w)``, llama.cpp's ``x_hat * w``, so the family's
``norm_offset`` is added to every ``*_norm.weight`` (transformers' GGUF loader subtracts it again).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFValueType, Keys, get_tensor_name_map

from lowbit.arch import Family, require_family
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class HParams:
    """The numbers llama.cpp needs, read from a transformers config (None: the family has no such thing)."""

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    vocab_size: int
    tied_embeddings: bool
    rope_theta: float | None = None
    rope_theta_swa: float | None = None  # RoPE base of sliding-window layers (Gemma3's local base)
    rope_dim: int | None = None
    rope_linear: float | None = None  # linear RoPE scaling factor
    rms_eps: float | None = None
    norm_eps: float | None = None  # LayerNorm epsilon (GPT-2)
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] | None = None  # per layer: sliding-window attention?
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_scalar: float | None = None  # transformers' query_pre_attn_scalar (Gemma): scores use its -1/2 power

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


@dataclass(frozen=True)
class Key:
    """One ``<arch>.*`` key: gguf-py's name template, llama.cpp's value type, the HParams field that holds it."""

    template: str
    vtype: GGUFValueType
    field: str
    sub_type: GGUFValueType | None = None
    default: Any = None  # written when the field is None (llama.cpp's PHI3 reads sliding_window 0 as "none")


@dataclass(frozen=True)
class TensorRule:
    """``fn(w, hp)`` re-lays out every tensor whose GGUF name ends with one of ``suffixes``."""

    suffixes: tuple[str, ...]
    fn: Callable[[np.ndarray, HParams], np.ndarray]


@dataclass(frozen=True)
class ArchRules:
    """What one llama.cpp architecture reads. ``output``: "optional" (absent = tied to token_embd) or "tied"
    (llama.cpp always uses token_embd, so an untied head cannot be stored). ``embedding_scale``: the graph
    multiplies embeddings by sqrt(n_embd) itself. ``check``: returns a reason the model cannot be run as this
    architecture, or None."""

    keys: tuple[Key, ...]
    tensors: tuple[TensorRule, ...] = ()
    output: str = "optional"
    embedding_scale: bool = False
    check: Callable[[HParams], str | None] | None = None


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation: per head, interleaved rotary halves -> llama.cpp's order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gemma_query_scale(layers_27b: int) -> Callable[[HParams], str | None]:
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the 27B layer count;
    transformers by query_pre_attn_scalar^-1/2. A model where the two differ would run differently."""
    def check(hp: HParams) -> str | None:
        denom = hp.n_embd // hp.n_head if hp.n_layers == layers_27b else hp.head_dim
        if hp.query_scalar is not None and not math.isclose(hp.query_scalar, denom):
            return (f"query_pre_attn_scalar is {hp.query_scalar:g} but llama.cpp scales this model's queries "
                    f"by 1/sqrt({denom})")
        return None
    return check


U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
_L, _A, _R = Keys.LLM, Keys.Attention, Keys.Rope
_SIZES = (Key(_L.CONTEXT_LENGTH, U32, "n_ctx"), Key(_L.EMBEDDING_LENGTH, U32, "n_embd"),
          Key(_L.BLOCK_COUNT, U32, "n_layers"), Key(_L.FEED_FORWARD_LENGTH, U32, "n_ff"),
          Key(_A.HEAD_COUNT, U32, "n_head"), Key(_A.HEAD_COUNT_KV, U32, "n_head_kv"),
          Key(_L.VOCAB_SIZE, U32, "vocab_size"))
_HEAD = (Key(_A.KEY_LENGTH, U32, "head_dim"), Key(_A.VALUE_LENGTH, U32, "head_dim"))
_ROPE = (Key(_R.DIMENSION_COUNT, U32, "rope_dim"), Key(_R.FREQ_BASE, F32, "rope_theta"),
         Key(_R.SCALING_TYPE, STR, "rope_linear"), Key(_R.SCALING_FACTOR, F32, "rope_linear"))
_RMS = (Key(_A.LAYERNORM_RMS_EPS, F32, "rms_eps"),)
_SWA = (Key(_A.SLIDING_WINDOW, U32, "sliding_window"),
        Key(_A.SLIDING_WINDOW_PATTERN, GGUFValueType.ARRAY, "swa_layers", BOOL))
_QK_PERMUTE = (TensorRule(("attn_q.weight", "attn_q.bias"), lambda w, hp: llama_permute(w, hp.n_head)),
               TensorRule(("attn_k.weight", "attn_k.bias"), lambda w, hp: llama_permute(w, hp.n_head_kv)))

RULES: dict[MODEL_ARCH, ArchRules] = {
    MODEL_ARCH.LLAMA: ArchRules(_SIZES + _HEAD + _ROPE + _RMS, _QK_PERMUTE),
    MODEL_ARCH.QWEN2: ArchRules(_SIZES + _HEAD + _ROPE + _RMS),
    MODEL_ARCH.QWEN3: ArchRules(_SIZES + _HEAD + _ROPE + _RMS),
    MODEL_ARCH.GEMMA2: ArchRules(
        _SIZES + _HEAD + _ROPE + _RMS + _SWA + (Key(_L.ATTN_LOGIT_SOFTCAPPING, F32, "attn_softcap"),
                                                 Key(_L.FINAL_LOGIT_SOFTCAPPING, F32, "final_softcap")),
        output="tied", embedding_scale=True, check=_gemma_query_scale(46)),
    MODEL_ARCH.GEMMA3: ArchRules(
        _SIZES + _HEAD + _ROPE + _RMS + _SWA + (Key(_R.FREQ_BASE_SWA, F32, "rope_theta_swa"),
                                                 Key(_L.FINAL_LOGIT_SOFTCAPPING, F32, "final_softcap")),
        embedding_scale=True, check=_gemma_query_scale(62)),
    MODEL_ARCH.PHI3: ArchRules(_SIZES + _ROPE + _RMS + (Key(_A.SLIDING_WINDOW, U32, "sliding_window", default=0),)),
    MODEL_ARCH.GPT2: ArchRules(_SIZES + (Key(_A.LAYERNORM_EPS, F32, "norm_eps"),)),
}


def _rope(config: Any) -> tuple[float | None, float | None, float | None]:
    """(base, sliding-window base, linear scaling factor) from ``rope_parameters`` / ``rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        params = {"rope_theta": getattr(config, "rope_theta", None), "rope_type": "default"}
    full, local = params.get("full_attention", params), params.get("sliding_attention")
    factor = None
    for part in (full, local or {}):
        kind = part.get("rope_type") or "default"
        if kind == "linear" and part is full and part.get("factor"):
            factor = float(part["factor"])
        elif kind != "default":
            raise LowbitError(f"RoPE scaling {kind!r} is not supported by the GGUF exporter yet; "
                              "use a model without it")
    theta = full.get("rope_theta", getattr(config, "rope_theta", None))
    swa = local.get("rope_theta") if local else None
    return (float(theta) if theta is not None else None, float(swa) if swa is not None else None, factor)


def read_hparams(config: Any) -> HParams:
    """Every number any architecture in ``RULES`` may need, from a transformers config."""
    n_embd, n_head = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or n_embd // n_head
    rope_theta, rope_swa, rope_linear = _rope(config)
    rotary = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor") \
        or getattr(config, "partial_rotary_factor", None) or 1.0
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    swa = tuple(t == "sliding_attention" for t in layer_types) if layer_types and window else None
    return HParams(
        n_layers=config.num_hidden_layers, n_embd=n_embd, n_head=n_head,
        n_ff=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * n_embd,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head, head_dim=head_dim,
        n_ctx=config.max_position_embeddings, vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_theta=rope_theta, rope_theta_swa=rope_swa, rope_linear=rope_linear,
        rope_dim=int(head_dim * rotary) if rope_theta is not None else None,
        rms_eps=_float(getattr(config, "rms_norm_eps", None)), norm_eps=_float(getattr(config, "layer_norm_epsilon", None)),
        sliding_window=window,
        swa_layers=swa, attn_softcap=_float(getattr(config, "attn_logit_softcapping", None)),
        final_softcap=_float(getattr(config, "final_logit_softcapping", None)),
        query_scalar=_float(getattr(config, "query_pre_attn_scalar", None)),
    )


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


@dataclass(frozen=True)
class Architecture:
    """One family as one llama.cpp architecture: its table entry, MODEL_ARCH and rules."""

    family: Family
    gguf_arch: MODEL_ARCH
    rules: ArchRules

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    def hparams(self, config: Any) -> HParams:
        """The config's numbers, or a one-line error where llama.cpp would run this model differently."""
        hp = read_hparams(config)
        if self.rules.output == "tied" and not hp.tied_embeddings:
            raise LowbitError(f"llama.cpp's {self.name} always uses the token embeddings as output head; "
                              "this model has a separate lm_head, which a GGUF cannot hold")
        problem = self.rules.check(hp) if self.rules.check else None
        if problem:
            raise LowbitError(f"GGUF export of this {self.family.name} model: {problem}")
        return hp

    def metadata(self, hp: HParams) -> list[tuple[str, GGUFValueType, Any, GGUFValueType | None]]:
        """(key, value type, value, array element type) for ``<arch>.*``, typed the way llama.cpp checks them."""
        out = []
        for key in self.rules.keys:
            value = getattr(hp, key.field)
            value = key.default if value is None else value
            if value is None:
                continue
            if key.template == Keys.Rope.SCALING_TYPE:
                value = "linear"
            elif key.sub_type is not None:
                value = [bool(v) for v in value]
            out.append((key.template.format(arch=self.name), key.vtype, value, key.sub_type))
        return out

    def transform(self, gguf_name: str, w: np.ndarray, hp: HParams) -> np.ndarray:
        """The tensor as llama.cpp lays it out: norm offset folded in, then the architecture's re-layouts."""
        if self.family.norm_offset and gguf_name.endswith("_norm.weight"):
            w = w + np.float32(self.family.norm_offset)
        for rule in self.rules.tensors:
            if gguf_name.endswith(rule.suffixes):
                w = rule.fn(w, hp)
        return w

    def tensor_name(self, hf_name: str, n_layers: int) -> str | None:
        """The GGUF name of a state-dict entry (gguf-py's name map), or None where it has none."""
        return get_tensor_name_map(self.gguf_arch, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def get_architecture(model: Any) -> Architecture:
    """The exporter entry for a transformers model (through lowbit's family table), or a one-line error."""
    family = require_family(model, "GGUF export")
    arch = MODEL_ARCH[family.gguf_arch] if family.gguf_arch else None
    if arch not in RULES:
        known = ", ".join(sorted(MODEL_ARCH_NAMES[a] for a in RULES))
        raise LowbitError(f"GGUF export does not support the {family.name} family "
                          f"(llama.cpp architecture {family.gguf_arch or 'none'}) yet; supported: {known}")
    rules = RULES[arch]
    if rules.embedding_scale != family.embedding_scale:
        raise LowbitError(f"the {family.name} family {'scales' if family.embedding_scale else 'does not scale'} "
                          f"its embeddings but llama.cpp's {MODEL_ARCH_NAMES[arch]} does not match; cannot export")
    return Architecture(family, arch, rules)


def layer_of(gguf_name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(m.group(1)) if m else None
