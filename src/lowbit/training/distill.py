"""Distillation loss for QAT of a causal LM: KL(teacher || student) of next-token distributions (+ optional CE).

The original model is the teacher: the student (its fake-quantized twin) learns to reproduce the original's
whole next-token distribution, which carries far more signal per token than the one-hot next token, so a
few hundred thousand tokens move a 2-bit model a long way (LLM-QAT, Liu et al. 2023, trains on the model's
own distribution for the same reason). The KL is averaged over predicted positions, matching the KLD that
lowbit reports, so the training loss and the evaluation speak the same units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities of positions 0..L-2 (each predicts the next token) from (B, L, V) logits."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, ids: torch.Tensor,
                      ce_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """Mean per-position KL(teacher || student) plus ``ce_weight`` x cross-entropy on the real next tokens.

    Returns (loss to backpropagate, the KL part as a float for logging). ``teacher_logprobs`` come from
    ``next_token_logprobs`` of the teacher on the same ``ids`` (B, L).
    """
    student = next_token_logprobs(student_logits)
    vocab = student.shape[-1]
    kl = F.kl_div(student.reshape(-1, vocab), teacher_logprobs.reshape(-1, vocab), log_target=True,
                  reduction="batchmean")
    loss = kl
    if ce_weight:
        loss = loss + ce_weight * F.nll_loss(student.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    return loss, float(kl.detach())
