"""LM comparison metrics against direct formulas on a toy model whose logits we control."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.eval.lm import compare_lm, lm_reference


class TableLM(nn.Module):
    """Logits are a fixed table row per input token: easy to compute the metrics by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_identical_models_agree_perfectly():
    torch.manual_seed(0)
    model = TableLM(torch.randn(11, 11))
    windows = torch.randint(0, 11, (3, 20))
    ref = lm_reference(model, windows, progress=False)
    m = compare_lm(model, ref, progress=False)
    assert m["kld"] == pytest.approx(0.0, abs=1e-7)
    assert m["top1"] == 1.0
    assert m["ppl"] == pytest.approx(m["ppl_base"], rel=1e-6)


def test_metrics_match_hand_formulas():
    torch.manual_seed(1)
    base, other = TableLM(torch.randn(7, 7)), TableLM(torch.randn(7, 7))
    windows = torch.randint(0, 7, (2, 9))
    m = compare_lm(other, lm_reference(base, windows, progress=False), progress=False)
    p = torch.log_softmax(base.table.detach()[windows[:, :-1]], -1)
    q = torch.log_softmax(other.table.detach()[windows[:, :-1]], -1)
    targets = windows[:, 1:, None]
    assert m["ppl_base"] == pytest.approx(math.exp(float(-p.gather(-1, targets).mean())), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(float(-q.gather(-1, targets).mean())), rel=1e-5)
    assert m["kld"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)
    assert m["top1"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))


def test_reference_logprobs_are_spilled_and_read_back_exactly():
    torch.manual_seed(2)
    model = TableLM(torch.randn(13, 13))
    windows = torch.randint(0, 13, (4, 10))
    ref = lm_reference(model, windows, progress=False)
    assert not isinstance(ref.logprobs, list) and len(ref.logprobs) == 4
    expected = torch.log_softmax(model.table.detach()[windows[:, :-1]], -1)
    for i, lp in enumerate(ref.logprobs):
        assert torch.equal(lp, expected[i])
    assert torch.equal(ref.logprobs[-1], expected[3]) and len(ref.logprobs[1:3]) == 2


def test_reference_held_in_a_plain_list_gives_the_same_metrics():
    from lowbit.eval.lm import LMReference

    torch.manual_seed(3)
    base, other = TableLM(torch.randn(9, 9)), TableLM(torch.randn(9, 9))
    windows = torch.randint(0, 9, (3, 200))
    ref = lm_reference(base, windows, progress=False)
    in_memory = LMReference(windows=windows, logprobs=list(ref.logprobs), nll_sum=ref.nll_sum)
    assert compare_lm(other, ref, progress=False) == compare_lm(other, in_memory, progress=False)


def test_fp16_store_halves_the_file_and_moves_the_kld_by_well_under_one_percent():
    torch.manual_seed(3)
    vocab = 3000
    base = TableLM(torch.randn(vocab, vocab) * 3)
    other = TableLM(base.table.detach() + 0.3 * torch.randn(vocab, vocab))
    windows = torch.randint(0, vocab, (3, 40))
    exact = lm_reference(base, windows, progress=False)
    compact = lm_reference(base, windows, progress=False, store="fp16")
    for i in range(3):  # fp16 of the same values, read back as float32
        assert torch.equal(compact.logprobs[i], exact.logprobs[i].half().float())
    assert compact.logprobs._file.seek(0, 2) * 2 == exact.logprobs._file.seek(0, 2)
    assert compact.ppl == exact.ppl  # the NLL comes from the exact values
    k_exact = compare_lm(other, exact, progress=False)["kld"]
    k_compact = compare_lm(other, compact, progress=False)["kld"]
    assert k_exact > 0.01 and abs(k_compact - k_exact) < 1e-3 * k_exact, (k_exact, k_compact)
