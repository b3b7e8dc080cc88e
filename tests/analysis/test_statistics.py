"""The sensitivity pass's statistics: each linear's x x^T is the sum over its real inputs, and the linears that
read the same input (q/k/v, gate/up) share one such sum."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.analysis.statistics import collect_proxy_stats
from tests.arch_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_input_sums_are_exact_and_shared_by_readers_of_one_input(family):
    model = tiny_model(family).eval()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    stats = collect_proxy_stats(model, targets, windows, batch_size=2, progress=False)

    seen: dict[str, torch.Tensor] = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                                     for n, m in targets.items()}

    def hook(name):
        def add(_module, args):
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            seen[name] += flat.T @ flat
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    with torch.no_grad():
        for start in range(0, 4, 2):
            model(input_ids=windows[start:start + 2], use_cache=False)
    for h in handles:
        h.remove()

    for name, s in stats.linears.items():
        assert s.tokens == 4 * 24
        assert torch.allclose(s.xtx.double(), seen[name], rtol=1e-4, atol=1e-4), name
    layer = "model.layers.0"
    q, k, v = (stats.linears[f"{layer}.self_attn.{p}_proj"] for p in "qkv")
    gate, up = (stats.linears[f"{layer}.mlp.{p}_proj"] for p in ("gate", "up"))
    assert q.xtx is k.xtx is v.xtx and gate.xtx is up.xtx
    assert q.group == k.group == v.group == f"{layer}.self_attn.q_proj"
    assert stats.linears[f"{layer}.self_attn.o_proj"].xtx is not q.xtx
