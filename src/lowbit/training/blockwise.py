"""Block-wise reconstruction before end-to-end QAT: each decoder block learns to reproduce the original's output.

End-to-end distillation pays for the whole model (and the vocabulary-sized head and softmax) on every step,
and its single loss at the logits moves 2-bit codes slowly. Training one block at a time on a local target
is far cheaper per update and converges in a few epochs (the Block-AP phase of EfficientQAT, Chen et al.
2024; OmniQuant and AutoRound train the same local objective with fewer parameters). For block ``i``:

* inputs: the quantized model's own hidden states entering block ``i`` (so each block also corrects what
  the blocks before it got wrong, as GPTQ's sequential mode does);
* target: the original block's output on the original's hidden states;
* trained: the block's QATLinear latent weights, steps and zero points, and its norm weights, with AdamW on
  the squared error of each token normalised by the target token's squared norm (blocks and tokens with
  large activations do not dominate), cosine decay over ``epochs`` passes of the windows.

Afterwards the block's outputs (with its trained quantized weights) become the next block's inputs. The
monitor windows are never among the training windows (the caller passes training windows only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.pipeline.layers import BlockInput, capture_inputs, find_blocks, run_block
from lowbit.training.fake_quant import qat_parameters
from lowbit.training.loop import autocast_factory, qat_optimizer


@dataclass(frozen=True)
class BlockOptions:
    """The block-wise phase: passes over the windows per block, windows per step, learning rates."""

    epochs: int = 2
    batch_windows: int = 2
    lr_weights: float = 1e-3
    lr_quant: float = 5e-4
    lr_norms: float = 1e-4
    grad_clip: float = 1.0
    max_minutes: float | None = None
    dtype: str = "auto"  # auto | bf16 | fp32


def reconstruct_blocks(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, options: BlockOptions,
                       progress: bool = True) -> list[dict[str, float]]:
    """Train every block of ``model`` (holding QATLinear layers) to match ``teacher``'s block on ``windows``.

    Returns one record per block: relative MSE before and after, and seconds. Stops early (the remaining
    blocks keep their PTQ start) once ``max_minutes`` have passed.
    """
    autocast = autocast_factory(options.dtype, windows.device)
    _, student_blocks = find_blocks(model)
    _, teacher_blocks = find_blocks(teacher)
    if len(student_blocks) != len(teacher_blocks):
        raise LowbitError("block-wise QAT: the quantized model and the original have different block counts")
    batch = options.batch_windows
    with torch.no_grad():
        x_q = capture_inputs(model, student_blocks[0], windows, batch)
        x_fp = capture_inputs(teacher, teacher_blocks[0], windows, batch)
    records = []
    start = time.perf_counter()
    bar = tqdm(total=len(student_blocks), desc="QAT blocks", disable=not progress)
    for index, (block, original) in enumerate(zip(student_blocks, teacher_blocks)):
        with torch.no_grad(), autocast():
            y_fp = [BlockInput(o.hidden.float(), o.kwargs) for o in run_block(original, x_fp)]
        out_of_time = options.max_minutes is not None and time.perf_counter() - start > 60 * options.max_minutes
        record = {"block": index, "seconds": 0.0}
        record["rel_mse_before"] = _relative_mse(block, x_q, y_fp, autocast)
        if not out_of_time:
            t0 = time.perf_counter()
            _train_block(block, x_q, y_fp, options, autocast, index)
            record["seconds"] = round(time.perf_counter() - t0, 1)
        record["rel_mse_after"] = _relative_mse(block, x_q, y_fp, autocast)
        records.append(record)
        with torch.no_grad(), autocast():
            x_q = [BlockInput(o.hidden.float(), o.kwargs) for o in run_block(block, x_q)]
        x_fp = y_fp
        bar.update(1)
        bar.set_postfix(rel_mse=f"{record['rel_mse_after']:.4f}")
    bar.close()
    return records


def _train_block(block: nn.Module, inputs: list[BlockInput], targets: list[BlockInput], options: BlockOptions,
                 autocast, index: int) -> None:
    if not qat_parameters(block)["weights"]:
        return
    optimizer = qat_optimizer(block, options.lr_weights, options.lr_quant, options.lr_norms)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bases = [g["lr"] for g in optimizer.param_groups]
    total = options.epochs * len(inputs)
    generator = torch.Generator().manual_seed(index)
    step = 0
    block.train()
    for _epoch in range(options.epochs):
        for k in torch.randperm(len(inputs), generator=generator).tolist():
            factor = 0.5 * (1.0 + math.cos(math.pi * step / total))
            for group, base in zip(optimizer.param_groups, bases):
                group["lr"] = base * factor
            with autocast():
                out = block(inputs[k].hidden, **inputs[k].kwargs)
                out = out[0] if isinstance(out, tuple) else out
            loss = _relative_error(out.float(), targets[k].hidden)
            if not torch.isfinite(loss):
                raise LowbitError(f"block-wise QAT: the loss of block {index} became {float(loss)}; try a lower "
                                  "learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    block.eval()


def _relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |out - target|^2 / |target|^2: per token, so the few tokens with huge hidden states
    (the first token of LLMs often carries activations 100x the others) do not outweigh the rest."""
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def _relative_mse(block: nn.Module, inputs: list[BlockInput], targets: list[BlockInput], autocast) -> float:
    total = 0.0
    with autocast():
        outs = run_block(block, inputs)
    for out, target in zip(outs, targets):
        total += float(_relative_error(out.hidden.float(), target.hidden))
    return total / len(inputs)
