"""The job behind ``lowbit qat``: post-training start, distillation through fake quantization, an ordinary checkpoint.

1. Load the original, keep its log-probabilities on the evaluation windows (lowbit.workflow.Evaluator) and a
   frozen copy as the teacher.
2. Quantize it with the chosen post-training method (RTN, GPTQ or AWQ) exactly as ``lowbit quantize`` does.
3. Replace every quantized linear by a QATLinear on the same grid, starting from the PTQ codes and scales, and
   train latent weights, steps, zero points and norms on windows of the training text that never overlap the
   evaluation windows: first block by block, each decoder block against the original block's output
   (lowbit.training.blockwise: cheap, and it moves low-bit codes far in minutes), then end to end against the
   teacher's next-token distribution (lowbit.training.loop). ``--minutes`` caps both phases together.
4. Write the trained codes as a lowbit checkpoint (the same files ``lowbit quantize`` writes, so every
   exporter reads it), with the PTQ start's and the trained model's measurements side by side in report.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.data.text import load_text, text_label, tokenize
from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_directory
from lowbit.model.apply import QuantizedModel, cast_float_tensors, plan
from lowbit.model.checkpoint import write_checkpoint
from lowbit.model.finite import check_parameters, check_quantized, probe_inputs
from lowbit.model.load import CAUSAL_LM, load_model
from lowbit.pipeline.calibrated import peak_rss_mb
from lowbit.recipe import save_recipe
from lowbit.training.blockwise import BlockOptions, reconstruct_blocks
from lowbit.training.fake_quant import QATLinear, check_trainable
from lowbit.training.loop import TrainOptions, train
from lowbit.training.state import saved_step
from lowbit.workflow import (Evaluator, QuantizeOptions, build_recipe, default_out_dir, post_training,
                             resolve_aliases)
from lowbit.workflow_report import checkpoint_manifest, checkpoint_report, heads_report, plan_heads, write_report

INIT_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
MONITOR_WINDOWS = 2


@dataclass(frozen=True)
class QATOptions:
    """``lowbit qat``: what to quantize (as ``lowbit quantize`` takes it), the training text and the training."""

    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    text: str | None = None  # training text (None: the default text, after the evaluation windows)
    length: int = 512
    resume: bool = False
    gguf_type: str | None = None  # train on the twin grids of this GGUF mix's per-tensor types (lowbit.gguf.twins)
    blocks: BlockOptions | None = field(default_factory=BlockOptions)  # block-wise phase first (None: skip it)
    block_windows: int = 64  # training windows the block-wise phase uses (the first ones)


def qat_job(opts: QATOptions, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Train, write atomically, measure; returns (report, output folder)."""
    t0 = time.perf_counter()
    qopts = opts.quantize
    if qopts.method not in INIT_METHODS:
        raise LowbitError(f"QAT starts from {', '.join(INIT_METHODS)}, not {qopts.method!r}")
    if qopts.target_bpw is not None or qopts.target_size is not None or qopts.stream:
        raise LowbitError("QAT trains one recipe in memory: --target-bpw/--target-size/--stream are not supported")
    recipe = build_recipe(qopts)
    out_dir = Path(qopts.out) if qopts.out else Path(str(default_out_dir(qopts, recipe)) + "-qat")
    state_dir = out_dir.parent / f"{out_dir.name}.qat-state"
    if out_dir.exists() and any(out_dir.iterdir()) and not qopts.force:
        raise LowbitError(f"output {out_dir} already exists; choose another --out or pass --force to replace it")
    loaded = load_model(qopts.model)
    if loaded.kind != CAUSAL_LM:
        raise LowbitError(f"lowbit qat trains causal language models; {loaded.source} is an encoder "
                          "(CNNs: lowbit bench vision)")
    check_parameters(loaded.model)
    if opts.gguf_type:
        from lowbit.gguf.twins import twin_rules

        qopts = replace(qopts, scheme="W16A16", group_size=None, symmetric=None, embeddings="keep", lm_head="keep",
                        rules=twin_rules(loaded.model, opts.gguf_type) + qopts.rules)
        recipe = build_recipe(qopts)
    recipe = resolve_aliases(recipe, loaded.model)
    heads = plan_heads(qopts, recipe, loaded.model)
    recipe = heads.recipe
    trainable = _check_recipe(loaded.model, recipe)
    train_ids, monitor_ids, data_info = _training_windows(loaded.tokenizer, opts)
    evaluator = Evaluator(loaded.kind, loaded.tokenizer, qopts.eval, progress) if qopts.evaluate else None
    if evaluator:
        evaluator.observe_original(loaded.model)
    teacher = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    t1 = time.perf_counter()
    qm, _ = post_training(loaded, recipe, qopts, progress)
    t_ptq = time.perf_counter() - t1
    start_eval = evaluator.compare(qm.model) if evaluator else None
    wrapped = _wrap(qm, trainable, teacher if qopts.method == "rtn" else None)
    fingerprint = _fingerprint(loaded.source, recipe, opts, train_ids, monitor_ids)
    t2 = time.perf_counter()
    block_records = _block_phase(qm.model, teacher, train_ids, opts, state_dir, progress)
    t_blocks = time.perf_counter() - t2
    train_opts = opts.train
    if train_opts.max_minutes is not None:  # --minutes caps both phases together
        train_opts = replace(train_opts, max_minutes=max(0.0, train_opts.max_minutes - t_blocks / 60))
    state = train(qm.model, teacher, train_ids, monitor_ids, train_opts, state_dir, fingerprint, opts.resume, progress)
    t_train = time.perf_counter() - t2 - t_blocks  # end to end only; the block-wise phase is seconds.blocks
    del teacher
    _unwrap(qm, wrapped)
    check_quantized(qm, probe_inputs(loaded.kind, loaded.tokenizer, load_text(qopts.eval.text)))
    with atomic_directory(out_dir, force=qopts.force) as tmp:
        write_checkpoint(qm, tmp, loaded.model.config, loaded.tokenizer, checkpoint_manifest(loaded, recipe) | {"qat": True})
        save_recipe(recipe, tmp / "recipe.yaml")
        report = checkpoint_report(loaded, qm, tmp, None, {"post_training": t_ptq, "blocks": t_blocks, "train": t_train,
                                                  "train_total_including_resumed": state.seconds})
        report.update(heads_report(heads, qm, loaded.model, report["size_bytes"]))
        report["qat"] = {"init": qopts.method, "gguf_type": opts.gguf_type, "options": asdict(opts.train), "data": data_info,
                         "steps_done": state.step, "trained_tensors": len(wrapped), "history": state.history,
                         "blocks": block_records,
                         "start_eval": start_eval}
        report["eval"] = evaluator.compare(qm.model) if evaluator else None
        report["seconds"]["total"] = time.perf_counter() - t0
        report["peak_rss_mb"] = peak_rss_mb()
        write_report(report, tmp / "report.json")
    return report, out_dir


