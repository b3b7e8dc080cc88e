"""Guards against NaN/Inf: a model that computes them is never written, evaluated or reported as a result.

A quantization bug (or a float tensor cast out of its dtype's range) can produce a model whose outputs are
all NaN; its evaluation then reads PPL NaN, KLD NaN, top-1 0 and looks like a (bad) result. These checks turn
that into one-line ``LowbitError`` that names what went wrong first:

- every QTensor part (codes, scales, zero points, global scale) and every float tensor to be written is finite;
- one forward pass of the quantized model on a probe window is finite, and if not, the first module (in
  forward order: forward hooks fire as each module finishes) whose output holds NaN/Inf is named;
- evaluation metrics are finite.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor

PROBE_TOKENS = 128  # tokens of the probe window (LM) / max tokens per probe sentence (encoder)
PROBE_SENTENCES = 4


def nonfinite_count(value: Any) -> int:
    """Number of NaN/Inf elements in the floating tensors inside ``value`` (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.is_meta:
            return 0
        if value.element_size() > 1 and value.numel() and bool(torch.isfinite(value.sum(dtype=torch.float32))):
            return 0  # one reduction: any NaN/Inf makes the sum NaN/Inf (a finite overflow falls through to counting)
        # slices of 16M elements bound the temporaries (float8 scales: isfinite has no float8 kernels)
        return sum(int((~torch.isfinite(part.float() if part.element_size() == 1 else part)).sum())
                   for part in value.reshape(-1).split(1 << 24))
    if isinstance(value, Mapping):
        return sum(nonfinite_count(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nonfinite_count(v) for v in value)
    return 0


def check_qtensors(qtensors: Mapping[str, QTensor]) -> None:
    """Refuse a quantized weight whose codes, scales, zero points or global scale hold NaN/Inf."""
    for name, qt in qtensors.items():
        for part in ("codes", "scales", "zeros", "global_scale"):
            bad = nonfinite_count(getattr(qt, part))
            if bad:
                raise LowbitError(f"quantizing {name} gave {bad} NaN/Inf {part}; nothing was written")


def check_float_tensors(tensors: Mapping[str, torch.Tensor], dtype_label: str = "") -> None:
    """Refuse a float tensor to be written with NaN/Inf values (e.g. a bf16 weight beyond fp16's range)."""
    for name, tensor in tensors.items():
        bad = nonfinite_count(tensor)
        if bad:
            hint = f" in {dtype_label}" if dtype_label else ""
            raise LowbitError(f"{name} has {bad} NaN/Inf values{hint}; nothing was written "
                              "(a weight beyond fp16's range needs --dtype bf16 or fp32)")


FP16_MAX = 65504.0


def check_parameters(model: nn.Module, fp16_matrices: bool = False) -> None:
    """Refuse a model whose (materialized) float parameters hold NaN/Inf, before spending time on it.

    ``fp16_matrices`` also refuses matrices with values beyond fp16's range: GGUF stores them as F16 or with
    fp16 block scales (each at most the block's largest magnitude), which would then be inf. Checking this
    before encoding makes every encoded GGUF tensor finite without decoding it again.
    """
    for name, param in model.named_parameters():
        if param.is_meta or not param.is_floating_point():
            continue
        bad = nonfinite_count(param.data)
        if bad:
            raise LowbitError(f"{name} has {bad} NaN/Inf values; fix or skip this tensor before quantizing")
        if fp16_matrices and param.dim() >= 2:
            low, high = torch.aminmax(param.data)  # no |w| copy of a large matrix
            largest = max(-float(low), float(high))
            if largest > FP16_MAX:
                raise LowbitError(f"{name} has values beyond fp16's range (|w| up to {largest:.3g}), "
                                  "which GGUF's F16 tensors and fp16 block scales cannot hold")


def first_nonfinite_module(model: nn.Module, run: Callable[[], Any]) -> tuple[str | None, int, Any]:
    """Call ``run()`` with forward hooks on every module of ``model``; (name, NaN/Inf count, run's result).

    The name is the first module, in the order modules finish their forward, whose output holds NaN/Inf
    ("" for ``model`` itself), or None if every output was finite. Hooks are removed even when ``run`` fails.
    """
    found: list[tuple[str, int]] = []

    def make_hook(name: str):
        def hook(_module, _args, output):
            if not found:
                bad = nonfinite_count(output)
                if bad:
                    found.append((name, bad))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    if not found and nonfinite_count(result):
        found.append(("", nonfinite_count(result)))
    return (found[0][0], found[0][1], result) if found else (None, 0, result)


def describe_module(model: nn.Module, name: str) -> str:
    """``name (ClassName)``, or the model's class for the root."""
    module = model.get_submodule(name) if name else model
    return f"{name} ({type(module).__name__})" if name else f"the model's output ({type(module).__name__})"


def check_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], what: str = "the quantized model",
                  written: bool = True) -> None:
    """Run ``model(**inputs)`` once; raise naming the first module whose output is NaN/Inf.

    ``written`` says the caller writes nothing when this fails (so the message can say so)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    name, bad, _ = first_nonfinite_module(model, lambda: model(**batch))
    if name is not None:
        raise LowbitError(f"{what} computes NaN/Inf: first in the output of {describe_module(model, name)} "
                          f"({bad} values) on a probe window" + ("; nothing was written" if written else ""))


def check_quantized(qm, inputs: Mapping[str, torch.Tensor] | None) -> None:
    """Everything ``write_checkpoint`` would write is finite, and so is a forward pass on ``inputs``.

    ``qm`` is a ``QuantizedModel``; ``inputs`` None skips the forward (a streamed model has no weights left).
    """
    check_qtensors(qm.qtensors)
    check_float_tensors(qm.float_tensors, qm.recipe.float_dtype)
    if inputs is not None:
        check_forward(qm.model, inputs)


def probe_inputs(kind: str, tokenizer, text: str) -> dict[str, torch.Tensor]:
    """One short input for a finiteness forward: a token window (causal LM) or a few padded sentences (encoder)."""
    from lowbit.data.text import paragraphs, tokenize
    from lowbit.model.load import ENCODER

    if kind == ENCODER:
        return dict(tokenizer(paragraphs(text, PROBE_SENTENCES), padding=True, truncation=True,
                              max_length=PROBE_TOKENS, return_tensors="pt"))
    ids = tokenize(tokenizer, text[: PROBE_TOKENS * 16])[:PROBE_TOKENS]
    return {"input_ids": ids[None]}


def check_metrics(metrics: dict[str, Any], what: str = "the quantized model") -> dict[str, Any]:
    """Return ``metrics`` if every float in it is finite; else raise naming the bad ones."""
    bad = [f"{k}={v}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise LowbitError(f"evaluating {what} gave NaN/Inf ({', '.join(bad)}); its outputs are not finite")
    return metrics
