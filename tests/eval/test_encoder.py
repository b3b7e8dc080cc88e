"""Mean pooling respects the attention mask; cosine metrics are per sentence."""

from __future__ import annotations

import torch

from lowbit.eval.encoder import compare_embeddings


def test_compare_embeddings():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    m = compare_embeddings(ref, new)
    assert m["cosine_min"] == torch.tensor(2**-0.5).item()
    assert abs(m["cosine"] - (1 + 2**-0.5) / 2) < 1e-6
