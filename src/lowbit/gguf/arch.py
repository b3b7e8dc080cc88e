"""Model architectures the GGUF exporter knows: hyper-parameter keys, tensor names and llama.cpp layouts.

One entry per transformers architecture class name; adding a model family means adding an entry here
(its gguf ``MODEL_ARCH``, how its config maps to ``<arch>.*`` keys, and any row permutation llama.cpp expects).
Tensor names come from the gguf package's own HF -> GGUF name map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, get_tensor_name_map

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class HParams:
    """The numbers llama.cpp needs for a Llama-style decoder."""

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation: per head, interleaved rotary halves -> llama.cpp's order."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise LowbitError(f"RoPE scaling {kind!r} is not supported by the GGUF exporter yet; use a model without it")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def llama_hparams(config: Any) -> HParams:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return HParams(
        n_layers=config.num_hidden_layers, n_embd=config.hidden_size, n_ff=config.intermediate_size,
        n_head=config.num_attention_heads, n_head_kv=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim, n_ctx=config.max_position_embeddings, rope_theta=_rope_theta(config),
        rms_eps=float(config.rms_norm_eps), vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def llama_keys(arch: str, hp: HParams) -> list[tuple[str, str, Any]]:
    """(key, gguf value type name, value) for ``<arch>.*``, typed the way llama.cpp checks them."""
    u32 = "UINT32"
    return [(f"{arch}.context_length", u32, hp.n_ctx), (f"{arch}.embedding_length", u32, hp.n_embd),
            (f"{arch}.block_count", u32, hp.n_layers), (f"{arch}.feed_forward_length", u32, hp.n_ff),
            (f"{arch}.attention.head_count", u32, hp.n_head), (f"{arch}.attention.head_count_kv", u32, hp.n_head_kv),
            (f"{arch}.rope.dimension_count", u32, hp.head_dim), (f"{arch}.rope.freq_base", "FLOAT32", hp.rope_theta),
            (f"{arch}.attention.layer_norm_rms_epsilon", "FLOAT32", hp.rms_eps), (f"{arch}.vocab_size", u32, hp.vocab_size)]


def llama_transform(gguf_name: str, w: np.ndarray, hp: HParams) -> np.ndarray:
    """Re-apply llama.cpp's Q/K permutation (transformers undoes it when it reads a GGUF)."""
    if gguf_name.endswith("attn_q.weight"):
        return llama_permute(w, hp.n_head)
    if gguf_name.endswith("attn_k.weight"):
        return llama_permute(w, hp.n_head_kv)
    return w


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture becomes a GGUF."""

    gguf_arch: MODEL_ARCH
    hparams: Callable[[Any], HParams]
    keys: Callable[[str, HParams], list[tuple[str, str, Any]]]
    transform: Callable[[str, np.ndarray, HParams], np.ndarray]

    @property
    def name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]

    def tensor_name(self, hf_name: str, n_layers: int) -> str | None:
        """The GGUF name of a state-dict entry, or None for entries llama.cpp does not store (rotary caches)."""
        mapped = get_tensor_name_map(self.gguf_arch, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return mapped


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(MODEL_ARCH.LLAMA, llama_hparams, llama_keys, llama_transform),
}


def get_architecture(model: Any) -> Architecture:
    """The exporter entry for a transformers model, or a one-line error naming the supported ones."""
    config = model.config
    names = [type(model).__name__] + list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(config, "model_type", "?")
    raise LowbitError(f"GGUF export does not support architecture {names[0]} ({model_type}) yet; "
                      f"supported: {', '.join(ARCHITECTURES)}")


def layer_of(gguf_name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(m.group(1)) if m else None
