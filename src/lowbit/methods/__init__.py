"""Quantization methods: (weight, spec, statistics) -> QTensor. No model walking here.

A method name may be prefixed by transforms joined with '+': ``awq+gptq`` folds AWQ scales, then
quantizes with GPTQ; ``awq`` alone means ``awq+rtn`` (with an activation-weighted clipping search).
"""

from __future__ import annotations

from typing import Callable

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor
from lowbit.methods.gptq import gptq
from lowbit.methods.hqq import hqq
from lowbit.methods.rtn import rtn

Method = Callable[..., QTensor]

METHODS: dict[str, Method] = {"rtn": rtn, "hqq": hqq, "gptq": gptq}
TRANSFORMS = ("awq", "smoothquant")
CALIBRATED = ("gptq",)

# What a quantizer does when the user names it and nothing more: the configuration that measured best on
# held-out text (bench/gptq_defaults.py, bench/RESULTS.md), as llm-compressor and GPTQModel also default to
# activation order. Explicit options (--no-act-order, --search minmax, a recipe's options) override these.
GPTQ_DEFAULT_OPTIONS = {"act_order": True, "clip_objective": "output", "true_sequential": True}
DEFAULT_SCALE_SEARCH = {"gptq": "mse"}  # quantizer -> scale search of its static group scales


def default_scale_search(method: str) -> str | None:
    """The scale search a method uses unless told otherwise (None: the spec's own, min-max)."""
    return DEFAULT_SCALE_SEARCH.get(split_method(method)[1])


def get_method(name: str) -> Method:
    """The quantizer called ``name``, or a one-line error listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise LowbitError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Every accepted --method value (quantizers, transforms, and their combinations)."""
    return [*METHODS, *TRANSFORMS, *(f"{t}+{q}" for t in TRANSFORMS for q in METHODS)]


def split_method(text: str) -> tuple[tuple[str, ...], str]:
    """('awq',), 'gptq' for 'awq+gptq'; a transform alone implies rtn. Unknown parts are an error."""
    parts = [p.strip().lower() for p in text.split("+") if p.strip()]
    transforms = tuple(p for p in parts if p in TRANSFORMS)
    quantizers = [p for p in parts if p not in TRANSFORMS]
    if len(quantizers) > 1 or (quantizers and parts[-1] != quantizers[0]) or not parts:
        raise LowbitError(f"method {text!r} must be transforms then one quantizer, e.g. 'awq+gptq'")
    quantizer = quantizers[0] if quantizers else "rtn"
    get_method(quantizer)
    return transforms, quantizer


def needs_calibration(text: str) -> bool:
    """Whether a method needs calibration data (any transform, or a calibrated quantizer)."""
    transforms, quantizer = split_method(text)
    return bool(transforms) or quantizer in CALIBRATED
