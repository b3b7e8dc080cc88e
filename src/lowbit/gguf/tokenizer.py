"""The ``tokenizer.*`` metadata of a GGUF: copied verbatim from a GGUF source, or built from a Hugging Face
byte-level BPE tokenizer (the "gpt2" model in llama.cpp's terms)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

CONTROL, NORMAL, USER_DEFINED = 3, 1, 4


def copy_from_gguf(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value type, value, array element type) of every ``tokenizer.*`` field of a GGUF file, read through
    lowbit's checks (``validate_gguf``). Values are copied as they are: ``tokenizer.chat_template`` is a string
    taken verbatim, never rendered or compiled (a template from an untrusted file is code)."""
    import gguf

    from lowbit.model.load import validate_gguf

    reader = validate_gguf(path)
    out = []
    for key, field in reader.fields.items():
        # an empty array says nothing, and gguf-py's writer refuses one ("Empty array"): it is not copied
        if not key.startswith("tokenizer.") or field.types == [gguf.GGUFValueType.ARRAY]:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, vtype, field.contents(), sub))
    return out


def from_hf_tokenizer(tokenizer: Any, n_vocab: int | None = None) -> list[tuple[str, Any, Any, Any]]:
    """Metadata for a transformers fast tokenizer whose backend is byte-level BPE. llama.cpp needs exactly one
    token per embedding row: with ``n_vocab`` rows, missing ids become ``[PADi]`` (as convert_hf_to_gguf does)
    and added tokens past the last row (which the model cannot embed) are left out."""
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"GGUF export supports byte-level BPE tokenizers only, this one is {model.get('type', '?')}")
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    if n_vocab is not None and n > n_vocab:
        added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
        beyond = {i for i in vocab.values() if i >= n_vocab}
        if not beyond <= added:
            raise LowbitError(f"the tokenizer has {n} tokens but the model only {n_vocab} embedding rows")
        vocab = {tok: i for tok, i in vocab.items() if i < n_vocab}
    n = n_vocab if n_vocab is not None else n
    tokens = [f"[PAD{i}]" for i in range(n)]
    for tok, idx in vocab.items():
        tokens[idx] = tok
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [CONTROL if i in special else NORMAL for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [("tokenizer.ggml.model", T.STRING, "gpt2", None), ("tokenizer.ggml.pre", T.STRING, "default", None),
           ("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING), ("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32),
           ("tokenizer.ggml.merges", T.ARRAY, merges, T.STRING)]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id"),
                      ("unknown", "unk_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None and value < n:
            out.append((f"tokenizer.ggml.{key}_token_id", T.UINT32, int(value), None))
    out.append(("tokenizer.ggml.add_bos_token", T.BOOL, False, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", T.STRING, template, None))
    return out


def tokenizer_metadata(source: Path, tokenizer: Any, n_vocab: int | None = None) -> list[tuple[str, Any, Any, Any]]:
    """Tokenizer metadata for a model loaded from ``source`` (a GGUF file or a Hugging Face folder) whose
    embedding has ``n_vocab`` rows."""
    if source.is_file() and source.suffix.lower() == ".gguf":
        return copy_from_gguf(source)
    return from_hf_tokenizer(tokenizer, n_vocab)
