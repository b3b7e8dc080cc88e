"""Causal-LM quality against the original on the same tokens: perplexity, KL divergence, top-1 agreement.

The original's next-token log-probabilities are computed once (``lm_reference``) and kept, so the
original model can be freed (or changed in place into its quantized twin) before ``compare_lm`` runs.
KL divergence is KL(original || quantized) per position, averaged over all predicted positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class LMReference:
    """The original model's log-probabilities on each evaluation window, and its summed NLL."""

    windows: torch.Tensor
    logprobs: list[torch.Tensor]
    nll_sum: float

    @property
    def n_predictions(self) -> int:
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_predictions)


def window_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (float32, [length - 1, vocab]) of the next token at every position of one window."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids[None].to(device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _nll(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-logprobs.gather(1, ids[1:, None]).sum())


@torch.inference_mode()
def lm_reference(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> LMReference:
    """Run the original model over the windows and keep what comparisons need."""
    logprobs, nll = [], 0.0
    for ids in tqdm(windows, desc="eval original", disable=not progress):
        lp = window_logprobs(model, ids)
        logprobs.append(lp)
        nll += _nll(lp, ids)
    return LMReference(windows=windows, logprobs=logprobs, nll_sum=nll)


@torch.inference_mode()
def compare_lm(model: nn.Module, ref: LMReference, progress: bool = True) -> dict[str, float]:
    """Perplexities of original and ``model``, mean KL(original || model) and top-1 agreement."""
    nll = kld = agree = 0.0
    for ids, base in tqdm(list(zip(ref.windows, ref.logprobs)), desc="eval quantized", disable=not progress):
        lp = window_logprobs(model, ids)
        nll += _nll(lp, ids)
        kld += float((base.exp() * (base - lp)).sum())
        agree += float((base.argmax(-1) == lp.argmax(-1)).sum())
    n = ref.n_predictions
    return {"ppl_base": ref.ppl, "ppl": math.exp(nll / n), "kld": kld / n, "top1": agree / n}
