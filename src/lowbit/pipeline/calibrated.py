"""Calibrated quantization, one block at a time (the way GPTQModel and llm-compressor scale).

Calibration samples run through the embeddings once; then, for each block: one float pass with hooks
collects every target linear's input statistics, transforms (AWQ, SmoothQuant) fold their scales, each
linear is quantized by the method, and one pass with the quantized weights produces the next block's
inputs. Only the current block's statistics and the calibration activations are alive at a time.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import Family, require_family
from lowbit.formats.activation import ActivationSpec, max_code
from lowbit.errors import LowbitError
from lowbit.formats.qtensor import split_rows
from lowbit.formats.spec import QuantSpec
from lowbit.formats.quantize import check_finite, dequantize
from lowbit.methods import get_method, split_method
from lowbit.methods.gptq import GPTQOptions
from lowbit.model.apply import QuantizedModel, cast_float_tensors, plan
from lowbit.model.act_quant import attach_input_quantizer
from lowbit.model.finite import first_nonfinite_module, nonfinite_count
from lowbit.model.streaming import StreamingSource
from lowbit.observers.input_stats import InputStats, rescale_inputs
from lowbit.observers.ranges import get_range_observer
from lowbit.pipeline.layers import BlockInput, capture_inputs, find_blocks, run_block
from lowbit.pipeline.observe import observe_block
from lowbit.recipe import Recipe
from lowbit.transforms.awq import search_scales
from lowbit.transforms.mappings import applicable_mappings, fold_scales
from lowbit.transforms.smoothquant import smoothing_scales


log = logging.getLogger("lowbit")

SAMPLE_ROWS = 128  # input rows kept per batch and linear for static activation ranges


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize_calibrated(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor, batch_size: int = 8,
                        progress: bool = True, source: StreamingSource | None = None,
                        compute_dtype: torch.dtype = torch.float32) -> QuantizedModel:
    """Quantize ``model`` in place block by block with calibration token windows ``calib_ids`` (n x length).

    With a streaming ``source`` (``model`` is then ``source.model``), each block's float weights are read
    just before it is processed and released right after, and its float parameters are kept in the result.
    ``compute_dtype=torch.bfloat16`` runs the calibration forward passes and Hessian products under bf16
    autocast (about 2-3x faster on CPUs with bf16 units); statistics are still accumulated in fp32.
    """
    start = time.perf_counter()
    for pname, param in model.named_parameters():
        if not param.is_meta:
            check_finite(param.data, pname)
    transforms, quantizer = split_method(recipe.method)
    family = require_family(model, "+".join(transforms)) if transforms else None
    method = get_method(quantizer)
    result = QuantizedModel(model=model, recipe=recipe)
    chosen = {name: (module, spec) for name, module, spec in plan(model, recipe)}
    input_specs = {name: recipe.input_spec_for(name, module) for name, (module, _) in chosen.items()}
    prefix, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], calib_ids, batch_size)
    want_hessian = quantizer == "gptq" or "awq" in transforms
    static_acts = any(spec is not None and not spec.dynamic for spec in input_specs.values())
    for index, block in enumerate(tqdm(blocks, desc=f"{recipe.method} blocks", disable=not progress)):
        block_prefix = f"{prefix}.{index}." if prefix else f"{index}."
        targets = {n[len(block_prefix):]: m for n, (m, _) in chosen.items() if n.startswith(block_prefix)}
        if source is not None:
            source.load_block(index)
            for pname, param in block.named_parameters():
                check_finite(param.data, block_prefix + pname)
        stats = _observe(block, targets, inputs, want_hessian, SAMPLE_ROWS if static_acts else 0, compute_dtype,
                         index, result)
        _apply_transforms(block, targets, stats, {n: chosen[block_prefix + n][1] for n in targets}, transforms, recipe,
                          family)
        with torch.no_grad():
            for group in _stackable_groups(targets, stats, {n: chosen[block_prefix + n][1] for n in targets}):
                first = group[0]
                weight = torch.cat([targets[rel].weight for rel in group]) if len(group) > 1 else targets[first].weight
                name = block_prefix + first + ".weight"
                spec, inputs_ = _method_inputs(quantizer, transforms, stats.get(first), recipe,
                                               chosen[block_prefix + first][1])
                qt = method(weight, spec, name=name, **inputs_)
                parts = split_rows(qt, [targets[rel].weight.shape[0] for rel in group])
                for rel, part in zip(group, parts):
                    module = targets[rel]
                    module.weight.data.copy_(dequantize(part).to(module.weight.dtype))
                    result.qtensors[block_prefix + rel + ".weight"] = part
                    _attach_activation_quantizer(module, input_specs[block_prefix + rel], stats.get(rel))
        del stats
        inputs = _propagate(block, inputs, compute_dtype, index, block_prefix, result)
        if source is not None:
            cast_float_tensors(model, result, root=block, prefix=block_prefix)
            source.release_block(index)
    _quantize_outside_blocks(model, chosen, result, recipe, prefix)
    cast_float_tensors(model, result)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result


def _observe(block: nn.Module, targets: dict[str, nn.Linear], inputs: list[BlockInput], want_hessian: bool,
             sample_rows: int, compute_dtype: torch.dtype, index: int, result: QuantizedModel) -> dict[str, InputStats]:
    """The block's input statistics; a bf16 pass whose statistics came out NaN/Inf is redone in fp32.

    bf16 has fp32's exponent range but rounds to 8 significant bits, so a sum just below fp32's maximum
    (3.40e38) can round to inf in bf16 (its largest finite value is 3.39e38); the fp32 redo is exact there.
    Statistics that are not finite even in fp32 (activations beyond fp32's range) are an error.
    """
    with _autocast(compute_dtype):
        stats, _ = observe_block(block, targets, inputs, want_hessian, sample_rows, hessian_dtype=compute_dtype)
    bad = [name for name, s in stats.items() if not s.finite()]
    if bad and compute_dtype != torch.float32:
        _recompute_in_fp32(index, result, f"input statistics of {bad[0]}")
        stats, _ = observe_block(block, targets, inputs, want_hessian, sample_rows, hessian_dtype=torch.float32)
        bad = [name for name, s in stats.items() if not s.finite()]
    if bad:
        raise LowbitError(f"block {index}: the input statistics of {bad[0]} are NaN/Inf even in fp32 (the "
                          "calibration activations overflow); nothing was written")
    return stats


def _propagate(block: nn.Module, inputs: list[BlockInput], compute_dtype: torch.dtype, index: int,
               block_prefix: str, result: QuantizedModel) -> list[BlockInput]:
    """The quantized block's outputs (the next block's inputs); redone in fp32 if the bf16 pass overflowed.

    Outputs that are NaN/Inf in fp32 too are an error naming the first module inside the block that produced them.
    """
    with _autocast(compute_dtype):
        outputs = run_block(block, inputs)
    if compute_dtype != torch.float32 and not _finite_outputs(outputs):
        _recompute_in_fp32(index, result, "outputs")
        outputs = run_block(block, inputs)
    if not _finite_outputs(outputs):
        bad = next(b for b, o in zip(inputs, outputs) if nonfinite_count(o.hidden))
        name, count, _ = first_nonfinite_module(block, lambda: run_block(block, [bad]))
        where = block_prefix + name if name else block_prefix.rstrip(".")
        raise LowbitError(f"the quantized model computes NaN/Inf: first in the output of {where} "
                          f"({count} values) on calibration data; nothing was written")
    return outputs


def _finite_outputs(outputs: list[BlockInput]) -> bool:
    return not any(nonfinite_count(o.hidden) for o in outputs)


def _recompute_in_fp32(index: int, result: QuantizedModel, what: str) -> None:
    """Record (once per block) and say that block ``index``'s bf16 pass overflowed and runs again in fp32."""
    if index not in result.fp32_blocks:
        result.fp32_blocks.append(index)
    log.warning("lowbit: warning: block %d: bf16 calibration %s overflowed; recomputing this block in fp32",
                index, what)


