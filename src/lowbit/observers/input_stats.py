"""Statistics of a linear layer's inputs, accumulated batch by batch in one pass.

One accumulator serves every consumer: GPTQ needs the Hessian H = 2/n * sum x x^T, AWQ the mean |x| per
input channel, SmoothQuant the max |x| per channel, k-quants the importance (mean x^2 per channel,
llama.cpp's imatrix, which is diag(H) / 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    """Running sums over every input row (token) a linear layer saw."""

    features: int
    want_hessian: bool = True
    sample_rows: int = 0
    product_dtype: torch.dtype = torch.float32
    want_abs: bool = True  # per-channel |x| sum and max (AWQ, SmoothQuant, static ranges); False leaves them 0
    count: int = 0
    abs_sum: torch.Tensor = field(init=False)
    abs_max: torch.Tensor = field(init=False)
    # sum x x^T, only the blocks on and above the diagonal (``add_gram``); ``xtx`` is the whole symmetric matrix
    gram_upper: torch.Tensor | None = field(init=False)
    rows: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.abs_sum = torch.zeros(self.features, dtype=torch.float64)
        self.abs_max = torch.zeros(self.features)
        self.gram_upper = torch.zeros(self.features, self.features) if self.want_hessian else None

    @property
    def xtx(self) -> torch.Tensor | None:
        """sum x x^T over every input row, float32 (None when the Hessian is not collected)."""
        return None if self.gram_upper is None else mirror_upper(self.gram_upper)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape (..., features)."""
        x = x.detach().reshape(-1, self.features).cpu()  # a bf16 pass's inputs are used as they are: no fp32 copy
        self.count += x.shape[0]
        if self.want_abs:
            a = x.abs()
            self.abs_sum += a.sum(0, dtype=torch.float32).double()  # one batch in fp32, the running sum in fp64
            self.abs_max = torch.maximum(self.abs_max, a.amax(0).float())
        if self.gram_upper is not None:  # bf16 products (where asked) are summed in fp32, batch by batch
            add_gram(self.gram_upper, x.to(self.product_dtype))
        if self.sample_rows:
            g = torch.Generator().manual_seed(self.count)
            self.rows.append(x[torch.randperm(x.shape[0], generator=g)[: self.sample_rows]].float())

    def finite(self) -> bool:
        """Whether every statistic is free of NaN/Inf (an overflowing pass makes them inf, then NaN)."""
        parts = [self.abs_sum, self.abs_max, *([self.gram_upper] if self.gram_upper is not None else []), *self.rows]
        return all(bool(torch.isfinite(t).all()) for t in parts)

    def hessian(self) -> torch.Tensor:
        """H = 2/n * X^T X (GPTQ's normalization), float32."""
        assert self.gram_upper is not None, "Hessian was not collected"
        return mirror_upper(self.gram_upper).mul_(2.0 / max(self.count, 1))

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel."""
        return (self.abs_sum / max(self.count, 1)).float()

    def abs_sample(self):
        """The exact max |x| and the sampled rows' |x| values, for static activation range observers."""
        from lowbit.observers.ranges import AbsSample

        values = torch.cat(self.rows).abs().reshape(-1) if self.rows else torch.zeros(1)
        return AbsSample(amax=float(self.abs_max.max()), chunks=[values])

    def importance(self) -> torch.Tensor:
        """Mean x^2 per input channel (llama.cpp's importance matrix)."""
        assert self.gram_upper is not None, "Hessian was not collected"
        return self.gram_upper.diagonal() / max(self.count, 1)


GRAM_CHUNK = 192  # fewest columns per block of X^T X: small enough to skip most of the lower half, big enough for
# fast GEMMs


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x^T x`` (fp32) on the blocks on and above the diagonal only; ``mirror_upper`` gives the whole.

    X^T X is symmetric, so its lower half repeats the upper. Products of row blocks of ``GRAM_CHUNK`` or more
    columns by the columns from their diagonal on, added in place and mirrored once when read (not every batch):
    on 4096 bf16 rows, 1536 features take 38 ms against 65 ms for the full product (49 ms when every batch also
    mirrored its blocks), 576 features 7 ms against 9.5; each entry is the same dot product over the rows."""
    features = x.shape[1]
    chunk = max(GRAM_CHUNK, features // 6)  # measured: 1536 features are fastest in blocks of 256
    for i in range(0, features, chunk):
        j = min(i + chunk, features)
        acc[i:j, i:].add_(x[:, i:j].T @ x[:, i:])


def mirror_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s; a new tensor."""
    return upper.triu() + upper.triu(1).T


def rescale_inputs(stats: InputStats, scales: torch.Tensor) -> None:
    """Update the statistics in place for inputs divided by ``scales`` per channel (after an AWQ/SmoothQuant fold)."""
    s = scales.float()
    stats.abs_sum /= s.double()
    stats.abs_max /= s
    if stats.gram_upper is not None:
        stats.gram_upper /= s[:, None] * s[None, :]
    stats.rows = [r / s for r in stats.rows]
