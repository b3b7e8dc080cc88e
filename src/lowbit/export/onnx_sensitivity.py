"""Which linears need per-token activation scales: measured, one linear at a time, on calibration sentences.

Per-tensor scales run fastest in onnxruntime (one fused integer kernel) but one outlier anywhere in the
batch coarsens the grid for every token. For each linear, the float model is run with only that linear's
input quantized per tensor; the loss is 1 - mean cosine of the mean-pooled embeddings to the float ones.
The linears with the largest losses get per-token scales. The sentences must not be the evaluation ones.

Before that, SmoothQuant's per-channel input scaling (``lowbit.transforms.input_smoothing``) is measured the
same way for every linear that reads its input alone (linears sharing an input would each need their own
scaled copy, and lose their shared quantization): a linear is smoothed when that at least halves its loss
and the saving is at least 1% of the summed losses of all linears, because the explicit scaling costs a Mul
in the graph and a smaller gain does not pay for it. (On MiniLM this picks the intermediate dense of layers
0-4, loss 4-9x smaller; not the attention output denses, whose losses are ~100x smaller to begin with, and no
output dense: scaling a GELU output's channels made its per-tensor loss 2-5x larger.)
"""

from __future__ import annotations

from torch import nn

from lowbit.eval.encoder import compare_embeddings, embed
import torch

from lowbit.formats.activation import ActivationSpec
from lowbit.model.act_quant import attach_input_quantizer, detach_input_quantizer
from lowbit.transforms.input_smoothing import (DEFAULT_ALPHA, attach_input_smoothing, detach_input_smoothing,
                                               linear_smoothing_scales)

SMOOTHING_GAIN = 0.5  # smooth a linear when its per-tensor loss falls to at most this fraction
SMOOTHING_SHARE = 0.01  # ... and the loss it saves is at least this share of the summed losses of all linears


def per_tensor_losses(model: nn.Module, tokenizer, sentences: list[str], linears: list[str],
                      spec: ActivationSpec, batch_size: int = 32, reference=None) -> dict[str, float]:
    """Linear name -> embedding cosine loss when only its input is quantized by ``spec`` (``reference``: the
    float model's embeddings of the sentences, if already computed)."""
    modules = dict(model.named_modules())
    if reference is None:
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



@torch.inference_mode()
def input_ranges(model: nn.Module, tokenizer, sentences: list[str], linears: list[str],
                 batch_size: int = 32) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Per linear: max |x| per input channel over the sentences' tokens; and the groups of linears that read
    the same input tensor (seen in the first batch), in model order."""
    modules = dict(model.named_modules())
    ranges: dict[str, torch.Tensor] = {}
    readers: dict[int, list[str]] = {}
    held: list[torch.Tensor] = []  # the first batch's inputs stay alive, so that no id is reused for another
    first = [True]

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0]
            if first[0]:
                readers.setdefault(id(x), []).append(name)
                held.append(x)
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
            ranges[name] = torch.maximum(ranges[name], peak) if name in ranges else peak
        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in linears]
    try:
        for i in range(0, len(sentences), batch_size):
            embed(model, tokenizer, sentences[i:i + batch_size], batch_size=batch_size, progress=False)
            first[0] = False
            held.clear()
    finally:
        for handle in handles:
            handle.remove()
    return ranges, list(readers.values())


def choose_smoothing(model: nn.Module, tokenizer, sentences: list[str], linears: list[str], spec: ActivationSpec,
                     losses: dict[str, float], alpha: float = DEFAULT_ALPHA
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(linear name -> smoothing scales, for the linears that read their input alone and whose per-tensor loss
    ``losses[name]`` (measured without smoothing) smoothing at least halves, saving at least ``SMOOTHING_SHARE``
    of the summed losses; the losses with those linears smoothed). Leaves the model as it was, bit for bit."""
    modules = dict(model.named_modules())
    least_saving = SMOOTHING_SHARE * sum(max(loss, 0.0) for loss in losses.values())
    ranges, groups = input_ranges(model, tokenizer, sentences, linears)
    reference = embed(model, tokenizer, sentences, progress=False)
    chosen, after = {}, dict(losses)
    for name in (group[0] for group in groups if len(group) == 1):
        if losses[name] < least_saving or losses[name] <= 0:
            continue  # even removing this loss would save too little
        linear = modules[name]
        scales = linear_smoothing_scales(linear, ranges[name], alpha)
        weight = linear.weight.detach().clone()
        attach_input_smoothing(linear, scales)
        try:
            smoothed = per_tensor_losses(model, tokenizer, sentences, [name], spec, reference=reference)[name]
        finally:
            detach_input_smoothing(linear)
            with torch.no_grad():
                linear.weight.copy_(weight)
        if smoothed <= SMOOTHING_GAIN * losses[name] and losses[name] - smoothed >= least_saving:
            chosen[name], after[name] = scales, smoothed
    return chosen, after
