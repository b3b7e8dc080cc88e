"""Prompts for generation quality: a built-in set from the default text, or a user's JSONL file.

The built-in prompts are sentence starts from different topics of ``pydoc_data.topics``: of each topic that
begins after the text the default evaluation windows cover (so prompts and PPL/KLD windows never overlap),
the first prose paragraph, cut after a few words. Topics are taken evenly spread over the rest of the corpus,
so the prompts cover different subjects, and the choice depends only on the tokenizer (which decides where
the evaluation windows end): the same model always gets the same prompts. The module imports nothing heavy at
load time, so the CLI can read its defaults when it builds its parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

EVAL_TOKENS = 8 * 512  # the default evaluation windows (lowbit eval): prompts come from the text after them
DEFAULT_PROMPTS = 32
DEFAULT_NEW_TOKENS = 48  # tokens generated per prompt
PROMPT_WORDS = 12
_PROSE = re.compile(r"[A-Z][a-z]")  # a paragraph of prose starts with a capitalized word, not code or a grammar


@dataclass(frozen=True)
class Prompt:
    """A prompt's text and where it came from (``pydoc_data.topics:assert``, ``my.jsonl:3``)."""

    text: str
    source: str


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(key, topics[key]) for key in sorted(topics)]  # the order lowbit.data.text.default_text joins them


def eval_end_chars(tokenizer, text: str, eval_tokens: int = EVAL_TOKENS) -> int:
    """Characters of ``text`` that its first ``eval_tokens`` tokens cover (all of it if it is shorter)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return len(text) if eval_tokens >= len(offsets) else int(offsets[eval_tokens][0])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(tokenizer.decode(ids[:eval_tokens], clean_up_tokenization_spaces=False))


def _first_prose(body: str, words: int) -> str | None:
    """The first ``words`` words of ``body``'s first prose paragraph (its line breaks kept), or None."""
    for paragraph in body.split("\n\n"):
        if _PROSE.match(paragraph) and len(paragraph.split()) > 2 * words and "\n*" not in paragraph:
            return _cut_words(paragraph, words)
    return None


def _cut_words(paragraph: str, words: int) -> str:
    """``paragraph`` up to the end of its ``words``-th word, line breaks as they are."""
    ends = [m.end() for m in re.finditer(r"\S+", paragraph)]
    return paragraph[: ends[words - 1]]


def default_prompts(tokenizer, n: int = DEFAULT_PROMPTS, words: int = PROMPT_WORDS,
                    eval_tokens: int = EVAL_TOKENS) -> list[Prompt]:
    """``n`` sentence starts (``words`` words each) from different topics of the default text, all after the
    first ``eval_tokens`` tokens; fewer if fewer topics are left (the report says how many were used)."""
    from lowbit.data.text import DEFAULT_TEXT_NAME, default_text

    if n <= 0 or words <= 0:
        raise LowbitError(f"need at least one prompt of at least one word, got {n} x {words} words")
    skip = eval_end_chars(tokenizer, default_text(), eval_tokens)
    candidates, offset = [], 0
    for key, body in _topics():
        if offset >= skip:
            start = _first_prose(body, words)
            if start is not None and all(c.text != start for c in candidates):  # 'if' and 'else' are one text
                candidates.append(Prompt(start, f"{DEFAULT_TEXT_NAME}:{key}"))
        offset += len(body) + 2  # default_text joins the topics with a blank line
    if not candidates:
        raise LowbitError(f"the default text has no topic left after {eval_tokens} evaluation tokens")
    if n >= len(candidates):
        return candidates
    step = (len(candidates) - 1) / max(n - 1, 1)
    return [candidates[round(i * step)] for i in range(n)]


def read_prompts(path: str | Path, n: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL file: one JSON object per line with a "prompt" (or "text") string, or a bare JSON
    string; blank lines are skipped, and so are lines whose prompt is only whitespace. The first ``n`` if
    given. A file with no usable line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"prompts file {path} does not exist")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{path}:{lineno} is not valid JSON; give one object with a \"prompt\" field per "
                              "line") from None
        text = record if isinstance(record, str) else _field(record)
        if text is None:
            raise LowbitError(f"{path}:{lineno} has no \"prompt\" or \"text\" string field")
        if text.strip():
            prompts.append(Prompt(text, f"{path.name}:{lineno}"))
    if not prompts:
        raise LowbitError(f"prompts file {path} has no usable line; each line needs a JSON object with a "
                          "non-empty \"prompt\" (or \"text\") string")
    return prompts[:n] if n else prompts


def _field(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    for key in ("prompt", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def encode_prompts(tokenizer, prompts: Sequence[Prompt], new_tokens: int, context: int, label: str) -> list[list[int]]:
    """Token ids of each prompt (no special tokens added, as lowbit's evaluation windows), checked to leave room
    for ``new_tokens`` within ``context`` positions; ``label`` names the prompts' origin in the error."""
    if new_tokens <= 0:
        raise LowbitError(f"--new-tokens must be positive, got {new_tokens}")
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise LowbitError(f"{label}: prompt {prompt.source} has no tokens")
        if len(ids) + new_tokens > context:
            raise LowbitError(f"{label}: prompt {prompt.source} has {len(ids)} tokens; with {new_tokens} new tokens "
                              f"it is longer than the model's context of {context}; shorten it or pass fewer "
                              "--new-tokens")
        encoded.append(list(ids))
    return encoded