def _stackable_groups(targets: dict[str, nn.Linear], stats: dict[str, InputStats], specs: dict) -> list[list[str]]:
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


def _attach_activation_quantizer(module: nn.Linear, spec: ActivationSpec | None, stats: InputStats | None) -> None:
    """Quantize this linear's input from now on: dynamic, or with a static scale from its observer."""
    if spec is None:
        return
    scale = None
    if not spec.dynamic:
        threshold = get_range_observer(spec.observer)(stats.abs_sample(), int(max_code(spec)))
        scale = torch.tensor(max(threshold, 1e-12) / max_code(spec))
    attach_input_quantizer(module, spec, scale)


def _autocast(dtype: torch.dtype):
    """bf16 autocast for the calibration passes, or nothing for fp32."""
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def _method_inputs(quantizer: str, transforms: tuple[str, ...], stats: InputStats | None, recipe: Recipe,
                   spec: QuantSpec) -> tuple[QuantSpec, dict[str, Any]]:
    """The spec to use and the statistics the quantizer takes.

    After AWQ, RTN runs AWQ's clipping step: an output-error (Hessian) clipping search, unless the recipe
    says ``clip: false`` or the spec cannot take a search.
    """
    if stats is None:
        return spec, {}
    if quantizer == "gptq":
        opts = recipe.options
        return spec, {"hessian": stats.hessian(), "options": GPTQOptions(
            damp=float(opts.get("damp", 0.01)), block_size=int(opts.get("block_size", 128)),
            act_order=bool(opts.get("act_order", False)), static_groups=bool(opts.get("static_groups", False)))}
    clip = "awq" in transforms and recipe.options.get("clip", True) and stats.xtx is not None
    if clip and spec.granularity in ("channel", "group"):
        try:
            return spec.with_options(scale_search="mse"), {"hessian": stats.hessian()}
        except LowbitError:
            pass
    return spec, {"importance": stats.importance() if stats.xtx is not None else None}


def _apply_transforms(block: nn.Module, targets: dict[str, nn.Linear], stats: dict[str, InputStats],
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


def _quantize_outside_blocks(model, chosen, result, recipe, prefix) -> None:
    """Targets outside the repeated blocks (rare: an unignored lm_head) get data-free RTN."""
    rtn = get_method("rtn")
    with torch.no_grad():
        for name, (module, spec) in chosen.items():
            pname = name + ".weight"
            if pname not in result.qtensors:
                qt = rtn(module.weight, spec, name=pname)
                module.weight.data.copy_(dequantize(qt).to(module.weight.dtype))
                result.qtensors[pname] = qt
