"""The fast end-to-end KLD (run from the changed block on) equals the full model's, on every decoder family."""

from __future__ import annotations

import pytest
import torch

from lowbit.analysis.measure import KLDProbe
from tests.arch_models import DECODERS, lowbit_model, random_ids


def _full_kld(model, windows, reference) -> float:
    with torch.no_grad():
        test = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
    return float((reference.exp() * (reference - test)).sum(-1).mean())


@pytest.mark.parametrize("family", DECODERS)
def test_kld_from_a_block_equals_the_full_forward(family):
    model = lowbit_model(family)
    windows = random_ids(2, 24)
    probe = KLDProbe(model, windows)
    reference = probe.reference.clone()
    blocks = probe.blocks
    last = len(blocks) - 1
    linear = next(m for m in blocks[last].modules() if isinstance(m, torch.nn.Linear))
    noisy = linear.weight.detach() + 0.05 * torch.randn_like(linear.weight)
    fast = probe.kld_with({linear.weight: noisy}, last)
    with probe.replaced({linear.weight: noisy}):
        full = _full_kld(model, windows, reference)
    assert fast > 1e-6
    assert fast == pytest.approx(full, rel=1e-4, abs=1e-9)
    # the model is restored exactly: no change, no divergence
    assert probe.kld(None) == pytest.approx(0.0, abs=1e-9)
    assert probe.kld(last) == pytest.approx(0.0, abs=1e-7)
