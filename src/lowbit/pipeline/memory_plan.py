"""What a quantize run will hold in memory, estimated before it starts, and ``--max-memory``'s refusal.

From parameter shapes only (a model on the meta device works), so the estimate costs nothing and a run that
would not fit is refused before it reads a weight. A run goes through phases whose peaks differ; the estimate
is the largest phase's sum:

- in memory (not streamed), always the whole model in fp32 and its QTensors (one byte per code until packed),
  plus, *calibrating*: the activations entering and leaving a block, one batch's forward through it and its
  input statistics (GPTQ/AWQ Hessians, in_features² x 4 bytes per linear: an upper bound, linears sharing an
  input share one), the other batches paused inside the block by one-pass GPTQ (three hidden-sized tensors and
  the widest linear input per token), and the free heap the allocator keeps (``steady_allocator``, 256 MB);
  *quantizing* the largest weight: two fp32 working copies of it (the finiteness check and round-to-nearest both
  make them); *writing*: the packed output; *evaluating*: three [length, vocab] fp32
  logits tensors;
- streamed (``lowbit.model.streaming``): *capturing the first block's inputs*: the weights outside the blocks
  (embeddings, final norm, head) in fp32 and the activations; *in the blocks*: the largest block in fp32, the
  activations in and out, one batch's forward, the statistics, the output shard being filled; *at the end*:
  the weights outside the blocks again, two working copies of the largest of them, and that shard.

Every phase adds the runtime: Python with torch, transformers and the tokenizer, about 450 MB measured on
tiny models. Calibration activations are n x length x hidden x 4 bytes per copy. Checked against peak RSS by
``bench/stream_memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError
from lowbit.hardware import KEPT_HEAP_BYTES

RUNTIME_BYTES = 500 * 10**6
FP32 = 4


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from shapes (no weights)."""

    total_params: int
    block_params: int  # the largest block
    outside_params: int  # everything outside the blocks, a tied head counted once
    largest_param: int  # elements of the largest parameter
    largest_outside: int  # elements of the largest parameter outside the blocks
    hidden: int
    vocab: int
    heads: int
    block_linears: tuple[tuple[int, int], ...]  # (out, in) features of the largest block's 2-D weights


@dataclass(frozen=True)
class RunShape:
    """What the run does: calibration size, whether it is streamed, and the sizes of what it writes."""

    streamed: bool
    calibrated: bool
    want_hessian: bool
    samples: int
    length: int
    batch_size: int
    quantized_params: int  # weights the recipe quantizes (their codes are one byte each until packed)
    output_bytes: int  # tensor bytes the recipe writes
    shard_bytes: int  # the streamed writer's shard limit
    eval_length: int = 0  # tokens per evaluation window (0: no LM evaluation)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a run: the parts of its largest phase, and one block in fp32 (less never fits)."""

    phase: str
    parts: tuple[tuple[str, int], ...]
    block_bytes: int
    activation_bytes: int  # the calibration activations in the peak phase (they scale with the samples)
    samples: int = 0
    calibration_bytes: int = 0  # the activations entering and leaving a block (two copies), whatever the phase
    phase_totals: tuple[tuple[str, int], ...] = ()  # every phase's sum, for the report

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def describe(self) -> str:
        """One line: total, the phase that peaks, and its parts."""
        parts = " + ".join(f"{label} {fmt_bytes(b)}" for label, b in self.parts if b)
        return f"memory estimate {fmt_bytes(self.total)} (peak {self.phase}: {parts})"


def estimate_memory(model: ModelShape, run: RunShape) -> MemoryEstimate:
    """The estimate for ``run`` on ``model`` (see the module docstring for what each phase holds)."""
    phases = _streamed_phases(model, run) if run.streamed else _in_memory_phases(model, run)
    phase = max(phases, key=lambda p: sum(b for _, b in phases[p]))
    acts = sum(b for label, b in phases[phase] if label == "calibration activations")
    totals = tuple((name, sum(b for _, b in parts)) for name, parts in phases.items())
    return MemoryEstimate(phase, phases[phase], model.block_params * FP32, acts, run.samples,
                          2 * _activations(model, run), totals)


def _activations(model: ModelShape, run: RunShape) -> int:
    """One copy of the calibration hidden states (n x length x hidden in fp32)."""
    return run.samples * run.length * model.hidden * FP32 if run.calibrated else 0


def _in_memory_phases(model: ModelShape, run: RunShape) -> dict[str, tuple[tuple[str, int], ...]]:
    held = (("model in fp32", model.total_params * FP32), ("codes", run.quantized_params))
    runtime = (("runtime", RUNTIME_BYTES),)
    phases = {
        "quantizing": (*held, ("working copies of the largest weight", 2 * model.largest_param * FP32), *runtime),
        "writing": (*held, ("packed output", run.output_bytes), *runtime),
    }
    if run.calibrated:
        phases["calibrating"] = (*held, ("calibration activations", 2 * _activations(model, run)),
                                 *_block_work(model, run), ("heap kept by the allocator", KEPT_HEAP_BYTES), *runtime)
    if run.eval_length:
        phases["evaluating"] = (held[0], ("evaluation logits", 3 * run.eval_length * model.vocab * FP32), *runtime)
    return phases


