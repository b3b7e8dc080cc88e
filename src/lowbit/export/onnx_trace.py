"""Trace a float model into ONNX: an encoder with one mean-pooled sentence embedding output, or a causal
LM with ``input_ids`` in and ``logits`` out (the whole window, no KV cache; ``onnx_kv`` traces the graph
with a cache that lowbit writes for causal LMs by default, and ``trace_lm`` picks one of the two).

Mean pooling (attention-masked, as ``lowbit.eval.encoder.embed`` computes it) sits inside the graph, so
an engine's output compares directly with ours. The TorchScript exporter (``dynamo=False``) is used: it
needs no onnxscript and keeps every ``nn.Linear`` as one MatMul with a constant weight, followed by an Add
of a constant bias, which is the pattern the quantizing rewrites look for. Attention is traced in its
eager form (softmax of masked scores): the SDPA form adds NaN guards (IsNaN/Where) that cost ~10% of the
run time in onnxruntime and would slow every variant of the graph alike.
"""

from __future__ import annotations

import contextlib
import io
import inspect
import warnings
from typing import Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.act_quant import InputQuantizer, attach_input_quantizer, input_quantizers

EMBEDDING_OUTPUT = "embedding"
LOGITS_OUTPUT = "logits"
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_OPSET = 21


class MeanPooledEncoder(nn.Module):
    """``model``'s last hidden state averaged over the unmasked tokens: (batch, hidden) float32."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        hidden = self.model(**kwargs).last_hidden_state
        mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class LogitsOnly(nn.Module):
    """``model``'s next-token logits for every position of ``input_ids`` (batch, sequence, vocab).

    The all-ones attention mask is built inside the graph: without one, transformers probes position ids
    for packed sequences with ``torch.diff``, which has no ONNX form.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def encoder_input_names(model: nn.Module, tokenizer) -> tuple[str, ...]:
    """The graph inputs: input_ids, attention_mask, and token_type_ids when both model and tokenizer use it."""
    accepted = set(inspect.signature(model.forward).parameters)
    tokenizer_names = set(getattr(tokenizer, "model_input_names", ENCODER_INPUTS))
    names = tuple(n for n in ENCODER_INPUTS if n in accepted and (n in tokenizer_names or n != "token_type_ids"))
    if "input_ids" not in names or "attention_mask" not in names:
        raise LowbitError(f"{type(model).__name__} does not take input_ids and attention_mask; cannot export it as an encoder")
    return names


@contextlib.contextmanager
def input_quantizers_paused(model: nn.Module) -> Iterator[dict[str, InputQuantizer]]:
    """Detach the simulated activation quantizers (so they are not traced) and re-attach them afterwards."""
    paused = input_quantizers(model)
    modules = dict(model.named_modules())
    for quantizer in paused.values():
        quantizer._handle.remove()
        quantizer._handle = None
    try:
        yield paused
    finally:
        for name, quantizer in paused.items():
            attach_input_quantizer(modules[name], quantizer.spec, quantizer.scale)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a transformers model to eager attention for the duration of the block."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = config is not None and hasattr(model, "set_attn_implementation") and before != "eager"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def trace_encoder(model: nn.Module, tokenizer, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of ``model`` (float; simulated quantizers ignored) with a mean-pooled output."""
    import onnx

    if opset < 17:
        raise LowbitError(f"ONNX export needs opset 17 or newer (LayerNormalization), got {opset}")
    names = encoder_input_names(model, tokenizer)
    sample = tokenizer(["a short sentence", "and a slightly longer second sentence"], padding=True,
                       return_tensors="pt")
    args = tuple(sample[n] if n in sample else torch.zeros_like(sample["input_ids"]) for n in names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic[EMBEDDING_OUTPUT] = {0: "batch"}
    buffer = io.BytesIO()
    with input_quantizers_paused(model), eager_attention(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MeanPooledEncoder(model, names).eval(), args, buffer, dynamo=False, opset_version=opset,
                          input_names=list(names), output_names=[EMBEDDING_OUTPUT], dynamic_axes=dynamic,
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def trace_causal_lm(model: nn.Module, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of a causal LM (float; simulated quantizers ignored): input_ids -> logits."""
    import onnx

    if opset < 17:
        raise LowbitError(f"ONNX export needs opset 17 or newer, got {opset}")
    sample = torch.arange(16, dtype=torch.long).reshape(2, 8) % max(2, int(model.config.vocab_size))
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, LOGITS_OUTPUT: {0: "batch", 1: "sequence"}}
    buffer = io.BytesIO()
    with input_quantizers_paused(model), eager_attention(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model).eval(), (sample,), buffer, dynamo=False, opset_version=opset,
                          input_names=["input_ids"], output_names=[LOGITS_OUTPUT], dynamic_axes=dynamic,
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def trace_lm(model: nn.Module, opset: int = DEFAULT_OPSET, kv_cache: bool = True):
    """A causal LM's graph: with a KV cache (``onnx_kv``) when ``kv_cache`` and the KV graph can represent the
    model, else the whole-window graph (sliding-window families such as Gemma 2/3 get the latter: it is exact
    for them, the KV graph would not be). ``lowbit.export.onnx_kv.has_kv_cache`` tells which was written."""
    if kv_cache:
        from lowbit.export.onnx_kv import kv_unsupported, trace_causal_lm_kv

        if kv_unsupported(model) is None:
            return trace_causal_lm_kv(model, opset)
    return trace_causal_lm(model, opset)
