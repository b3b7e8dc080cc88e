"""The streamed quantize job, and the memory estimate every quantize run prints before it starts.

``lowbit quantize --stream`` reads a Hugging Face folder (sharded or not) one block at a time
(``lowbit.model.streaming``), runs every method through the block-by-block pipeline, and writes each finished
block into the output as it goes (``lowbit.model.checkpoint.CheckpointShards``): neither the float model nor
its quantized blocks are ever all in memory. The output folder is built under a temporary name and renamed
when complete, so an error or interruption leaves nothing half-written at ``--out``.

Before any work, the run's peak memory is estimated from shapes (``lowbit.pipeline.memory_plan``), printed,
and, with ``--max-memory``, compared: a plan that does not fit is a one-line error naming what to change.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.model.apply import plan
from lowbit.model.load import CAUSAL_LM, LoadedModel, model_kind, resolve_source, source_size
from lowbit.pipeline.memory_plan import MemoryEstimate, RunShape, check_fits, estimate_memory, shape_of_model
from lowbit.recipe import Recipe

log = logging.getLogger("lowbit")


def stream_job(opts, recipe: Recipe, out_dir: Path, progress: bool) -> tuple[dict[str, Any], Path]:
    """Quantize a Hugging Face folder block by block from disk, writing the output block by block.

    ``opts`` is a ``lowbit.workflow.QuantizeOptions``. The original is never fully in memory, so nothing is
    evaluated here: ``lowbit eval DIR`` does that.
    """
    from transformers import AutoTokenizer

    from lowbit.io_utils import atomic_directory
    from lowbit.model.checkpoint import CheckpointShards
    from lowbit.model.streaming import StreamingSource
    from lowbit.pipeline.calibrated import quantize_calibrated
    from lowbit.workflow import _compute_dtype, calibration_with_state, resolve_aliases
    from lowbit.workflow_report import plan_heads

    if opts.max_memory is not None:
        parse_memory(opts.max_memory)  # a malformed size is refused before anything is read
    path = resolve_source(opts.model)
    if not path.is_dir():
        raise LowbitError(f"--stream reads a Hugging Face safetensors folder; {path} is not one")
    t0 = time.perf_counter()
    source = StreamingSource(path)  # every file problem is found here, before any work
    loaded = LoadedModel(source.model, AutoTokenizer.from_pretrained(str(path)), source.kind, str(path),
                         source_size(path))
    t_load = time.perf_counter() - t0  # config, tokenizer and the weights outside the blocks
    heads = plan_heads(opts, resolve_aliases(recipe, source.model), source.model)
    recipe = heads.recipe
    estimate = announce_memory(opts, streamed_estimate(source.model, recipe, opts))
    calib = calibration_with_state(loaded, recipe, opts, out_dir)  # streaming is block by block even for RTN
    with atomic_directory(out_dir, force=opts.force) as tmp:
        shards = CheckpointShards(tmp, opts.shard_bytes)
        qm = quantize_calibrated(source.model, recipe, calib.ids, opts.calibration.batch_size, progress,
                                 source=source, compute_dtype=_compute_dtype(opts), state=calib.state,
                                 sink=_checked(shards, recipe.float_dtype))
        report = _finish(qm, shards, tmp, loaded, heads, calib, estimate, t_load)
    if calib.state is not None:
        calib.state.remove()  # the output is written: the state it was resumable from goes
    return report, out_dir


def _checked(shards, float_dtype: str):
    """The block sink: refuse NaN/Inf in what a block would write, then queue it for its shard."""
    from lowbit.model.finite import check_float_tensors, check_qtensors

    def sink(qtensors, floats, quantizers) -> None:
        check_qtensors(qtensors)
        check_float_tensors(floats, float_dtype)
        shards.add(qtensors, floats, quantizers)

    return sink


def _finish(qm, shards, tmp: Path, loaded: LoadedModel, heads, calib, estimate: MemoryEstimate,
            t_load: float) -> dict[str, Any]:
    """Write what is left (the tensors outside the blocks), the last shard, the folder's other files and the
    report; returns the report."""
    from lowbit.model.act_quant import input_quantizers
    from lowbit.model.checkpoint import WEIGHTS_FILE, read_header, write_companions
    from lowbit.model.finite import check_quantized
    from lowbit.pipeline.calibrated import peak_rss_mb
    from lowbit.recipe import save_recipe
    from lowbit.workflow_report import checkpoint_manifest, checkpoint_report, heads_report, write_report

    check_quantized(qm, None)  # the blocks were checked as they were handed over; this is the rest
    shards.add(qm.qtensors, qm.float_tensors, input_quantizers(qm.model))
    files = shards.finish()
    write_companions(tmp, loaded.model.config, loaded.tokenizer, checkpoint_manifest(loaded, qm.recipe))
    save_recipe(qm.recipe, tmp / "recipe.yaml")
    report = checkpoint_report(loaded, qm, tmp, None, {"load": t_load, "quantize": qm.seconds})
    entries = read_header(tmp / WEIGHTS_FILE)[1].get("quantized", {})
    report.update(quantized_tensors=len(entries), quantized_weights=sum(math.prod(e["shape"]) for e in entries.values()))
    calibration = calib.report | {"fp32_blocks": qm.fp32_blocks}
    report.update(calibration=calibration, peak_rss_mb=peak_rss_mb(), streamed=True, weight_files=len(files),
                  memory_estimate=estimate_report(estimate))
    report.update(heads_report(heads, qm, loaded.model, report["size_bytes"]))  # embedding/head: outside the blocks
    write_report(report, tmp / "report.json")
    return report


def estimate_report(estimate: MemoryEstimate) -> dict[str, Any]:
    """report.json's ``memory_estimate``: the total, the phase that peaks and its parts, every phase's total, one
    block in fp32 and the calibration activations (in and out of a block), in bytes."""
    return {"bytes": estimate.total, "phase": estimate.phase, "parts": dict(estimate.parts),
            "phases": dict(estimate.phase_totals), "block_fp32_bytes": estimate.block_bytes,
            "calibration_activation_bytes": estimate.calibration_bytes}


def announce_memory(opts, estimate: MemoryEstimate, streamed: MemoryEstimate | None = None) -> MemoryEstimate:
    """Print the estimate (stderr, as a note) and refuse it if it exceeds ``opts.max_memory``; returns it."""
    log.warning("lowbit: note: %s", estimate.describe())
    if opts.max_memory is not None:
        check_fits(estimate, parse_memory(opts.max_memory), streamed_estimate=streamed)
    return estimate


def parse_memory(text: str) -> int:
    """``--max-memory`` as bytes: ``4GB``, ``800MB``, ``1.5GiB``."""
    from lowbit.analysis.budget import parse_size

    try:
        value = parse_size(text)
    except LowbitError:
        raise LowbitError(f"--max-memory {text!r} must be a size such as 4GB or 800MB") from None
    if value <= 0:
        raise LowbitError(f"--max-memory {text!r} must be more than zero")
    return value


def streamed_estimate(model: torch.nn.Module, recipe: Recipe, opts) -> MemoryEstimate:
    """The estimate of a streamed run of ``recipe`` on ``model`` (on the meta device or not)."""
    return estimate_memory(shape_of_model(model), _run_shape(model, recipe, opts, streamed=True))


def _run_shape(model: torch.nn.Module, recipe: Recipe, opts, streamed: bool, kind: str = CAUSAL_LM) -> RunShape:
    from lowbit.eval.estimate import recipe_bytes
    from lowbit.methods import split_method
    from lowbit.workflow import recipe_needs_calibration

    transforms, quantizer = split_method(recipe.method)
    cal = opts.calibration
    quantized = sum(module.weight.numel() for _, module, _ in plan(model, recipe))
    return RunShape(streamed=streamed, calibrated=streamed or recipe_needs_calibration(recipe),
                    want_hessian=quantizer == "gptq" or "awq" in transforms, samples=cal.samples,
                    length=cal.length, batch_size=cal.batch_size, quantized_params=quantized,
                    output_bytes=recipe_bytes(model, recipe), shard_bytes=opts.shard_bytes,
                    eval_length=opts.eval.length if opts.evaluate and kind == CAUSAL_LM else 0)


def in_memory_estimate(opts, recipe: Recipe, model: torch.nn.Module | None = None) -> MemoryEstimate | None:
    """Print the estimate of a run that loads the whole model, refusing it beyond ``opts.max_memory``.

    A Hugging Face folder is estimated before anything is loaded, from its config (a model on the meta device),
    with what ``--stream`` would need instead. A GGUF file is estimated once loaded (``model``): its tensor
    table is only read with all its metadata, seconds for a large vocabulary, which loading reads anyway; so
    before that, None. None with a note, too, when a folder's config cannot be read that way (loading then
    says what is wrong).
    """
    if opts.max_memory is not None:
        parse_memory(opts.max_memory)  # a malformed size is refused before anything is read
    path = resolve_source(opts.model)
    if model is not None:
        run = _run_shape(model, recipe, opts, False, model_kind(model.config))
        return announce_memory(opts, estimate_memory(shape_of_model(model), run))
    if not path.is_dir():
        return None
    try:
        meta, kind = _meta_model(path)
        estimate = estimate_memory(shape_of_model(meta), _run_shape(meta, recipe, opts, False, kind))
    except (LowbitError, OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("lowbit: note: no memory estimate for %s before loading it", path)
        return None
    return announce_memory(opts, estimate, streamed_estimate(meta, recipe, opts))


def _meta_model(path: Path) -> tuple[torch.nn.Module, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    kind = model_kind(config)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel).from_config(config, dtype=torch.float32)
    return model, kind
