"""KL-divergence distribution statistics against independent numpy formulas on random log-probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.kld_stats import DivergenceStats
from lowbit.eval.llamacpp import compare_logprobs
from lowbit.eval.lm import divergence_sums

VOCAB = 50


def random_logprobs(windows: int, length: int, seed: int, noise: float = 0.5):
    """(base, test) log-probs per window [length - 1, VOCAB] and the token windows [windows, length]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(windows, length - 1, VOCAB, generator=g) * 2
    base = torch.log_softmax(logits, -1)
    test = torch.log_softmax(logits + noise * torch.randn(logits.shape, generator=g), -1)
    ids = torch.randint(0, VOCAB, (windows, length), generator=g)
    return list(base), list(test), ids


def reference(base: list[torch.Tensor], test: list[torch.Tensor], ids: torch.Tensor) -> dict[str, float]:
    """The statistics, one position at a time in float64 numpy (a slow, obviously-correct loop)."""
    kld, same, dp, diff = [], [], [], []
    for b_win, q_win, w in zip(base, test, ids):
        for b, q, t in zip(b_win.double().numpy(), q_win.double().numpy(), w[1:].numpy()):
            kld.append(float(np.sum(np.exp(b) * (b - q))))
            same.append(float(np.argmax(b) == np.argmax(q)))
            dp.append(math.exp(q[t]) - math.exp(b[t]))
            diff.append(-q[t] + b[t])
    kld, same, dp, diff = map(np.array, (kld, same, dp, diff))
    n = len(kld)
    s = np.sort(kld)

    def pct(f: float) -> float:  # llama.cpp: interpolate at f * (n - 1)
        p = f * (n - 1)
        i = int(p)
        return float((1 - (p - i)) * s[i] + (p - i) * s[min(i + 1, n - 1)])

    median = (s[n // 2] + s[n // 2 - 1]) / 2 if n % 2 == 0 else s[n // 2]
    p_top = same.mean()
    return {"kld_mean": kld.mean(), "kld_stderr": kld.std(ddof=1) / math.sqrt(n), "kld_median": median,
            "kld_p90": pct(0.9), "kld_p99": pct(0.99), "kld_p999": pct(0.999), "kld_max": s[-1], "kld_min": s[0],
            "same_top1": p_top, "same_top1_stderr": math.sqrt(p_top * (1 - p_top) / (n - 1)),
            "rms_dp": math.sqrt(np.mean(dp ** 2)), "ln_ppl_ratio": diff.mean(),
            "ln_ppl_ratio_stderr": diff.std(ddof=1) / math.sqrt(n), "ppl_ratio": math.exp(diff.mean()), "n": n}


def test_summary_matches_independent_formulas():
    base, test, ids = random_logprobs(3, 101, seed=0)  # 300 positions: even count, so the median averages two
    stats = DivergenceStats()
    for b, q, w in zip(base, test, ids):
        for start in range(0, b.shape[0], 7):  # uneven blocks
            stats.add(b[start:start + 7], q[start:start + 7], w[1:][start:start + 7])
    got, want = stats.summary(), reference(base, test, ids)
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert got["n"] == 300 and isinstance(got["n"], int)
    assert all(isinstance(v, float) for k, v in got.items() if k != "n")  # plain floats: report.json
    assert 0 < got["same_top1"] < 1 and got["kld_min"] <= got["kld_median"] <= got["kld_p90"] <= got["kld_max"]


def test_odd_count_median():
    base, test, ids = random_logprobs(1, 10, seed=4)  # 9 positions
    stats = DivergenceStats()
    stats.add(base[0], test[0], ids[0, 1:])
    assert stats.summary()["kld_median"] == pytest.approx(reference(base, test, ids)["kld_median"], rel=1e-6)


def test_compare_logprobs_carries_stats_and_keeps_its_values():
    base, test, ids = random_logprobs(2, 150, seed=1)  # 149 rows per window: more than one 64-row block
    m = compare_logprobs(base, test, ids)
    assert set(m) == {"ppl_base", "ppl", "kld", "top1", "kld_stats"}
    sums = [divergence_sums(b, q) for b, q in zip(base, test)]
    n = 2 * 149
    assert m["kld"] == sum(s[0] for s in sums) / n  # the existing value, computed exactly as before
    assert m["top1"] == sum(s[1] for s in sums) / n
    st = m["kld_stats"]
    assert st["kld_mean"] == pytest.approx(m["kld"], rel=1e-6)
    assert st["same_top1"] == pytest.approx(m["top1"], abs=1e-12)
    assert st["ppl_ratio"] == pytest.approx(m["ppl"] / m["ppl_base"], rel=1e-5)
    assert st["n"] == n


def test_identical_logprobs_give_zeros():
    base, _, ids = random_logprobs(2, 40, seed=2)
    st = compare_logprobs(base, base, ids)["kld_stats"]
    for key in ("kld_mean", "kld_stderr", "kld_median", "kld_p90", "kld_p99", "kld_p999", "kld_max", "kld_min",
                "same_top1_stderr", "rms_dp", "rms_dp_stderr", "ln_ppl_ratio", "ln_ppl_ratio_stderr"):
        assert st[key] == 0.0, key
    assert st["same_top1"] == 1.0 and st["ppl_ratio"] == 1.0


def test_nan_input_is_an_error():
    base, test, ids = random_logprobs(1, 20, seed=3)
    test[0][5, 3] = float("nan")
    with pytest.raises(LowbitError, match="NaN/Inf"):
        compare_logprobs(base, test, ids)


def test_empty_accumulator_is_an_error():
    with pytest.raises(LowbitError, match="no positions"):
        DivergenceStats().summary()


def test_divergence_sums_without_stats_is_unchanged():
    base, test, _ = random_logprobs(1, 200, seed=5)
    b, q = base[0], test[0]
    kld = sum(float((x.exp() * (x - y)).sum()) for x, y in zip(b.split(64), q.split(64)))
    agree = float((b.argmax(-1) == q.argmax(-1)).sum())
    assert divergence_sums(b, q) == (kld, agree)


def test_compare_lm_carries_stats_and_keeps_its_values():
    from lowbit.eval.lm import compare_lm, lm_reference
    from tests.eval.test_lm import TableLM

    torch.manual_seed(6)
    base, other = TableLM(torch.randn(VOCAB, VOCAB)), TableLM(torch.randn(VOCAB, VOCAB) * 0.5)
    windows = torch.randint(0, VOCAB, (2, 100))
    m = compare_lm(other, lm_reference(base, windows, progress=False), progress=False)
    assert set(m) == {"ppl_base", "ppl", "kld", "top1", "kld_stats"}
    p = list(torch.log_softmax(base.table.detach()[windows[:, :-1]], -1))
    q = list(torch.log_softmax(other.table.detach()[windows[:, :-1]], -1))
    want = reference(p, q, windows)
    for key, value in want.items():
        assert m["kld_stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert m["kld_stats"]["kld_mean"] == pytest.approx(m["kld"], rel=1e-6)
