"""Static activation ranges: the clipping threshold a per-tensor activation scale is built from.

Each observer sees the calibration activations of one tensor — the exact max |x| plus a bounded random
sample of |x| — and returns a threshold t (scale = t / max code). ``minmax`` takes the max; ``percentile``
a high quantile; ``mse`` the t minimizing the squared quantization error on the sample; ``kl`` the t
minimizing KL(P || Q) between the |x| histogram clipped at t and its quantized version (TensorRT's entropy
calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lowbit.errors import LowbitError


@dataclass
class AbsSample:
    """Exact max |x| and up to ``capacity`` randomly sampled |x| values of one activation tensor."""

    capacity: int = 1 << 20
    per_batch: int = 1 << 16
    amax: float = 0.0
    chunks: list = field(default_factory=list)
    seed: int = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of activations (any shape)."""
        a = x.detach().reshape(-1).abs().float().cpu()
        self.amax = max(self.amax, float(a.max()))
        g = torch.Generator().manual_seed(self.seed + len(self.chunks))
        if a.numel() > self.per_batch:
            a = a[torch.randint(0, a.numel(), (self.per_batch,), generator=g)]
        self.chunks.append(a)
        total = sum(c.numel() for c in self.chunks)
        if total > self.capacity:  # keep a uniform thinning of everything seen
            merged = torch.cat(self.chunks)
            self.chunks = [merged[torch.randperm(merged.numel(), generator=g)[: self.capacity // 2]]]

    def values(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.zeros(1)


def minmax_threshold(sample: AbsSample, levels: int) -> float:
    """The largest |x| seen."""
    return sample.amax


def percentile_threshold(sample: AbsSample, levels: int, q: float = 0.9999) -> float:
    """The q-quantile of |x| (default 99.99%)."""
    v = sample.values()
    k = max(1, min(v.numel(), int(round(q * v.numel()))))
    return float(v.kthvalue(k).values)


def mse_threshold(sample: AbsSample, levels: int, steps: int = 100) -> float:
    """The clip t in (0, max] minimizing mean (x - round-to-grid_t(x))^2 on the sample (symmetric grid)."""
    v = sample.values()
    best_t, best_err = sample.amax, float("inf")
    for i in range(steps, 0, -1):
        t = sample.amax * i / steps
        step = t / levels
        err = float(((torch.clamp(torch.round(v / step), 0, levels) * step - v) ** 2).mean())
        if err < best_err:
            best_t, best_err = t, err
    return best_t


def kl_threshold(sample: AbsSample, levels: int, bins: int = 2048) -> float:
    """TensorRT-style entropy calibration on a histogram of |x| with ``bins`` bins up to max |x|."""
    v = sample.values()
    hist = torch.histc(v, bins=bins, min=0.0, max=sample.amax).double()
    best_i, best_kl = bins, float("inf")
    for i in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        q = _quantize_histogram(hist[:i], levels)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return sample.amax * best_i / bins


def _quantize_histogram(h: torch.Tensor, levels: int) -> torch.Tensor:
    """Merge ``h`` into ``levels`` equal chunks and spread each chunk's mass over its non-empty bins."""
    n = h.numel()
    edges = torch.linspace(0, n, levels + 1).round().long()
    q = torch.zeros_like(h)
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        chunk = h[a:b]
        nonzero = chunk > 0
        if nonzero.any():
            q[a:b][nonzero] = chunk.sum() / nonzero.sum()
    return q


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum().clamp_min(1e-12)
    q = q / q.sum().clamp_min(1e-12)
    mask = p > 0
    q = q.clamp_min(1e-12)
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


RANGE_OBSERVERS: dict[str, Callable[[AbsSample, int], float]] = {
    "minmax": minmax_threshold,
    "percentile": percentile_threshold,
    "mse": mse_threshold,
    "kl": kl_threshold,
}


def get_range_observer(name: str) -> Callable[[AbsSample, int], float]:
    """The observer called ``name``, or a one-line error listing them."""
    try:
        return RANGE_OBSERVERS[name]
    except KeyError:
        raise LowbitError(f"unknown observer {name!r}; use one of {', '.join(RANGE_OBSERVERS)}") from None
