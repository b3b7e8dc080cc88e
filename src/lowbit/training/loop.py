"""The QAT loop for a causal LM: distil the original into its fake-quantized twin, resumably.

One optimizer step sees ``batch_windows`` training windows (in micro-batches of ``micro_batch``, gradients
accumulated). AdamW with three parameter groups (latent weights, quantization steps/zero points, norms and
other float parameters that train), linear warm-up then cosine decay; gradient-norm clipping; gradient
checkpointing through the model's own support (transformers) so activations of one block at a time are kept;
bf16 autocast where the CPU (or a GPU) runs bf16 natively. Every ``eval_every`` steps the KLD on the held-out
monitor windows is logged; every ``checkpoint_every`` steps the state is saved (lowbit.training.state) so a
killed run continues with ``resume``. A non-finite loss stops training with a one-line error; the last saved
state is the last good one.

The data order is a pure function of (seed, step), so a resumed run sees the windows the uninterrupted run
would have seen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.training.distill import distillation_loss, next_token_logprobs
from lowbit.training.fake_quant import qat_parameters
from lowbit.training.state import TrainState, has_state, load_state, save_state, saved_step


@dataclass(frozen=True)
class TrainOptions:
    """Optimizer, schedule and bookkeeping of one QAT run."""

    steps: int = 200
    batch_windows: int = 4
    micro_batch: int = 2
    lr_weights: float = 2e-4
    lr_quant: float = 1e-4
    lr_norms: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    ce_weight: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 25
    checkpoint_every: int = 25
    max_minutes: float | None = None
    seed: int = 0
    dtype: str = "auto"  # auto | bf16 | fp32
    checkpointing: bool = True  # recompute block activations in the backward pass (less memory, ~1/3 more time)


def lr_factor(step: int, options: TrainOptions) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    span = max(1, options.steps - options.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - options.warmup_steps) / span)))


def window_order(n_windows: int, step: int, options: TrainOptions) -> list[int]:
    """The training windows of optimizer step ``step``: epochs of seeded permutations, a function of the step."""
    picks = []
    for k in range(step * options.batch_windows, (step + 1) * options.batch_windows):
        epoch, pos = divmod(k, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(options.seed * 100003 + epoch))
        picks.append(int(perm[pos]))
    return picks


def build_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW over the QAT weights, the quantization parameters and the other trainable float parameters."""
    return qat_optimizer(model, options.lr_weights, options.lr_quant, options.lr_norms, options.weight_decay)


