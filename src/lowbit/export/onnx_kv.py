"""Trace a causal LM into ONNX with a KV cache, in the layout optimum and onnxruntime-genai use.

Inputs: ``input_ids`` int64 [batch, sequence], ``attention_mask`` int64 [batch, past + sequence] (1 = a real
token; a row's slots in order, the new tokens last), ``position_ids`` int64 [batch, sequence] and, per layer i,
``past_key_values.{i}.key`` / ``.value`` float32 [batch, kv_heads, past, head_dim]. Outputs: ``logits``
float32 [batch, sequence, vocab] and ``present.{i}.key`` / ``.value`` [batch, kv_heads, past + sequence,
head_dim], which are the next call's past. The past length is dynamic and may be 0 (whole-window
evaluation); a call may add one token (decoding) or many (a prompt).

The graph is traced from the transformers model itself (TorchScript exporter, eager attention, as
``onnx_trace`` does for the graph without a cache), with the past handed to it as a ``DynamicCache``, so
every ``nn.Linear`` is still one MatMul with a constant weight and the quantizing rewrites
(``onnx_lower``: MatMulNBits, int8 kernels, QDQ) apply to this graph unchanged. The causal mask is built
in the graph from ``attention_mask`` (query slot ``past + j`` sees key slots up to itself that the mask
keeps) and handed to the model as a ready 4-D additive mask, so transformers' own mask code, whose shape
arithmetic the tracer would freeze at the sample's sizes, is not traced. Sliding-window attention is not
modelled: a model whose window is shorter than its context is refused here, and ``onnx_trace.trace_lm``
writes its graph without a cache instead (exact for it).
"""

from __future__ import annotations

import inspect
import io
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.onnx_trace import DEFAULT_OPSET, LOGITS_OUTPUT, eager_attention, input_quantizers_paused

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
_SAMPLE_PAST, _SAMPLE_NEW = 3, 2  # the traced call: 3 cached tokens, 2 new ones (both axes stay dynamic)


@dataclass(frozen=True)
class KvLayout:
    """The cache of one model: ``layers`` pairs of key/value tensors [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int

    def past_names(self) -> list[str]:
        """past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ..."""
        return [name.format(i) for i in range(self.layers) for name in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        """present.0.key, present.0.value, present.1.key, ..."""
        return [name.format(i) for i in range(self.layers) for name in (PRESENT_KEY, PRESENT_VALUE)]

    def input_names(self) -> list[str]:
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.past_names()]

    def output_names(self) -> list[str]:
        return [LOGITS_OUTPUT, *self.present_names()]


def additive_causal_mask(attention_mask: torch.Tensor, sequence: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, sequence, past + sequence]: 0 where query ``j`` (slot ``past + j``) may attend a key slot
    (at or before its own, kept by ``attention_mask``), the dtype's lowest value elsewhere."""
    total = attention_mask.shape[1]
    key_slots = torch.arange(total, device=attention_mask.device)
    query_slots = torch.arange(sequence, device=attention_mask.device) + (total - sequence)
    allowed = (key_slots[None, :] <= query_slots[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class CausalLMWithCache(nn.Module):
    """``model`` as a function of flat tensors: (input_ids, attention_mask, position_ids, k0, v0, k1, ...) ->
    (logits, present k0, present v0, ...)."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers
        self._cache_arg = cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = additive_causal_mask(attention_mask, input_ids.shape[1], dtype)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self._cache_arg: cache})
        present = [t for layer in getattr(out, self._cache_arg).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_argument(model: nn.Module) -> str:
    """The name of the forward argument (and output field) that holds the cache: transformers 5 calls it
    ``cache``, older versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sliding_window(config) -> int | None:
    """The attention window of a model that uses one (None when every layer attends to the whole past)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _cache_shapes(model: nn.Module) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """Per layer, the (key shape, value shape) of the cache one forward pass on two tokens fills, or None when
    the model keeps no per-layer keys and values."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = getattr(getattr(out, cache_argument(model), None), "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in layers]


def kv_unsupported(model: nn.Module) -> str | None:
    """Why the KV-cache graph cannot represent ``model`` (None when it can): a sliding window shorter than the
    context, no per-layer key/value cache, or caches of mixed or unusual shapes."""
    config = model.config
    name = type(model).__name__
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 0
    window = _sliding_window(config)
    if window is not None and window < context:
        return f"{name} uses sliding-window attention (window {window} < context {context})"
    with eager_attention(model):
        shapes = _cache_shapes(model)
    if shapes is None:
        return f"{name} keeps no per-layer key/value cache"
    if len(set(shapes)) != 1:
        return f"{name}'s layers cache keys/values of different shapes"
    key_shape, value_shape = shapes[0]
    if key_shape != value_shape or len(key_shape) != 4:
        return f"{name}'s cache is not keys and values of one [batch, heads, length, head_dim] shape"
    return None


def kv_layout(model: nn.Module) -> KvLayout:
    """The model's cache layout, read from a real cache; a model the KV graph cannot represent is refused."""
    reason = kv_unsupported(model)
    if reason is not None:
        raise LowbitError(f"{reason}, which the KV-cache ONNX graph does not model; export it without a cache "
                          "(--no-kv-cache)")
    with eager_attention(model):
        shapes = _cache_shapes(model) or []
    key_shape = shapes[0][0]
    return KvLayout(len(shapes), int(key_shape[1]), int(key_shape[3]))


def has_kv_cache(proto) -> bool:
    """Whether an ONNX graph takes a past (``past_key_values.N.key`` inputs)."""
    return any(i.name == PAST_KEY.format(0) for i in proto.graph.input)


def _dynamic_axes(layout: KvLayout) -> dict[str, dict[int, str]]:
    axes = {INPUT_IDS: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
            POSITION_IDS: {0: "batch", 1: "sequence"}, LOGITS_OUTPUT: {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in layout.past_names()})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in layout.present_names()})
    return axes


def trace_causal_lm_kv(model: nn.Module, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of a causal LM with a KV cache (float; simulated quantizers ignored)."""
    import onnx

    if opset < 17:
        raise LowbitError(f"ONNX export needs opset 17 or newer, got {opset}")
    with input_quantizers_paused(model), eager_attention(model):
        layout = kv_layout(model)
        vocab = max(2, int(model.config.vocab_size))
        prefix = torch.arange(1, _SAMPLE_PAST + 1).reshape(1, -1).repeat(2, 1) % vocab
        with torch.no_grad():
            cached = getattr(model(input_ids=prefix, use_cache=True), cache_argument(model))
        past = [t.clone() for layer in cached.layers for t in (layer.keys, layer.values)]
        total = _SAMPLE_PAST + _SAMPLE_NEW
        args = (torch.tensor([[7, 11], [13, 17]]) % vocab, torch.ones(2, total, dtype=torch.long),
                torch.arange(_SAMPLE_PAST, total).reshape(1, -1).repeat(2, 1), *past)
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(CausalLMWithCache(model, layout.layers).eval(), args, buffer, dynamo=False,
                              opset_version=opset, input_names=layout.input_names(),
                              output_names=layout.output_names(), dynamic_axes=_dynamic_axes(layout),
                              do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())
