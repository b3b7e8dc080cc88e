"""What a calibrated run does with one block's target linears, given their input statistics.

Which linears are quantized together (stacked rows), which statistics the quantizer takes, the AWQ and
SmoothQuant folds, and the activation quantizers attached afterwards. The passes that gather the statistics
are the caller's (``lowbit.pipeline.calibrated``, ``lowbit.pipeline.sequential``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.arch import Family
from lowbit.errors import LowbitError
from lowbit.formats.activation import ActivationSpec, max_code
from lowbit.formats.spec import QuantSpec
from lowbit.methods import GPTQ_DEFAULT_OPTIONS
from lowbit.methods.gptq import GPTQOptions
from lowbit.model.act_quant import attach_input_quantizer
from lowbit.observers.input_stats import InputStats, rescale_inputs
from lowbit.observers.ranges import get_range_observer
from lowbit.recipe import Recipe
from lowbit.transforms.awq import search_scales
from lowbit.transforms.mappings import applicable_mappings, fold_scales
from lowbit.transforms.smoothquant import smoothing_scales


def stackable_groups(targets: dict[str, nn.Linear], stats: dict[str, InputStats], specs: dict) -> list[list[str]]:
    """Targets grouped so that each group is quantized as one matrix with its rows stacked.

    Rows are independent given the input statistics, so linears that read the same input (one shared
    accumulator: q/k/v, gate/up) with the same row-wise spec give exactly the same codes stacked or not,
    with fewer (GPTQ: column-loop) passes. Anything else is a group of one.
    """
    groups: dict[tuple, list[str]] = {}
    for rel in targets:
        spec = specs[rel]
        row_wise = spec.granularity in ("channel", "group") and spec.scale_dtype in ("fp16", "bf16", "fp32")
        key = (id(stats.get(rel)), spec) if row_wise and rel in stats else (rel,)
        groups.setdefault(key, []).append(rel)
    return list(groups.values())


def attach_activation_quantizer(module: nn.Linear, spec: ActivationSpec | None, stats: InputStats | None) -> None:
    """Quantize this linear's input from now on: dynamic, or with a static scale from its observer."""
    if spec is None:
        return
    scale = None
    if not spec.dynamic:
        threshold = get_range_observer(spec.observer)(stats.abs_sample(), int(max_code(spec)))
        scale = torch.tensor(max(threshold, 1e-12) / max_code(spec))
    attach_input_quantizer(module, spec, scale)


def method_inputs(quantizer: str, transforms: tuple[str, ...], stats: InputStats | None, recipe: Recipe,
                  spec: QuantSpec, compute_dtype: torch.dtype = torch.float32) -> tuple[QuantSpec, dict[str, Any]]:
    """The spec to use and the statistics the quantizer takes (and, for GPTQ, the dtype of its scale search's
    products: the calibration passes' ``compute_dtype``).

    After AWQ, RTN runs AWQ's clipping step: an output-error (Hessian) clipping search, unless the recipe
    says ``clip: false`` or the spec cannot take a search.
    """
    if stats is None:
        return spec, {}
    if quantizer == "gptq":
        opts = recipe.options
        return spec, {"hessian": stats.hessian(), "options": GPTQOptions(
            damp=float(opts.get("damp", 0.01)), block_size=int(opts.get("block_size", 128)),
            act_order=bool(opts.get("act_order", GPTQ_DEFAULT_OPTIONS["act_order"])),
            static_groups=bool(opts.get("static_groups", False)),
            clip_objective=str(opts.get("clip_objective", GPTQ_DEFAULT_OPTIONS["clip_objective"]))),
            "search_dtype": compute_dtype}
    clip = "awq" in transforms and recipe.options.get("clip", True) and stats.gram_upper is not None
    if clip and spec.granularity in ("channel", "group"):
        try:
            return spec.with_options(scale_search="mse"), {"hessian": stats.hessian()}
        except LowbitError:
            pass
    return spec, {"importance": stats.importance() if stats.gram_upper is not None else None}


def apply_transforms(block: nn.Module, targets: dict[str, nn.Linear], stats: dict[str, InputStats],
                      specs: dict, transforms: tuple[str, ...], recipe: Recipe, family: Family | None) -> None:
    """Fold AWQ / SmoothQuant scales wherever the family's table entry says a producer feeds target linears
    that share one input."""
    if not transforms:
        return
    for mapping, producer, consumers in applicable_mappings(block, family.scale_pairs):
        if not all(c in targets for c in mapping.consumers):
            continue
        shared = stats[mapping.consumers[0]]
        if any(stats[c] is not shared for c in mapping.consumers):
            continue
        weights = [c.weight.data for c in consumers]
        with torch.no_grad():
            if "smoothquant" in transforms:
                scales = smoothing_scales(shared.abs_max, weights, float(recipe.options.get("alpha", 0.5)))
                fold_scales(producer, consumers, scales, family.norm_offset)
                rescale_inputs(shared, scales)
            if "awq" in transforms:
                scales, alpha = search_scales(weights, shared.mean_abs(), shared.hessian(),
                                              specs[mapping.consumers[0]], int(recipe.options.get("grid", 20)))
                if alpha is not None:
                    fold_scales(producer, consumers, scales, family.norm_offset)
                    rescale_inputs(shared, scales)