def qat_optimizer(module: nn.Module, lr_weights: float, lr_quant: float, lr_norms: float,
                  weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with three groups over ``module``'s trainable parameters: QATLinear latent weights (and biases),
    their steps and zero points, and every other float parameter that trains (norms)."""
    groups = qat_parameters(module)
    taken = {id(p) for ps in groups.values() for p in ps}
    others = [p for p in module.parameters() if p.requires_grad and id(p) not in taken]
    return torch.optim.AdamW([
        {"params": groups["weights"], "lr": lr_weights, "weight_decay": weight_decay},
        {"params": groups["quant"], "lr": lr_quant, "weight_decay": 0.0},
        {"params": others, "lr": lr_norms, "weight_decay": 0.0},
    ], betas=(0.9, 0.95), eps=1e-10)


@dataclass
class Monitor:
    """Held-out windows and the teacher's log-probabilities on them (computed once)."""

    ids: torch.Tensor
    teacher_logprobs: list[torch.Tensor]


def make_monitor(teacher: nn.Module, ids: torch.Tensor, autocast: Callable) -> Monitor:
    with torch.no_grad(), autocast():
        logprobs = [next_token_logprobs(teacher(ids[i: i + 1]).logits) for i in range(ids.shape[0])]
    return Monitor(ids, logprobs)


@torch.no_grad()
def monitor_kld(model: nn.Module, monitor: Monitor, autocast: Callable) -> float:
    total = 0.0
    was_training = model.training
    model.eval()
    with autocast():
        for i in range(monitor.ids.shape[0]):
            _, kl = distillation_loss(model(monitor.ids[i: i + 1]).logits, monitor.teacher_logprobs[i],
                                      monitor.ids[i: i + 1])
            total += kl
    model.train(was_training)
    return total / monitor.ids.shape[0]


def train(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, monitor_ids: torch.Tensor,
          options: TrainOptions, state_dir: Path, fingerprint: str, resume: bool = False,
          progress: bool = True) -> TrainState:
    """Train ``model`` (with QATLinear layers) to match ``teacher`` on ``windows`` (n, length); returns the state."""
    if windows.shape[0] < options.batch_windows:
        raise LowbitError(f"the training text gives {windows.shape[0]} windows of {windows.shape[1]} tokens, fewer "
                          f"than one batch ({options.batch_windows}); give more text or a smaller --batch")
    if options.batch_windows % options.micro_batch:
        raise LowbitError(f"--batch ({options.batch_windows}) must be a multiple of --micro-batch ({options.micro_batch})")
    autocast = autocast_factory(options.dtype, windows.device)
    _prepare_for_training(model, options.checkpointing)
    optimizer = build_optimizer(model, options)
    state = TrainState()
    if resume and has_state(state_dir):
        state = load_state(state_dir, model, optimizer, fingerprint)
    monitor = make_monitor(teacher, monitor_ids, autocast)
    if not state.history:
        state.history.append({"step": 0, "monitor_kld": monitor_kld(model, monitor, autocast)})
    start, begun = time.perf_counter(), state.seconds
    bar = tqdm(total=options.steps, initial=state.step, desc="QAT", disable=not progress)
    while state.step < options.steps:
        for group, base in zip(optimizer.param_groups, (options.lr_weights, options.lr_quant, options.lr_norms)):
            group["lr"] = base * lr_factor(state.step, options)
        loss_value = _accumulate(model, teacher, windows, window_order(windows.shape[0], state.step, options),
                                 options, autocast)
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            raise LowbitError(f"the QAT loss became {loss_value} at step {state.step + 1}; training stopped, the "
                              f"last good state is in {state_dir} (step {saved_step(state_dir) or 'none saved yet'}); "
                              "try a lower "
                              "learning rate")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        _check_gradients(model)
        torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.seconds = begun + time.perf_counter() - start
        record: dict[str, float] = {"step": state.step, "loss": loss_value, "seconds": round(state.seconds, 1)}
        if state.step % options.eval_every == 0 or state.step == options.steps:
            record["monitor_kld"] = monitor_kld(model, monitor, autocast)
        state.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", kld=f"{_last_monitor(state):.4f}")
        if state.step % options.checkpoint_every == 0 or state.step == options.steps:
            save_state(state_dir, model, optimizer, state, fingerprint)
        if options.max_minutes is not None and state.seconds > 60 * options.max_minutes:
            save_state(state_dir, model, optimizer, state, fingerprint)
            break
    bar.close()
    model.eval()
    return state


def _accumulate(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, picks: list[int],
                options: TrainOptions, autocast: Callable) -> float:
    """Forward/backward of one optimizer step's windows in micro-batches; the mean loss."""
    total = 0.0
    n_micro = len(picks) // options.micro_batch
    for m in range(n_micro):
        ids = windows[picks[m * options.micro_batch: (m + 1) * options.micro_batch]]
        with torch.no_grad(), autocast():
            target = next_token_logprobs(teacher(ids).logits)
        with autocast():
            loss, _ = distillation_loss(model(ids).logits, target, ids, options.ce_weight)
        if not torch.isfinite(loss):
            return float(loss.detach())
        (loss / n_micro).backward()
        total += float(loss.detach()) / n_micro
    return total


def _check_gradients(model: nn.Module) -> None:
    """Refuse a model in which some quantized layer gets no gradient (detached, or not on the loss's path)."""
    from lowbit.training.fake_quant import QATLinear

    dead = [name for name, m in model.named_modules() if isinstance(m, QATLinear) and m.weight.grad is None]
    if dead:
        raise LowbitError(f"QAT gets no gradient through {len(dead)} quantized layer(s), e.g. {dead[0]}: the model "
                          "detaches or skips them, so they cannot be trained")


def _prepare_for_training(model: nn.Module, checkpointing: bool) -> None:
    """Train mode with dropout off (distillation wants the deterministic function), checkpointed blocks."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    if checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


def autocast_factory(dtype: str, device: torch.device) -> Callable:
    """A no-argument context factory: bf16 autocast where ``dtype`` asks for it (auto: where the device runs
    bf16 natively), else a disabled autocast."""
    from lowbit.hardware import cpu_has_bf16

    use_bf16 = dtype == "bf16" or (dtype == "auto" and (device.type == "cuda" or cpu_has_bf16()))
    if not use_bf16:
        return lambda: torch.autocast(device.type, enabled=False)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _last_monitor(state: TrainState) -> float:
    for record in reversed(state.history):
        if "monitor_kld" in record:
            return record["monitor_kld"]
    return float("nan")
