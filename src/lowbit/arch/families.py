"""The table of model families lowbit knows, keyed by transformers' ``config.model_type``.

Per family:
- ``blocks``: dotted paths (relative to the loaded model) where the repeated blocks may live;
- ``scale_pairs``: a producer (norm or linear, names relative to one block) whose output channels feed only
  the listed consumer linears, so a per-channel scale can move from the consumers' input columns into the
  producer (AWQ, SmoothQuant) without changing the float model. Only pairs where that is exact are listed:
  Gemma's ``post_attention_layernorm`` normalizes the attention *output* (its MLP reads
  ``pre_feedforward_layernorm``); BERT's post-norm LayerNorms also feed the residual, so only value -> output
  is exact there; Phi-3's fused ``qkv_proj`` -> ``o_proj`` and ``gate_up_proj`` -> ``down_proj`` would need
  row slices of the producer and are left out;
- ``norm_offset``: norms compute ``x_hat * (norm_offset + weight)`` (Gemma: 1);
- ``transposed_linear``: the projections are transformers ``Conv1D`` ([in, out] weights; GPT-2), which lowbit
  turns into ``nn.Linear`` when it loads the model (``lowbit.model.conv1d``);
- ``gguf_arch``: the ``gguf.MODEL_ARCH`` member llama.cpp knows this family as (None: no GGUF export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ScalePair:
    """``producer``'s output channels feed every module in ``consumers`` and nothing else."""

    producer: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """What lowbit needs to know about one model family."""

    name: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]
    scale_pairs: tuple[ScalePair, ...]
    norm_offset: float = 0.0
    embedding_scale: bool = False  # embeddings multiplied by sqrt(hidden) inside the model (Gemma)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma3)
    fused: tuple[str, ...] = ()  # fused projections, named relative to a block
    transposed_linear: bool = False
    encoder: bool = False
    gguf_arch: str | None = None


_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_DECODER = ("model.layers", "model.language_model.layers")
_LLAMA_PAIRS = (
    ScalePair("input_layernorm", _ATTN_IN),
    ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalePair("post_attention_layernorm", _MLP_IN),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
)
_GEMMA_PAIRS = (
    ScalePair("input_layernorm", _ATTN_IN),
    ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),
    ScalePair("pre_feedforward_layernorm", _MLP_IN),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
)
_BERT_PAIRS = (ScalePair("attention.self.value", ("attention.output.dense",)),)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _DECODER, _LLAMA_PAIRS, gguf_arch="LLAMA"),
    Family("mistral", ("mistral",), _DECODER, _LLAMA_PAIRS, gguf_arch="LLAMA"),
    Family("qwen2", ("qwen2",), _DECODER, _LLAMA_PAIRS, gguf_arch="QWEN2"),
    Family("qwen3", ("qwen3",), _DECODER, _LLAMA_PAIRS, qk_norm=True, gguf_arch="QWEN3"),
    Family("gemma2", ("gemma2",), _DECODER, _GEMMA_PAIRS, norm_offset=1.0, embedding_scale=True,
           gguf_arch="GEMMA2"),
    Family("gemma3", ("gemma3_text", "gemma3"), _DECODER, _GEMMA_PAIRS, norm_offset=1.0, embedding_scale=True,
           qk_norm=True, gguf_arch="GEMMA3"),
    Family("phi3", ("phi3",), _DECODER,
           (ScalePair("input_layernorm", ("self_attn.qkv_proj",)),
            ScalePair("post_attention_layernorm", ("mlp.gate_up_proj",))),
           fused=("self_attn.qkv_proj", "mlp.gate_up_proj"), gguf_arch="PHI3"),
    Family("gpt2", ("gpt2",), ("transformer.h", "h"),
           (ScalePair("ln_1", ("attn.c_attn",)), ScalePair("ln_2", ("mlp.c_fc",))),
           fused=("attn.c_attn",), transposed_linear=True, gguf_arch="GPT2"),
    Family("bert", ("bert",), ("encoder.layer", "bert.encoder.layer"), _BERT_PAIRS, encoder=True,
           gguf_arch="BERT"),
    Family("xlm-roberta", ("xlm-roberta",), ("encoder.layer", "roberta.encoder.layer"), _BERT_PAIRS, encoder=True,
           gguf_arch="BERT"),
)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def _config(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def family_of(model_or_config: Any) -> Family | None:
    """The table entry for a transformers model (or config), or None for a family not in the table."""
    return _BY_MODEL_TYPE.get(getattr(_config(model_or_config), "model_type", None))


def require_family(model_or_config: Any, what: str) -> Family:
    """The table entry, or a one-line error saying that ``what`` needs one and which families have one."""
    family = family_of(model_or_config)
    if family is None:
        model_type = getattr(_config(model_or_config), "model_type", "?")
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise LowbitError(f"{what} needs an architecture-table entry for model type {model_type!r} "
                          f"(lowbit.arch.families); known: {known}. RTN and GPTQ work on any model")
    return family
