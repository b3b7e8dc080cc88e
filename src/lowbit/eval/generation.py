"""Generation quality of a quantized language model against its original: greedy continuations of the same
prompts, and how far the quantized model's text stays with the original's.

Everything here is engine-independent. A model is a ``NextTokenLogits`` callable — the token ids so far in,
the logits of the next token out — so one greedy loop serves transformers, llama.cpp and onnxruntime alike
(each engine keeps its own cache behind the callable; ``lowbit.eval.engines`` has them). The metrics compare
texts and token ids only: BLEU and chrF as sacrebleu computes them (corpus scores, the quantized text as the
hypothesis and the original's as the single reference), ROUGE-L F1 as rouge-score computes it (mean over
prompts), the exact-match rate, and the tokens generated before the first divergence. Greedy decoding is used
because it is deterministic: any difference between the two continuations is the quantization's (or the
engine's), never a sampling accident.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

NextTokenLogits = Callable[[Sequence[int]], np.ndarray]
Decode = Callable[[Sequence[int]], str]


def greedy_continuation(next_logits: NextTokenLogits, prompt_ids: Sequence[int], new_tokens: int,
                        stop_ids: Iterable[int] = (), label: str = "the model") -> list[int]:
    """The ``new_tokens`` tokens (fewer when a stop token comes first; it is kept) that greedy decoding appends
    to ``prompt_ids``: at each step the argmax of ``next_logits(ids so far)`` (ties: the lowest id, as
    ``torch.argmax`` and llama.cpp's greedy sampler pick). Non-finite logits are an error naming ``label``."""
    stops = set(stop_ids)
    ids, out = list(prompt_ids), []
    for step in range(new_tokens):
        logits = np.asarray(next_logits(ids))
        if logits.ndim != 1:
            raise ValueError(f"next-token logits must be one vector, got shape {logits.shape}")
        if not np.isfinite(logits).all():
            raise LowbitError(f"{label} produced non-finite logits at generated token {step + 1}; "
                              "its weights or activations overflow")
        token = int(np.argmax(logits))
        out.append(token)
        ids.append(token)
        if token in stops:
            break
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share: the tokens generated before the first divergence (the
    full length when the two are identical)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation_text(decode: Decode, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after the prompt. Decoded together with the prompt and the prompt's text cut off,
    because tokenizers that mark word starts (SentencePiece's ▁) drop a leading space when a fragment is
    decoded alone; the fragment alone is the fallback if the prompt's text is not a prefix."""
    prompt = decode(list(prompt_ids))
    whole = decode([*prompt_ids, *ids])
    return whole[len(prompt):] if whole.startswith(prompt) else decode(list(ids))


def divergence_span(decode: Decode, prompt_ids: Sequence[int], ids: Sequence[int], k: int,
                    text: str) -> tuple[int, int]:
    """Character offsets [start, end) in ``text`` (the continuation ``ids`` decoded) of token ``k``, the first
    one that differs from the other model's; (len, len) when ``ids`` has no token ``k``. Offsets come from
    decoding the first k and k+1 tokens; where a token splits a multi-byte character the span is widened to
    whole characters (the decoded prefix is cut back to what ``text`` really starts with)."""
    def prefix_chars(n: int) -> int:
        return len(os.path.commonprefix([text, continuation_text(decode, prompt_ids, ids[:n])]))

    if k >= len(ids):
        return len(text), len(text)
    start = prefix_chars(k)
    for n in range(k + 1, len(ids)):  # token k may end inside a character: extend to the next whole one
        end = prefix_chars(n)
        if end > start:
            return start, end
    return start, len(text)


@dataclass(frozen=True)
class Continuations:
    """One prompt's greedy continuations: token ids and text from the original and from the quantized model."""

    reference_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    reference_text: str
    test_text: str

    @property
    def divergence(self) -> int:
        return common_prefix(self.reference_ids, self.test_ids)

    @property
    def exact(self) -> bool:
        return self.reference_ids == self.test_ids


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(reference: str, test: str, scorer: Any = None) -> float:
    """ROUGE-L F1 of ``test`` against ``reference`` (rouge-score's tokenizer: lowercased alphanumeric words).
    Identical texts score 1 even when they hold no word rouge-score counts (it would say 0)."""
    if reference == test:
        return 1.0
    return float((scorer or _rouge_scorer()).score(reference, test)["rougeL"].fmeasure)


def chrf(reference: str, test: str) -> float:
    """sacrebleu's sentence-level chrF (0-100) of ``test`` against ``reference``: one prompt's score."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(test, [reference]).score)


def generation_metrics(pairs: Sequence[Continuations]) -> dict[str, Any]:
    """The quantized continuations scored against the original's, over all prompts:

    ``bleu`` and ``chrf`` — sacrebleu's corpus BLEU (13a tokenization) and chrF, 0-100; ``rouge_l`` — mean
    ROUGE-L F1, 0-1; ``exact_match`` — fraction of prompts whose token ids are identical;
    ``tokens_to_divergence`` — mean tokens generated before the first different one (identical continuations
    count their full length), beside ``reference_tokens``, the mean length of the original's continuations
    (the most it can be)."""
    import sacrebleu

    if not pairs:
        raise ValueError("generation_metrics needs at least one prompt")
    refs = [p.reference_text for p in pairs]
    tests = [p.test_text for p in pairs]
    scorer = _rouge_scorer()
    metrics = {
        "bleu": float(sacrebleu.corpus_bleu(tests, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(tests, [refs]).score),
        "rouge_l": float(np.mean([rouge_l(r, t, scorer) for r, t in zip(refs, tests)])),
        "exact_match": float(np.mean([p.exact for p in pairs])),
        "tokens_to_divergence": float(np.mean([p.divergence for p in pairs])),
        "reference_tokens": float(np.mean([len(p.reference_ids) for p in pairs])),
        "prompts": len(pairs),
    }
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise LowbitError(f"generation metrics {', '.join(bad)} are not finite")
    return metrics
