"""Calibrated quantization, one block at a time (the way GPTQModel and llm-compressor scale).

Calibration samples run through the embeddings once; then, for each block: one float pass with hooks
collects every target linear's input statistics, transforms (AWQ, SmoothQuant) fold their scales, each
linear is quantized by the method, and one pass with the quantized weights produces the next block's
inputs. Only the current block's statistics and the calibration activations are alive at a time.
Given a ``BlockState`` (``lowbit.pipeline.resume``), each finished block is saved, and a killed run continues
from the last one with the same result bit for bit. Streaming, a ``sink`` takes each finished block's QTensors
and float tensors (to write them) and the result drops them, so nothing grows with the number of blocks.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import Family, require_family
from lowbit.formats.activation import ActivationSpec
from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor, split_rows
from lowbit.formats.spec import QuantSpec
from lowbit.formats.quantize import check_finite, dequantize
from lowbit.hardware import steady_allocator
from lowbit.methods import GPTQ_DEFAULT_OPTIONS, get_method, split_method
from lowbit.model.apply import FLOAT_TORCH_DTYPES, QuantizedModel, cast_float_tensors, plan
from lowbit.model.act_quant import InputQuantizer, attach_input_quantizer, input_quantizers
from lowbit.model.finite import first_nonfinite_module, nonfinite_count
from lowbit.model.streaming import StreamingSource
from lowbit.observers.input_stats import InputStats
from lowbit.pipeline.compute import as_stored, computing_in, in_fp32, narrowed_for
from lowbit.pipeline.layers import BlockInput, capture_inputs, find_blocks, run_block
from lowbit.pipeline.linears import apply_transforms, attach_activation_quantizer, method_inputs, stackable_groups
from lowbit.pipeline.observe import observe_block
from lowbit.pipeline.resume import BlockState, SavedBlock
from lowbit.pipeline.sequential import NotSequential, run_sequential, trace_calls
from lowbit.recipe import Recipe


log = logging.getLogger("lowbit")

SAMPLE_ROWS = 128  # input rows kept per batch and linear for static activation ranges

# Takes one finished block: (QTensors, float tensors, input quantizers), each keyed by its full name.
BlockSink = Callable[[dict[str, QTensor], dict[str, torch.Tensor], dict[str, InputQuantizer]], None]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize_calibrated(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor, batch_size: int = 8,
                        progress: bool = True, source: StreamingSource | None = None,
                        compute_dtype: torch.dtype = torch.float32, state: BlockState | None = None,
                        sink: BlockSink | None = None) -> QuantizedModel:
    """Quantize ``model`` in place block by block with calibration token windows ``calib_ids`` (n x length).

    With a streaming ``source`` (``model`` is then ``source.model``), each block's float weights are read
    just before it is processed and released right after, and its float parameters are kept in the result.
    ``compute_dtype=torch.bfloat16`` runs the calibration forward passes and Hessian products in bf16
    (``lowbit.pipeline.compute``; several times faster on CPUs with bf16 units); statistics are still
    accumulated in fp32, and the weights the method quantizes stay fp32.
    With a ``state`` (``lowbit.pipeline.resume``), every finished block is saved there, and the blocks it
    already holds are read back instead of computed: the result is bit for bit that of an uninterrupted run.
    With a ``sink`` (streaming only), every finished block, read back or computed, is handed to it in order and
    its QTensors and float tensors leave the result, which then holds only what is outside the blocks.
    """
    if sink is not None and source is None:
        raise ValueError("a block sink needs a streaming source (in memory, the model keeps every block anyway)")
    start = time.perf_counter()
    if source is None:  # streaming is for tight memory: there the allocator keeps returning memory at once
        steady_allocator()  # activations reused from the heap, not mapped afresh per op (lowbit.hardware)
    else:
        source.load_outside()  # embeddings, final norm, head: the first block's inputs need them
    for pname, param in model.named_parameters():
        if not param.is_meta:
            check_finite(param.data, pname)
    transforms, quantizer = split_method(recipe.method)
    family = require_family(model, "+".join(transforms)) if transforms else None
    method = get_method(quantizer)
    chosen = {name: (module, spec) for name, module, spec in plan(model, recipe)}
    input_specs = {name: recipe.input_spec_for(name, module) for name, (module, _) in chosen.items()}
    want_hessian = quantizer == "gptq" or "awq" in transforms
    sample_rows = SAMPLE_ROWS if any(s is not None and not s.dynamic for s in input_specs.values()) else 0
    run = _Run(recipe=recipe, result=QuantizedModel(model=model, recipe=recipe), chosen=chosen,
               input_specs=input_specs, transforms=transforms, quantizer=quantizer, method=method, family=family,
               compute_dtype=compute_dtype, want_hessian=want_hessian, sample_rows=sample_rows,
               want_abs=bool(transforms) or bool(sample_rows) or not want_hessian, handed_off=set(),
               sequential=_runs_sequential(recipe, quantizer, transforms), traces={})
    prefix, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], calib_ids, batch_size)
    inputs = narrowed_for(inputs, compute_dtype, fp32_passes=any(s is not None for s in input_specs.values()))
    if source is not None:
        source.release_outside()  # not needed again until the end
    first = 0
    if state is not None and state.done:
        first, inputs = state.done, _restore(run, state, blocks, prefix, inputs, source, sink)
    bar = tqdm(range(first, len(blocks)), desc=f"{recipe.method} blocks", disable=not progress, initial=first,
               total=len(blocks))
    for index in bar:
        block, block_prefix = blocks[index], _block_prefix(prefix, index)
        if source is not None:
            source.load_block(index)
            for pname, param in block.named_parameters():
                check_finite(param.data, block_prefix + pname)
        inputs = _quantize_block(run, block, index, block_prefix, inputs)
        if source is not None:
            cast_float_tensors(model, run.result, root=block, prefix=block_prefix)
        if state is not None:
            _save(run, state, block, index, block_prefix, inputs)
        if sink is not None:
            _hand_off(run, sink, block, block_prefix)
        if source is not None:
            _release(source, block, index)
    del inputs  # the last block's outputs: nothing reads them
    if source is not None:
        source.load_outside()
    result = run.result
    _quantize_outside_blocks(model, chosen, result, recipe, run.handed_off)
    cast_float_tensors(model, result)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result


def _runs_sequential(recipe: Recipe, quantizer: str, transforms: tuple[str, ...]) -> bool:
    """Whether blocks are quantized one group of linears at a time in one pass: GPTQ without transforms (AWQ and
    SmoothQuant fold scales computed from every linear's statistics first), unless the recipe turns it off."""
    default = GPTQ_DEFAULT_OPTIONS["true_sequential"]
    return quantizer == "gptq" and not transforms and bool(recipe.options.get("true_sequential", default))


def _release(source: StreamingSource, block: nn.Module, index: int) -> None:
    """Drop a streamed block's weights, keeping its static activation scales (written with the block when there
    is a sink, else at the end)."""
    scales = {name: q.scale for name, q in input_quantizers(block).items()}
    source.release_block(index)
    for name, quantizer in input_quantizers(block).items():
        quantizer.scale = scales[name]


def _hand_off(run: _Run, sink: BlockSink, block: nn.Module, block_prefix: str) -> None:
    """Give a finished block's QTensors, float tensors and input quantizers to ``sink``; the result drops them."""
    result = run.result
    qtensors = {n: result.qtensors.pop(n) for n in [n for n in result.qtensors if n.startswith(block_prefix)]}
    run.handed_off.update(qtensors)
    floats = {n: result.float_tensors.pop(n) for n in [n for n in result.float_tensors if n.startswith(block_prefix)]}
    sink(qtensors, floats, {block_prefix + n: q for n, q in input_quantizers(block).items()})


def _block_prefix(prefix: str, index: int) -> str:
    return f"{prefix}.{index}." if prefix else f"{index}."


@dataclass(frozen=True)
class _Run:
    """What every block of one calibrated run shares: the recipe, its plan, and the result being filled."""

    recipe: Recipe
    result: QuantizedModel
    chosen: dict[str, tuple[nn.Module, QuantSpec]]
    input_specs: dict[str, ActivationSpec | None]
    transforms: tuple[str, ...]
    quantizer: str
    method: Callable[..., QTensor]
    family: Family | None
    compute_dtype: torch.dtype
    want_hessian: bool
    sample_rows: int
    want_abs: bool  # per-channel |x| sums and maxima: transforms and static ranges read them, GPTQ alone does not
    handed_off: set[str]  # names of the QTensors given to the sink (no longer in the result)
    sequential: bool  # one pass per block, each group of linears quantized when every batch reached it
    traces: dict  # (block class, target names) -> how one batch called them (lowbit.pipeline.sequential)


def _quantize_block(run: _Run, block: nn.Module, index: int, block_prefix: str,
                    inputs: list[BlockInput]) -> list[BlockInput]:
    """Observe, transform and quantize one block, attach its activation quantizers; returns its outputs."""
    chosen, result = run.chosen, run.result
    targets = {n[len(block_prefix):]: m for n, (m, _) in chosen.items() if n.startswith(block_prefix)}
    specs = {n: chosen[block_prefix + n][1] for n in targets}
    if run.sequential and not any(run.input_specs[block_prefix + n] for n in targets):
        outputs = _quantize_sequential(run, block, index, block_prefix, targets, specs, inputs)
        if outputs is not None:
            return outputs
    stats = _observe(block, targets, inputs, run, index, result)
    apply_transforms(block, targets, stats, specs, run.transforms, run.recipe, run.family)
    with torch.no_grad():
        for group in stackable_groups(targets, stats, specs):
            first = group[0]
            weight = torch.cat([targets[rel].weight for rel in group]) if len(group) > 1 else targets[first].weight
            spec, inputs_ = method_inputs(run.quantizer, run.transforms, stats.get(first), run.recipe, specs[first],
                                          run.compute_dtype)
            qt = run.method(weight, spec, name=block_prefix + first + ".weight", **inputs_)
            parts = split_rows(qt, [targets[rel].weight.shape[0] for rel in group])
            for rel, part in zip(group, parts):
                module = targets[rel]
                module.weight.data.copy_(dequantize(part).to(module.weight.dtype))
                result.qtensors[block_prefix + rel + ".weight"] = part
                attach_activation_quantizer(module, run.input_specs[block_prefix + rel], stats.get(rel))
    del stats
    return _propagate(block, inputs, run.compute_dtype, index, block_prefix, result)


def _quantize_sequential(run: _Run, block: nn.Module, index: int, block_prefix: str, targets: dict[str, nn.Linear],
                         specs: dict[str, QuantSpec], inputs: list[BlockInput]) -> list[BlockInput] | None:
    """Quantize the block in one pass, each group of linears as soon as every batch has reached it, the later
    ones seeing the earlier ones quantized (``lowbit.pipeline.sequential``); returns its outputs, or None when
    the block does not call its linears once each in a fixed order (then nothing was changed)."""
    originals = {rel: m.weight.data for rel, m in targets.items()}  # fp32: the pass may run on bf16 copies
    parts: dict[str, tuple[QTensor, torch.Tensor]] = {}  # name -> (QTensor, its dequantized fp32 weight)

    def quantize(group: list[str], stats: InputStats) -> None:
        if not stats.finite():  # a bf16 overflow: the two-pass way redoes the statistics in fp32
            raise NotSequential(f"the input statistics of {group[0]} are not finite")
        first = group[0]
        weight = torch.cat([originals[rel] for rel in group]) if len(group) > 1 else originals[first]
        spec, extra = method_inputs(run.quantizer, run.transforms, stats, run.recipe, specs[first], run.compute_dtype)
        qt = run.method(weight, spec, name=block_prefix + first + ".weight", **extra)
        for rel, part in zip(group, split_rows(qt, [originals[rel].shape[0] for rel in group])):
            parts[rel] = part, dequantize(part)
            targets[rel].weight.data = parts[rel][1].to(targets[rel].weight.dtype)

    def new_stats(features: int) -> InputStats:
        return InputStats(features, want_hessian=True, product_dtype=run.compute_dtype, want_abs=False)

    try:
        with torch.no_grad(), computing_in(block, run.compute_dtype) as cast:
            batches = list(cast(inputs))
            key = (type(block), tuple(targets))
            if key not in run.traces:  # blocks of one class call their linears alike; each run checks it again
                run.traces[key] = trace_calls(block, targets, batches[0])
            calls = run.traces[key]
            if calls is None:
                return None
            inputs_of: dict[int, object] = {}  # calls: every target, in call order
            same_input = {rel: inputs_of.setdefault(calls[rel], object()) for rel in calls}
            groups = stackable_groups({rel: targets[rel] for rel in calls}, same_input, specs)
            hidden = run_sequential(block, batches, targets, groups, new_stats, quantize)
    except NotSequential as why:
        log.debug("block %d runs in two passes: %s", index, why)
        return None
    finally:
        for rel, module in targets.items():
            module.weight.data = originals[rel]
    with torch.no_grad():
        for rel, (part, weight) in parts.items():
            targets[rel].weight.data.copy_(weight.to(originals[rel].dtype))
            run.result.qtensors[block_prefix + rel + ".weight"] = part
    outputs = as_stored([BlockInput(h, {}) for h in hidden], inputs)
    return _propagate(block, inputs, run.compute_dtype, index, block_prefix, run.result, outputs=outputs)


def _save(run: _Run, state: BlockState, block: nn.Module, index: int, block_prefix: str,
          outputs: list[BlockInput]) -> None:
    """Save finished block ``index`` into ``state``: QTensors, input quantizers, other float parameters, outputs."""
    qtensors = {n: q for n, q in run.result.qtensors.items() if n.startswith(block_prefix)}
    quantizers = {block_prefix + n: q for n, q in input_quantizers(block).items()}
    floats = {block_prefix + n: p.data for n, p in block.named_parameters()
              if block_prefix + n not in qtensors and p.is_floating_point()}
    # The outputs as the run holds them (as_stored): bf16 after a plain bf16 pass, fp32 after an fp32 or autocast
    # pass (whose values bf16 cannot hold), so the resumed run's next block reads exactly what this one would.
    state.save_block(index, qtensors, quantizers, floats, [o.hidden for o in outputs], run.result.fp32_blocks)


def _restore(run: _Run, state: BlockState, blocks: nn.ModuleList, prefix: str, inputs: list[BlockInput],
             source: StreamingSource | None, sink: BlockSink | None) -> list[BlockInput]:
    """Put the blocks ``state`` holds back as they were when saved (handed to ``sink`` one by one, as a run
    that computed them would); returns the next block's inputs: the calibration batches with their recomputed
    keyword arguments and the saved hidden states."""
    if state.done > len(blocks):
        raise LowbitError(f"the calibration state in {state.folder} has {state.done} blocks, this model "
                          f"{len(blocks)}; run without --resume to start over")
    for index in range(state.done):
        block_prefix = _block_prefix(prefix, index)
        saved = state.read_block(index)
        run.result.qtensors.update(saved.qtensors)
        _restore_parameters(run, state, blocks[index], block_prefix, saved, streaming=source is not None)
        _restore_quantizers(run, state, blocks[index], block_prefix, saved)
        if sink is not None:
            _hand_off(run, sink, blocks[index], block_prefix)
    run.result.fp32_blocks[:] = state.fp32_blocks
    hidden = state.read_inputs()
    if [h.shape for h in hidden] != [b.hidden.shape for b in inputs]:
        raise LowbitError(f"the calibration state in {state.folder} holds inputs of other shapes than this run's "
                          "calibration batches; run without --resume to start over")
    return [BlockInput(h, b.kwargs) for h, b in zip(hidden, inputs)]


def _restore_parameters(run: _Run, state: BlockState, block: nn.Module, block_prefix: str, saved: SavedBlock,
                        streaming: bool) -> None:
    """A saved block's weights back into the model: quantized ones as ``dequantize(QTensor)``, exactly what the
    pipeline put there. Streaming, the block stays on the meta device and its float tensors go straight into
    the result, rounded as ``cast_float_tensors`` rounds them."""
    float_dtype = FLOAT_TORCH_DTYPES[run.recipe.float_dtype]
    for rel, param in block.named_parameters():
        name = block_prefix + rel
        if name in saved.qtensors:
            if not streaming:
                param.data.copy_(dequantize(saved.qtensors[name]).to(param.dtype))
            continue
        value = saved.floats.get(name)
        if value is None or value.shape != param.shape:
            raise LowbitError(f"the calibration state in {state.folder} does not hold {name} as this model has it; "
                              "run without --resume to start over")
        if streaming:
            run.result.float_tensors[name] = value.to(float_dtype)
        else:
            param.data.copy_(value)


def _restore_quantizers(run: _Run, state: BlockState, block: nn.Module, block_prefix: str,
                        saved: SavedBlock) -> None:
    """Attach the block's activation quantizers with their saved static scales (dynamic ones have none)."""
    for name, spec in run.input_specs.items():
        if spec is None or not name.startswith(block_prefix):
            continue
        if name not in saved.input_scales or (saved.input_scales[name] is None) != spec.dynamic:
            raise LowbitError(f"the calibration state in {state.folder} has no input quantizer for {name}; run "
                              "without --resume to start over")
        attach_input_quantizer(block.get_submodule(name[len(block_prefix):]), spec, saved.input_scales[name])


def _observe(block: nn.Module, targets: dict[str, nn.Linear], inputs: list[BlockInput], run: _Run, index: int,
             result: QuantizedModel) -> dict[str, InputStats]:
    """The block's input statistics; a bf16 pass whose statistics came out NaN/Inf is redone in fp32.

    bf16 has fp32's exponent range but rounds to 8 significant bits, so a sum just below fp32's maximum
    (3.40e38) can round to inf in bf16 (its largest finite value is 3.39e38); the fp32 redo is exact there.
    Statistics that are not finite even in fp32 (activations beyond fp32's range) are an error.
    """
    compute_dtype = run.compute_dtype
    collect = {"want_hessian": run.want_hessian, "sample_rows": run.sample_rows, "want_abs": run.want_abs,
               "outputs": False}
    with computing_in(block, compute_dtype) as cast:
        stats, _ = observe_block(block, targets, cast(inputs), hessian_dtype=compute_dtype, **collect)
    bad = [name for name, s in stats.items() if not s.finite()]
    if bad and compute_dtype != torch.float32:
        _recompute_in_fp32(index, result, f"input statistics of {bad[0]}")
        stats, _ = observe_block(block, targets, in_fp32(inputs), hessian_dtype=torch.float32, **collect)
        bad = [name for name, s in stats.items() if not s.finite()]
    if bad:
        raise LowbitError(f"block {index}: the input statistics of {bad[0]} are NaN/Inf even in fp32 (the "
                          "calibration activations overflow); nothing was written")
    return stats


def _propagate(block: nn.Module, inputs: list[BlockInput], compute_dtype: torch.dtype, index: int,
               block_prefix: str, result: QuantizedModel, outputs: list[BlockInput] | None = None) -> list[BlockInput]:
    """The quantized block's outputs (the next block's inputs); redone in fp32 if the bf16 pass overflowed.

    ``outputs`` are the outputs of a pass already made in ``compute_dtype`` (only checked then).
    Outputs that are NaN/Inf in fp32 too are an error naming the first module inside the block that produced them.
    """
    if outputs is None:
        with computing_in(block, compute_dtype) as cast:
            outputs = as_stored(run_block(block, cast(inputs)), inputs)
    finite = _finite_outputs(outputs)
    if compute_dtype != torch.float32 and not finite:
        _recompute_in_fp32(index, result, "outputs")
        outputs = run_block(block, in_fp32(inputs))
        finite = _finite_outputs(outputs)
    if not finite:
        bad = next(b for b, o in zip(inputs, outputs) if nonfinite_count(o.hidden))
        name, count, _ = first_nonfinite_module(block, lambda: run_block(block, in_fp32([bad])))
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


def _quantize_outside_blocks(model, chosen, result, recipe, handed_off: set[str]) -> None:
    """Targets outside the repeated blocks (rare: an unignored lm_head) get data-free RTN."""
    rtn = get_method("rtn")
    with torch.no_grad():
        for name, (module, spec) in chosen.items():
            pname = name + ".weight"
            if pname not in result.qtensors and pname not in handed_off:
                qt = rtn(module.weight, spec, name=pname)
                module.weight.data.copy_(dequantize(qt).to(module.weight.dtype))
                result.qtensors[pname] = qt
