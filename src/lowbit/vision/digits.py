"""scikit-learn's bundled digits (1797 8x8 grey images, no download) as a fixed, normalized train/test split.

The split is a seeded permutation, so every run and every machine sees the same test images; pixels are
scaled by the training split's mean and standard deviation only (the test split never informs training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class DigitsSplit:
    """Normalized images (N, 1, 8, 8) float32 and labels (N,) int64 for training and testing."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The digits data split by a permutation seeded with ``seed``; ``test_fraction`` of it is held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LowbitError("the digits data needs scikit-learn; install it with 'pip install scikit-learn'") from None
    if not 0.0 < test_fraction < 1.0:
        raise LowbitError(f"test fraction must be between 0 and 1, got {test_fraction}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    mean, std = float(x[train].mean()), float(x[train].std())
    norm = lambda t: (t - mean) / std  # noqa: E731
    return DigitsSplit(norm(x[train]), y[train], norm(x[test]), y[test], mean, std)