def _streamed_phases(model: ModelShape, run: RunShape) -> dict[str, tuple[tuple[str, int], ...]]:
    outside = ("outside the blocks in fp32", model.outside_params * FP32)
    shard = ("output shard", min(run.shard_bytes, run.output_bytes))
    runtime = ("runtime", RUNTIME_BYTES)
    acts = _activations(model, run)
    return {
        "capturing the first block's inputs": (outside, ("calibration activations", acts), runtime),
        "in the blocks": (("one block in fp32", model.block_params * FP32), ("calibration activations", 2 * acts),
                          *_block_work(model, run), shard, runtime),
        "at the end": (outside, ("working copies of the largest of them", 2 * model.largest_outside * FP32), shard,
                       runtime),
    }


def _block_work(model: ModelShape, run: RunShape) -> tuple[tuple[str, int], ...]:
    """One batch's forward through a block (its linears' outputs and the attention scores) and its statistics."""
    batch = min(run.batch_size, run.samples)
    outs = sum(o for o, _ in model.block_linears)
    forward = batch * run.length * FP32 * (outs + model.heads * run.length)
    stats = 0
    if run.want_hessian and model.block_linears:
        widest = max(i for _, i in model.block_linears)
        largest = max(o * i for o, i in model.block_linears)
        stats = FP32 * (sum(i * i for _, i in model.block_linears) + 2 * widest * widest + largest)
    waiting = 0  # one-pass GPTQ (lowbit.pipeline.sequential): the other batches wait inside the block
    if run.want_hessian and model.block_linears:
        batches = -(-run.samples // batch)
        widest_in = max(i for _, i in model.block_linears)
        waiting = (batches - 1) * batch * run.length * FP32 * (3 * model.hidden + widest_in)
    return (("one batch's forward", forward), ("statistics", stats), ("batches waiting in the block", waiting))


def check_fits(estimate: MemoryEstimate, max_bytes: int, flag: str = "--max-memory",
               streamed_estimate: MemoryEstimate | None = None) -> None:
    """Refuse, in one line naming what to change, a run whose estimate exceeds ``max_bytes``.

    ``streamed_estimate``: what the same run would need with ``--stream`` (None where it cannot stream). Only
    changes that would fit are proposed: ``--stream``, or at most so many ``--calib-samples``; else more memory.
    """
    if max_bytes < estimate.block_bytes:
        raise LowbitError(f"{flag} {fmt_bytes(max_bytes)} is below one block of this model in fp32 "
                          f"({fmt_bytes(estimate.block_bytes)}): no run fits; give more memory")
    if estimate.total <= max_bytes:
        return
    hints = []
    if streamed_estimate is not None and streamed_estimate.total <= max_bytes:
        hints.append(f"pass --stream (estimate {fmt_bytes(streamed_estimate.total)})")
    samples = _samples_that_fit(estimate, max_bytes)
    if samples:
        hints.append(f"pass --calib-samples {samples} or fewer")
    if not hints:
        need = min(estimate.total, streamed_estimate.total if streamed_estimate else estimate.total)
        hints.append(f"raise {flag} to at least {fmt_bytes(need)}" + (" with --stream" if need < estimate.total else ""))
    raise LowbitError(f"memory estimate {fmt_bytes(estimate.total)} (peak {estimate.phase}) exceeds {flag} "
                      f"{fmt_bytes(max_bytes)}; {' or '.join(hints)}")


def _samples_that_fit(estimate: MemoryEstimate, max_bytes: int) -> int:
    """The most calibration samples whose activations fit beside the rest of the estimate (0: none do)."""
    if not estimate.activation_bytes or not estimate.samples:
        return 0
    per_sample = estimate.activation_bytes / estimate.samples
    return max(0, min(estimate.samples - 1, int((max_bytes - estimate.total + estimate.activation_bytes) // per_sample)))


def shape_of_model(model: nn.Module) -> ModelShape:
    """The shape of a model (on the meta device or not); without repeated blocks, the whole model is one."""
    from lowbit.pipeline.layers import find_blocks

    params = {id(p): p.numel() for p in model.parameters()}
    try:
        groups: list[nn.Module] = list(find_blocks(model)[1])
    except LowbitError:
        groups = [model]
    largest = max(groups, key=lambda g: sum(p.numel() for p in g.parameters()))
    inside = {id(p) for g in groups for p in g.parameters()}
    block_params = sum(params[i] for i in {id(p) for p in largest.parameters()})
    linears = tuple((int(m.weight.shape[0]), int(m.weight[0].numel())) for m in largest.modules()
                    if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    config = getattr(model, "config", None)
    return ModelShape(
        total_params=sum(params.values()), block_params=block_params,
        outside_params=sum(n for i, n in params.items() if i not in inside),
        largest_param=max(params.values(), default=0),
        largest_outside=max((n for i, n in params.items() if i not in inside), default=0),
        hidden=int(getattr(embeddings, "embedding_dim", 0) or getattr(config, "hidden_size", 0) or 0),
        vocab=int(getattr(embeddings, "num_embeddings", 0) or getattr(config, "vocab_size", 0) or 0),
        heads=int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1),
        block_linears=linears)


def fmt_bytes(n: int) -> str:
    """``1.23 GB`` / ``345 MB`` / ``12 KB``: decimal units, as --max-memory reads them."""
    if n >= 10**9:
        return f"{n / 1e9:.2f} GB"
    if n >= 10**6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} KB"
