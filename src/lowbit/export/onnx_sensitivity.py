"""Which linears need per-token activation scales: measured, one linear at a time, on calibration sentences.

Per-tensor scales run fastest in onnxruntime (one fused integer kernel) but one outlier anywhere in the
batch coarsens the grid for every token. For each linear, the float model is run with only that linear's
input quantized per tensor; the loss is 1 - mean cosine of the mean-pooled embeddings to the float ones.
The linears with the largest losses get per-token scales. The sentences must not be the evaluation ones.
"""

from __future__ import annotations

from torch import nn

from lowbit.eval.encoder import compare_embeddings, embed
from lowbit.formats.activation import ActivationSpec
from lowbit.model.act_quant import attach_input_quantizer, detach_input_quantizer


def per_tensor_losses(model: nn.Module, tokenizer, sentences: list[str], linears: list[str],
                      spec: ActivationSpec, batch_size: int = 32) -> dict[str, float]:
    """Linear name -> embedding cosine loss when only its input is quantized by ``spec``."""
    modules = dict(model.named_modules())
    reference = embed(model, tokenizer, sentences, batch_size=batch_size, progress=False)
    losses = {}
    for name in linears:
        attach_input_quantizer(modules[name], spec)
        try:
            quantized = embed(model, tokenizer, sentences, batch_size=batch_size, progress=False)
        finally:
            detach_input_quantizer(modules[name])
        losses[name] = 1.0 - compare_embeddings(reference, quantized)["cosine"]
    return losses


def most_sensitive(losses: dict[str, float], count: int) -> list[str]:
    """The ``count`` names with the largest losses, in model order."""
    chosen = set(sorted(losses, key=losses.get, reverse=True)[:max(count, 0)])
    return [name for name in losses if name in chosen]


def linear_names(model: nn.Module, recipe) -> list[str]:
    """The Linear modules the recipe quantizes with an input spec."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and recipe.input_spec_for(name, module) is not None]

