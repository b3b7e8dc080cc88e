"""Deterministic training of a classifier on in-memory tensors, with a NaN guard, and top-1 accuracy.

Float training and QAT share this loop. Determinism: a seeded generator orders the batches, torch's
deterministic algorithms are on and one intra-op thread is used while training (reductions then add in one
order), so the same config gives the same weights bit for bit on this machine. A non-finite loss stops
training with a one-line LowbitError after the model is put back to its state at the end of the last
complete epoch (its last good state).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer settings: ``optimizer`` (adamw, or sgd with momentum 0.9) with a cosine schedule over ``epochs``.

    QAT uses SGD: LSQ's gradient scaling sets how fast step sizes move relative to weights, and Adam's
    per-parameter normalization would undo it (a tiny 8-bit step would move by ~lr per update).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise LowbitError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise LowbitError(f"epochs, batch size and learning rate must be positive, got {self}")


OPTIMIZERS = {
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=0.9, weight_decay=c.weight_decay),
}


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count inside the block; the caller's settings after it."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, what: str = "training") -> nn.Module:
    """Train ``model`` in place on (x, y) with cross-entropy; returns it in eval mode."""
    if len(y) < config.batch_size:
        raise LowbitError(f"{what}: {len(y)} samples are fewer than one batch of {config.batch_size}; "
                          "lower the batch size or add data")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[config.optimizer](params, config)
    steps_per_epoch = len(y) // config.batch_size
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    with deterministic():
        model.train()
        for epoch in range(config.epochs):
            good = copy.deepcopy(model.state_dict())
            order = torch.randperm(len(y), generator=gen)
            for step in range(steps_per_epoch):
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                loss = loss_fn(model(x[idx]), y[idx])
                if not bool(torch.isfinite(loss)):
                    model.load_state_dict(good)
                    model.eval()
                    raise LowbitError(f"{what}: loss is {float(loss.detach())} at epoch {epoch + 1} step {step + 1}; "
                                      f"the model keeps its state after epoch {epoch}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for ``x``, computed in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((predict(model, x).argmax(-1) == y).float().mean())
