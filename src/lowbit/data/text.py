"""Text sources and token windows for evaluation and calibration.

The default corpus is Python's own ``pydoc_data.topics`` (all topics sorted by key, joined by blank
lines), which ships with every Python. Evaluation uses the first windows of the token stream;
calibration draws from the tokens after them, so the two never overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

DEFAULT_TEXT_NAME = "pydoc_data.topics"


def default_text() -> str:
    """The pydoc topics corpus (~465 KB of English prose about Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | Path | None) -> str:
    """Text from a file (plain text, or .jsonl with a 'text' field per line); the default corpus if None."""
    if path is None:
        return default_text()
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"text file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    text = _jsonl_text(raw, path) if path.suffix == ".jsonl" else raw
    if not text.strip():
        raise LowbitError(f"text file {path} is empty; give a file with some prose in it")
    return text


def _jsonl_text(raw: str, path: Path) -> str:
    pieces = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{path}:{lineno} is not valid JSON") from None
        if isinstance(record, str):
            pieces.append(record)
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            pieces.append(record["text"])
        else:
            raise LowbitError(f"{path}:{lineno} has no 'text' string field")
    return "\n\n".join(pieces)


def text_label(path: str | Path | None) -> str:
    """How a text source is named in reports."""
    return DEFAULT_TEXT_NAME if path is None else str(path)


@dataclass(frozen=True)
class TokenWindows:
    """Consecutive non-overlapping windows of token ids, shape (n, length), and where they came from."""

    ids: torch.Tensor
    start: int
    picks: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(token_ids: torch.Tensor, n_windows: int, length: int) -> TokenWindows:
    """The first ``n_windows`` windows of ``length`` tokens (fewer if the text is short, never none)."""
    if n_windows <= 0 or length < 2:
        raise LowbitError(f"need at least one window of at least 2 tokens, got {n_windows} x {length}")
    available = token_ids.numel() // length
    if available == 0:
        raise LowbitError(f"the text has only {token_ids.numel()} tokens; an evaluation window needs {length}")
    n = min(n_windows, available)
    return TokenWindows(ids=token_ids[: n * length].reshape(n, length), start=0)


def calibration_windows(
    token_ids: torch.Tensor, n_samples: int, length: int, eval_tokens: int, seed: int = 0
) -> TokenWindows:
    """``n_samples`` windows of ``length`` tokens drawn at random from the tokens after the evaluation part."""
    pool = token_ids[eval_tokens:]
    available = pool.numel() // length
    if available == 0:
        raise LowbitError(
            f"no calibration text left: {token_ids.numel()} tokens, {eval_tokens} used for evaluation, "
            f"a sample needs {length}; pass a longer --calib-text"
        )
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=g)[: min(n_samples, available)].sort().values
    ids = pool[: available * length].reshape(available, length)[picks]
    return TokenWindows(ids=ids, start=eval_tokens, picks=picks)


def paragraphs(text: str, n: int, min_chars: int = 20) -> list[str]:
    """The first ``n`` paragraphs (blank-line separated) of at least ``min_chars`` characters."""
    out = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]
    if not out:
        raise LowbitError("the text has no paragraphs to embed")
    return out[:n]
