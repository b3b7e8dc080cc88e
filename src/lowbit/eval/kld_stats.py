"""The distribution of the per-token divergence between two models, as ``llama-perplexity --kl-divergence`` reports it.

A mean KL divergence hides its tail: two quantizations with the same mean can differ tenfold in how often
they wreck a token. llama.cpp therefore prints, besides the mean, the median and high percentiles of the
per-token KL(base || test), how often the two argmaxes agree, the RMS change of the probability of the
token that actually came next (Δp), and ln(PPL(test)/PPL(base)) with standard errors. ``DivergenceStats``
computes the same numbers from log-probabilities fed one block of positions at a time, keeping only
per-position scalars (never a [positions, vocab] array), so memory grows with the tokens evaluated, not the
vocabulary.

Definitions follow llama.cpp's tools/perplexity (function ``kl_divergence``), written here from scratch:
- KL per position is summed over the whole vocabulary (llama.cpp's stored 16-bit base log-probs drop terms
  below e^-16; ours are exact float32, so nothing is dropped);
- a standard error is sqrt(population variance / (n - 1)), i.e. the sample standard deviation / sqrt(n),
  for every mean, including the same-top-1 rate (sqrt(p(1-p)/(n-1)));
- percentiles interpolate linearly between the sorted values at fraction * (n - 1), the median averages the
  two middle values;
- RMS Δp is sqrt(mean(Δp²)) and its error 0.5 / RMS * stderr(Δp²);
- the error of ln(PPL ratio) uses the covariance of the two NLLs, which is the standard error of the
  per-token NLL difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError

# summary key -> fraction of the sorted per-token KL values (the percentiles llama.cpp prints)
KLD_PERCENTILES = {"kld_p90": 0.90, "kld_p99": 0.99, "kld_p999": 0.999}


@dataclass(frozen=True)
class PositionValues:
    """Per-position scalars of one block (all 1-D, one entry per position)."""

    kld: torch.Tensor  # KL(base || test)
    same_top1: torch.Tensor  # bool: argmaxes agree
    logp_base: torch.Tensor  # log p_base(target)
    logp_test: torch.Tensor  # log p_test(target)


def position_values(base: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> PositionValues:
    """Per-position KL(base || test), argmax agreement and target log-probs of one block of log-probabilities
    ([n, vocab] each; ``targets`` [n] token ids)."""
    kld = (base.exp() * (base - test)).sum(-1)
    return values_from_terms(kld, base.argmax(-1) == test.argmax(-1), base, test, targets)


def values_from_terms(kld: torch.Tensor, same_top1: torch.Tensor, base: torch.Tensor, test: torch.Tensor,
                      targets: torch.Tensor) -> PositionValues:
    """``PositionValues`` from a per-position KL and agreement the caller already computed (so a loop that
    also needs the KL terms for its own sums does not exponentiate the [n, vocab] block twice)."""
    t = targets.reshape(-1, 1).to(base.device, torch.long)
    return PositionValues(kld=kld, same_top1=same_top1, logp_base=base.gather(1, t)[:, 0],
                          logp_test=test.gather(1, t)[:, 0])


def _stderr(values: np.ndarray) -> float:
    """llama.cpp's uncertainty of a mean: sqrt((E[x²] - E[x]²) / (n - 1)); 0 for fewer than two values."""
    n = values.size
    if n < 2:
        return 0.0
    mean = values.mean()
    return math.sqrt(max(float((values * values).mean() - mean * mean), 0.0) / (n - 1))


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation at ``fraction * (n - 1)`` of ascending values (llama.cpp's ``percentile``)."""
    return float(np.percentile(sorted_values, 100.0 * fraction, method="linear"))


class DivergenceStats:
    """Accumulates per-position divergence values over blocks of positions; ``summary()`` gives the
    llama.cpp-style statistics. Memory: five scalars per position."""

    def __init__(self) -> None:
        self._blocks: list[tuple[np.ndarray, ...]] = []

    def add(self, base: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> None:
        """One block: base and test log-probabilities [n, vocab], the tokens that came next [n]."""
        self.add_values(position_values(base, test, targets))

    def add_values(self, values: PositionValues) -> None:
        """One block of already computed per-position values."""
        def f64(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy().reshape(-1)

        lp_base, lp_test = f64(values.logp_base), f64(values.logp_test)
        self._blocks.append((f64(values.kld), values.same_top1.detach().cpu().numpy().reshape(-1).astype(bool),
                             np.exp(lp_test) - np.exp(lp_base), lp_base - lp_test))

    @property
    def n(self) -> int:
        """Positions accumulated so far."""
        return sum(block[0].size for block in self._blocks)

    def _column(self, i: int) -> np.ndarray:
        return np.concatenate([block[i] for block in self._blocks])

    def summary(self, what: str = "the quantized model") -> dict[str, float | int]:
        """The statistics as plain floats (and ``n``); raises ``LowbitError`` if any is NaN/Inf or nothing
        was added, naming ``what`` was evaluated (a non-finite result is an error, never a row)."""
        if not self._blocks:
            raise LowbitError(f"no positions were evaluated for {what}; the KL-divergence statistics are empty")
        kld, same, dp, nll_diff = (self._column(i) for i in range(4))
        out = _kld_distribution(np.sort(kld)) | _agreement(same.astype(np.float64)) | _delta_p(dp)
        out |= _ppl_ratio(nll_diff)
        _check_finite(out, what)
        return out | {"n": int(kld.size)}


def _kld_distribution(sorted_kld: np.ndarray) -> dict[str, float]:
    """Mean ± stderr, median, high percentiles and extremes of the ascending per-position KL values."""
    out = {"kld_mean": float(sorted_kld.mean()), "kld_stderr": _stderr(sorted_kld),
           "kld_median": float(np.median(sorted_kld))}
    out |= {key: _percentile(sorted_kld, q) for key, q in KLD_PERCENTILES.items()}
    return out | {"kld_max": float(sorted_kld[-1]), "kld_min": float(sorted_kld[0])}


def _agreement(same: np.ndarray) -> dict[str, float]:
    """Share of positions whose argmaxes agree, with its binomial standard error."""
    return {"same_top1": float(same.mean()), "same_top1_stderr": _stderr(same)}


def _delta_p(dp: np.ndarray) -> dict[str, float]:
    """RMS of p_test(target) - p_base(target) and its error (propagated from the mean of Δp²)."""
    squares = dp * dp
    rms = math.sqrt(float(squares.mean()))
    return {"rms_dp": rms, "rms_dp_stderr": 0.5 / rms * _stderr(squares) if rms > 0 else 0.0}


def _ppl_ratio(nll_diff: np.ndarray) -> dict[str, float]:
    """Mean per-token NLL_test - NLL_base = ln(PPL_test / PPL_base), its error and the ratio itself."""
    mean = float(nll_diff.mean())
    with np.errstate(over="ignore"):  # an overflow is reported as inf by the finiteness check, not raised here
        ratio = float(np.exp(mean))
    return {"ln_ppl_ratio": mean, "ln_ppl_ratio_stderr": _stderr(nll_diff), "ppl_ratio": ratio}


def _check_finite(stats: dict[str, float], what: str) -> None:
    bad = [f"{k}={v}" for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        raise LowbitError(f"evaluating {what} gave NaN/Inf KL-divergence statistics ({', '.join(bad)}); "
                          "its outputs are not finite")