def _block_phase(model: nn.Module, teacher: nn.Module, train_ids: torch.Tensor, opts: QATOptions, state_dir: Path,
                 progress: bool) -> list[dict[str, float]] | None:
    """Block-wise reconstruction (lowbit.training.blockwise) unless skipped, or resumed past it."""
    if opts.blocks is None or opts.blocks.epochs <= 0:
        return None
    if opts.resume and saved_step(state_dir) is not None:
        return None  # the saved state already holds the block-wise result
    return reconstruct_blocks(model, teacher, train_ids[: opts.block_windows], opts.blocks, progress)


def _check_recipe(model: nn.Module, recipe) -> set[str]:
    """The linears QAT will train; refuses a recipe with a linear spec QAT cannot train, or nothing to train."""
    trainable = set()
    for name, module, spec in plan(model, recipe):
        if isinstance(module, nn.Linear):
            check_trainable(spec, name)
            trainable.add(name)
    if not trainable:
        raise LowbitError("the recipe quantizes no linear layer, so there is nothing for QAT to train")
    return trainable


def _training_windows(tokenizer, opts: QATOptions) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Non-overlapping training windows (after the evaluation windows when the texts are the same) and the
    held-out monitor windows (the first evaluation windows: logged, never trained on)."""
    ev = opts.quantize.eval
    eval_ids = tokenize(tokenizer, load_text(ev.text))
    monitor = eval_ids[: MONITOR_WINDOWS * ev.length]
    monitor = monitor[: (monitor.numel() // ev.length) * ev.length].reshape(-1, ev.length)[:, : opts.length]
    ids = eval_ids if opts.text == ev.text else tokenize(tokenizer, load_text(opts.text))
    skip = ev.windows * ev.length if opts.text == ev.text else 0
    pool = ids[skip:]
    n = pool.numel() // opts.length
    if n < opts.train.batch_windows:
        raise LowbitError(f"the training text ({text_label(opts.text)}) gives {n} windows of {opts.length} tokens "
                          f"after the evaluation part, fewer than one batch ({opts.train.batch_windows})")
    windows = pool[: n * opts.length].reshape(n, opts.length)
    info = {"text": text_label(opts.text), "first_token": skip, "windows": n, "length": opts.length,
            "monitor_windows": int(monitor.shape[0])}
    return windows, monitor, info


def _wrap(qm: QuantizedModel, trainable: set[str], original: nn.Module | None) -> dict[str, QATLinear]:
    """Swap each trainable quantized linear for a QATLinear starting at its PTQ result; freeze the rest.

    The latent weight is the original's when ``original`` is given (RTN: rounding it gives the PTQ codes
    exactly, and the latent keeps where each weight sits between grid points, so codes flip as soon as the
    gradient says so), else the PTQ model's dequantized weight (GPTQ/AWQ codes are not the nearest ones).

    Trained alongside: norm weights and other 1-D float parameters (cheap, and they absorb part of the
    error). Frozen: embeddings, untied heads that stay float, and weights quantized outside linears."""
    model = qm.model
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dim() == 1 and param.is_floating_point():
            param.requires_grad_(True)
    wrapped = {}
    for name in sorted(trainable):
        module = model.get_submodule(name)
        qt = qm.qtensors[f"{name}.weight"]
        latent = (original.get_submodule(name) if original is not None else module).weight.data.float()
        layer = QATLinear.from_qtensor(qt, latent, None if module.bias is None else module.bias.data)
        _replace(model, name, layer)
        wrapped[name] = layer
    return wrapped


def _unwrap(qm: QuantizedModel, wrapped: dict[str, QATLinear]) -> None:
    """Back to plain linears holding the trained quantized weights; the QTensors and float tensors updated."""
    for name, layer in wrapped.items():
        qm.qtensors[f"{name}.weight"] = layer.to_qtensor()
        _replace(qm.model, name, layer.to_linear())
    qm.model.requires_grad_(False)
    qm.float_tensors.clear()
    cast_float_tensors(qm.model, qm)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _fingerprint(source: str, recipe, opts: QATOptions, train_ids: torch.Tensor, monitor_ids: torch.Tensor) -> str:
    """What a resumed run must share with the interrupted one: model, recipe, data, training options."""
    h = hashlib.sha256()
    train_opts = {k: v for k, v in asdict(opts.train).items() if k != "max_minutes"}
    h.update(json.dumps({"source": source, "recipe": repr(recipe), "train": train_opts,
                         "method": opts.quantize.method, "blocks": asdict(opts.blocks) if opts.blocks else None,
                         "block_windows": opts.block_windows}, sort_keys=True, default=str).encode())
    h.update(train_ids.numpy().tobytes())
    h.update(monitor_ids.numpy().tobytes())
    return h.hexdigest()
