"""Causal-LM quality against the original on the same tokens: perplexity, KL divergence, top-1 agreement.

The original's next-token log-probabilities are computed once (``lm_reference``) and kept, so the
original model can be freed (or changed in place into its quantized twin) before ``compare_lm`` runs.
They are kept exactly (fp32) but not in memory: each window's [length - 1, vocab] block is written to an
anonymous temporary file and read back one window at a time (8 windows x 511 x 262k vocab would be 4.3 GB).
KL divergence is KL(original || quantized) per position, averaged over all predicted positions; its
distribution over positions (median, tail percentiles, Δp, ...) is summarized by ``lowbit.eval.kld_stats``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.eval.kld_stats import DivergenceStats, values_from_terms
from lowbit.model.finite import check_metrics

_ROWS = 64  # positions per step of the KLD/top-1 sums: bounds the [rows, vocab] temporaries


STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class LogprobStore(Sequence):
    """Tensors appended one by one to an anonymous temporary file (plain writes, so the data is not part of
    the process's memory) and read back, as float32, one at a time. The file has no name and disappears when
    the store is closed or collected, or when the process ends.

    ``dtype="fp16"`` halves the file (64 windows x 511 x 49,152 vocab: 3.2 GB instead of 6.4 GB): log-
    probabilities near 0, the ones that carry the divergence, keep 11 significant bits; the KLD error this
    costs is measured in bench/eval_memory.py."""

    def __init__(self, dtype: str = "fp32") -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"LogprobStore keeps {', '.join(STORE_DTYPES)}, not {dtype!r}")
        self._dtype = STORE_DTYPES[dtype]
        self._file = tempfile.TemporaryFile(prefix="lowbit-logprobs-")
        self._index: list[tuple[int, tuple[int, ...]]] = []

    def append(self, tensor: torch.Tensor) -> None:
        array = tensor.detach().to("cpu", self._dtype).contiguous().numpy()
        offset = self._file.seek(0, 2)
        self._file.write(array.data)
        self._index.append((offset, tuple(array.shape)))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        offset, shape = self._index[i]
        return self._read(offset, shape)

    def row_blocks(self, i: int, rows: int):
        """Tensor ``i`` (at least 1-D) in blocks of ``rows`` leading rows, each read from the file when asked for."""
        offset, shape = self._index[i]
        row_bytes = self._dtype.itemsize * math.prod(shape[1:])
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            yield self._read(offset + start * row_bytes, (n, *shape[1:]))

    def _read(self, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=self._dtype)
        self._file.seek(offset)
        view = out.view(torch.uint8).numpy().data.cast("B") if out.numel() else memoryview(b"")
        if self._file.readinto(view) != len(view):
            raise OSError("the temporary file of reference log-probabilities was cut short")
        return out.float()

    def close(self) -> None:
        self._file.close()


@dataclass
class LMReference:
    """The original model's log-probabilities on each evaluation window, and its summed NLL."""

    windows: torch.Tensor
    logprobs: Sequence[torch.Tensor]  # a LogprobStore from lm_reference: read one window at a time
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
    logits = model(input_ids=ids[None].to(device)).logits[0, :-1].float()
    # Row by row into the logits' own memory (log_softmax is per row, so the values are the same as in one
    # call): no second [length, vocab] tensor.
    for rows in logits.split(_ROWS):
        rows.copy_(torch.log_softmax(rows, dim=-1))
    return logits.cpu()


def _nll(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-logprobs.gather(1, ids[1:, None]).sum())


@torch.inference_mode()
def lm_reference(model: nn.Module, windows: torch.Tensor, progress: bool = True, store: str = "fp32") -> LMReference:
    """Run the original model over the windows and keep what comparisons need (log-probabilities in a
    ``LogprobStore`` of dtype ``store``; the NLL from the exact values)."""
    logprobs, nll = LogprobStore(store), 0.0
    for ids in tqdm(windows, desc="eval original", disable=not progress):
        lp = window_logprobs(model, ids)
        logprobs.append(lp)
        nll += _nll(lp, ids)
    check_metrics({"nll": nll}, "the original model")
    return LMReference(windows=windows, logprobs=logprobs, nll_sum=nll)


def divergence_sums(base: torch.Tensor | Iterable[torch.Tensor], test: torch.Tensor,
                    stats: DivergenceStats | None = None, targets: torch.Tensor | None = None) -> tuple[float, float]:
    """(summed KL(base || test), positions whose argmaxes agree) over one window of log-probabilities, a block of
    positions at a time so that the [positions, vocab] temporaries stay small. ``base`` may already be
    row blocks (as ``LogprobStore.row_blocks`` reads them).

    With ``stats`` (and ``targets``, the [positions] tokens that came next), each block's per-position values
    are also added to it, reusing the block's KL terms (the [rows, vocab] exponentials are computed once)."""
    if stats is not None and targets is None:
        raise ValueError("divergence_sums: stats needs the target tokens")
    blocks = base.split(_ROWS) if isinstance(base, torch.Tensor) else base
    kld = agree = 0.0
    start = 0
    for b, q in zip(blocks, test.split(_ROWS)):
        terms = b.exp() * (b - q)
        same = b.argmax(-1) == q.argmax(-1)
        kld += float(terms.sum())
        agree += float(same.sum())
        if stats is not None:
            stats.add_values(values_from_terms(terms.sum(-1), same, b, q, targets[start:start + len(b)]))
        start += len(b)
    return kld, agree


@torch.inference_mode()
def compare_lm(model: nn.Module, ref: LMReference, progress: bool = True) -> dict[str, Any]:
    """Perplexities of original and ``model``, mean KL(original || model) and top-1 agreement, plus
    ``kld_stats``: the distribution of the per-token divergence (``DivergenceStats.summary``)."""
    nll = kld = agree = 0.0
    stats = DivergenceStats()
    for i, ids in enumerate(tqdm(ref.windows, desc="eval quantized", disable=not progress)):
        lp = window_logprobs(model, ids)
        nll += _nll(lp, ids)
        # The original's rows are read a block at a time, after the forward pass: the peaks do not add up.
        store = ref.logprobs
        blocks = store.row_blocks(i, _ROWS) if isinstance(store, LogprobStore) else store[i]
        window_kld, window_agree = divergence_sums(blocks, lp, stats, ids[1:])
        kld, agree = kld + window_kld, agree + window_agree
        del lp
    n = ref.n_predictions
    metrics = check_metrics({"ppl_base": ref.ppl, "ppl": math.exp(nll / n), "kld": kld / n, "top1": agree / n})
    return metrics | {"kld_stats": stats.summary()}
