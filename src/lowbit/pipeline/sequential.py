"""One pass per block: each group of linears is quantized the moment every calibration batch has reached it.

GPTQ needs a linear's input Hessian over all batches before it can quantize the linear, and the linears
after it should see inputs computed with it already quantized (GPTQModel's and AutoGPTQ's "true
sequential"). Done with forward passes alone that costs a pass per group of linears (GPTQModel re-runs the
block for each), or two passes per block with the inner linears observed in float (a float pass, then a
quantized one). Here every batch's forward pass runs in its own greenlet (a coroutine with its own stack, on
the caller's thread): at the first linear of a group each batch adds its input to the group's statistics and
switches back; once the last batch has arrived, the group is quantized and the batches go on, through the
quantized linear, to the next group. The block is computed once, and what comes out is the quantized block's
output.

Greenlets, not threads: everything runs on one OS thread, so torch's thread-local state (no_grad, thread
counts) and OpenMP's thread team are the caller's. With a thread per batch the same block took 1.2x the time
of plain forward passes (each thread has its own OpenMP team; measured on SmolLM2, 2 cores), with greenlets
1.05x.

Only blocks that call each target exactly once, in the order one traced batch showed, run this way; a batch
that reaches the linears otherwise (token routing, a weight called twice) raises ``NotSequential`` after
every batch has stopped, and the caller runs the block the two-pass way. Batches run one at a time in a fixed
order, so the order of every operation, and the result, is the same in every run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import greenlet

import torch
from torch import nn

from lowbit.pipeline.layers import BlockInput, run_block

DONE = -1  # where a batch is once its forward pass has ended (group indices are >= 0)

# Quantizes one group (its target names in call order) from the statistics its inputs were added to, and puts
# the quantized weights into the block for the rest of the pass.
QuantizeGroup = Callable[[list[str], Any], None]


class NotSequential(Exception):
    """The block could not be run one group at a time (the batches reached its linears otherwise than traced,
    or the caller gave up on a group); nothing it quantized should be kept."""


class _Abort(Exception):
    """Raised inside a batch's forward pass to end it."""


def trace_calls(block: nn.Module, targets: dict[str, nn.Module], batch: BlockInput) -> dict[str, int] | None:
    """Run one batch through ``block``: each target, in the order they are called, with the index of the
    distinct input tensor it read (targets reading the same tensor share an index); None when some target is
    not called exactly once."""
    calls: dict[str, int] = {}
    counts = {name: 0 for name in targets}
    inputs: list[torch.Tensor] = []  # kept alive, so that identity says "the same tensor"

    def make_hook(name: str):
        def hook(_module, args):
            counts[name] += 1
            x = args[0]
            index = next((i for i, seen in enumerate(inputs) if seen is x), None)
            if index is None:
                inputs.append(x)
                index = len(inputs) - 1
            calls.setdefault(name, index)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    try:
        run_block(block, [batch])
    finally:
        for h in handles:
            h.remove()
    return calls if all(c == 1 for c in counts.values()) else None


def run_sequential(block: nn.Module, batches: list[BlockInput], targets: dict[str, nn.Module], groups: list[list[str]],
                   new_stats: Callable[[int], Any], quantize: QuantizeGroup) -> list[torch.Tensor]:
    """Every batch through ``block`` once, each group of ``groups`` (target names in call order, groups in call
    order) quantized by ``quantize`` when every batch has added its input to the group's statistics
    (``new_stats(features)``, updated with ``.update(x)``); returns each batch's output hidden states.

    Raises ``NotSequential`` (every batch stopped) when the batches do not reach the groups in this order, or
    when ``quantize`` raises it; any other exception of a batch or of ``quantize`` is raised as it is."""
    n = len(batches)
    group_of = {name: g for g, group in enumerate(groups) for name in group}
    module_name = {id(targets[name]): name for name in group_of}
    caller = greenlet.getcurrent()
    index_of: dict[greenlet.greenlet, int] = {}  # the batch greenlets of this pass
    where: list[int | None] = [None] * n  # the group each batch waits at, DONE, or None before it starts
    outputs: list[torch.Tensor | None] = [None] * n
    errors: list[BaseException] = []
    stats: dict[int, Any] = {}
    held: dict[tuple[int, int], torch.Tensor] = {}  # (batch, group) -> the input its first linear read
    state = {"quantized": -1, "diverged": False}

    def hook(module, args):
        k = index_of.get(greenlet.getcurrent())
        if k is None:  # not one of this pass's batches
            return
        name = module_name[id(module)]
        g, x = group_of[name], args[0]
        if g <= state["quantized"]:  # a later linear of a quantized group: it must read the first one's input
            first = held.get((k, g))
            if first is None or first is not x:
                state["diverged"] = True
                raise _Abort
            if name == groups[g][-1]:
                del held[(k, g)]
            return
        if name != groups[g][0] or g != state["quantized"] + 1:  # reached out of the traced order
            state["diverged"] = True
            raise _Abort
        if g not in stats:
            stats[g] = new_stats(x.shape[-1])
        stats[g].update(x)
        if len(groups[g]) > 1:
            held[(k, g)] = x
        where[k] = g
        caller.switch()  # back to the loop below; resumed (or stopped by _Abort thrown in) on the next turn

    def work(k: int) -> None:
        try:  # grad mode is the thread's, so the caller's no_grad below holds here too
            out = block(batches[k].hidden, **batches[k].kwargs)
            outputs[k] = out[0] if isinstance(out, tuple) else out
        except _Abort:
            pass
        except BaseException as exc:  # handed to the caller, raised there
            errors.append(exc)
        finally:
            where[k] = DONE

    handles = [targets[name].register_forward_pre_hook(hook) for name in group_of]
    runs = [greenlet.greenlet(functools.partial(work, k), parent=caller) for k in range(n)]
    index_of.update({run: k for k, run in enumerate(runs)})
    with torch.no_grad():
        try:
            for g in range(len(groups) + 1):
                for k, run in enumerate(runs):
                    if where[k] != DONE:
                        run.switch()
                if errors:
                    raise errors[0]
                expected = DONE if g == len(groups) else g
                if state["diverged"] or any(w != expected for w in where):
                    raise NotSequential(f"the batches did not reach the linears in the traced order (group {g})")
                if g < len(groups):
                    quantize(groups[g], stats.pop(g))
                    state["quantized"] = g
        finally:
            for run in runs:  # a batch still paused in a hook unwinds from there (its forward pass ends)
                if run and not run.dead:
                    run.throw(_Abort)
            for h in handles:
                h.remove()
    return [o for o in outputs if o is not None]
