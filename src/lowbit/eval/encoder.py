"""Encoder quality: cosine similarity of mean-pooled sentence embeddings to the original's."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.model.finite import check_metrics


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128,
          progress: bool = True) -> torch.Tensor:
    """Mean-pooled (attention-masked) last hidden states, one row per sentence, float32."""
    out = []
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(sentences), batch_size), desc="embed", disable=not progress):
        batch = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"][..., None].float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def compare_embeddings(reference: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """Mean and minimum per-sentence cosine similarity to the reference embeddings."""
    cos = torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1)
    return check_metrics({"cosine": float(cos.mean()), "cosine_min": float(cos.min())})
