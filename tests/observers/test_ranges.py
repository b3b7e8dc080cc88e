"""Static range observers on distributions whose answers are known."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.observers.ranges import AbsSample, get_range_observer


def _sample(x: torch.Tensor, batches: int = 4) -> AbsSample:
    s = AbsSample()
    for chunk in x.chunk(batches):
        s.update(chunk)
    return s


def test_minmax_is_the_exact_max_even_when_subsampled():
    x = torch.randn(1_000_000)
    x[123_456] = 50.0
    s = _sample(x)
    assert get_range_observer("minmax")(s, 127) == 50.0
    assert s.values().numel() <= s.capacity


def test_percentile_of_uniform():
    x = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    t = get_range_observer("percentile")(_sample(x), 127)
    assert t == pytest.approx(0.9999, abs=2e-3)


@pytest.mark.parametrize("name", ["mse", "kl"])
def test_clipping_observers_clip_gaussian_tails_but_not_the_bulk(name):
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(1))
    s = _sample(x)
    t = get_range_observer(name)(s, 7)  # 4-bit-like grid: clipping clearly pays off
    assert 1.5 < t < 0.9 * s.amax


def test_mse_threshold_beats_minmax_on_heavy_tails():
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    s = _sample(x)
    v = s.values()

    def err(t, levels=127):
        step = t / levels
        return float(((torch.clamp(torch.round(v / step), 0, levels) * step - v) ** 2).mean())

    assert err(get_range_observer("mse")(s, 127)) < err(s.amax)


def test_unknown_observer():
    with pytest.raises(LowbitError, match="unknown observer"):
        get_range_observer("magic")
