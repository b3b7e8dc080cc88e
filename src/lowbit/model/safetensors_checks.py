"""Bounded checks of an untrusted safetensors file's header, made before the safetensors library or transformers
maps any tensor.

The rules are those of the safetensors reference reader (``Metadata::validate``): a u64 header length inside the
file and under 100 MB, a UTF-8 JSON object, each entry a known dtype, a shape of non-negative integers whose
product times the dtype's size equals its ``data_offsets`` span (sub-byte dtypes filling whole bytes, no
overflow), and the spans, in offset order, tiling the data section from its first byte to the file's last with no
hole or overlap. Stricter than the reference where JSON is loose: a duplicate name or key is refused (JSON parsers
disagree on which copy wins), and ``__metadata__`` must map strings to strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
METADATA_KEY = "__metadata__"
MAX_BYTES = (1 << 64) - 1  # the reference computes sizes in a 64-bit usize; more is an overflow
# element sizes in bits of every dtype safetensors 0.8 reads (F4 and F6 are sub-byte)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# valid safetensors dtypes that torch has no type for: safe_open(framework="pt") fails on them, so lowbit refuses
TORCH_CANNOT_HOLD = frozenset({"F6_E2M3", "F6_E3M2"})

CORRUPT = "is a corrupt safetensors file"
TRUNCATED = "is a truncated safetensors file"


class _Bad(Exception):
    """A problem found in the file; ``check_safetensors`` turns it into a one-line LowbitError naming the file."""

    def __init__(self, problem: str, kind: str = CORRUPT):
        super().__init__(problem)
        self.kind = kind


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """The parsed header of a safetensors file (tensor entries and ``__metadata__``) after checking it against the
    reference reader's rules; a LowbitError names the file and the first problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_len = _header_length(f, size)
            header = _parse(f.read(header_len))
        _check_tensors(header, size - 8 - header_len)
        return header
    except _Bad as bad:
        raise LowbitError(f"{path} {bad.kind}: {bad}") from None
    except OSError as exc:
        raise LowbitError(f"cannot read {path}: {exc.strerror or exc}") from None


def _header_length(f, size: int) -> int:
    """The u64 header length, within the file and under the reference reader's cap."""
    if size < 8:
        raise _Bad(f"the file has {size} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n == 0 or n > MAX_HEADER_BYTES:
        raise _Bad(f"header length {n} is outside 1..{MAX_HEADER_BYTES}")
    if n > size - 8:
        raise _Bad(f"header length {n} runs past the end of the file ({size} bytes)")
    return n


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: an object with a key given twice is refused."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"the header names {_shown(key)} twice")
        out[key] = value
    return out


def _shown(text: str) -> str:
    """A name from the file as it may appear in a one-line message: quoted, escaped, cut."""
    return repr(text if len(text) <= 60 else text[:60] + "...")


def _no_constant(name: str) -> None:
    """``json.loads`` hook: NaN and Infinity are not JSON (the reference reader refuses them)."""
    raise _Bad(f"the header holds {name}, which is not JSON")


def _check_strings(header: dict[str, Any]) -> None:
    """Every string in the header is encodable UTF-8: Python's JSON parser accepts a lone surrogate escape
    (``\\ud800``), the reference reader does not. Walked without recursion, however deep the nesting."""
    stack: list[Any] = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str) and not _encodable(item):
            raise _Bad(f"the header holds a string with a lone surrogate escape ({_shown(item)})")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse(raw: bytes) -> dict[str, Any]:
    """The header as a JSON object (UTF-8, strict JSON, no duplicate keys, no nesting deep enough to exhaust the
    stack)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise _Bad("the header is not valid UTF-8") from None
    except RecursionError:
        raise _Bad("the header nests too deeply to be a safetensors header") from None
    except ValueError as exc:
        raise _Bad(f"the header is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise _Bad(f"the header is a JSON {type(header).__name__}, not an object")
    _check_strings(header)
    return header


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _span(name: str, entry: Any) -> tuple[int, int]:
    """(start, end) of one tensor's bytes after checking its dtype, shape and that the two agree."""
    if not isinstance(entry, dict):
        raise _Bad(f"the entry for {_shown(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _Bad(f"tensor {_shown(name)} has unknown dtype {_shown(str(dtype))}")
    if dtype in TORCH_CANNOT_HOLD:
        raise _Bad(f"tensor {_shown(name)} has dtype {dtype}, which torch cannot load",
                   "holds a tensor lowbit cannot read")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Bad(f"tensor {_shown(name)} has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _Bad(f"tensor {_shown(name)} has data_offsets that are not two non-negative integers")
    start, end = offsets
    if end < start:
        raise _Bad(f"tensor {_shown(name)} ends (byte {end}) before it starts (byte {start})")
    bits = DTYPE_BITS[dtype]
    for d in shape:  # in order, stopping at the first overflow as the reference's checked_mul does
        bits *= d
        if bits > 8 * MAX_BYTES:
            raise _Bad(f"tensor {_shown(name)}'s shape overflows a 64-bit byte count")
    if bits % 8 or bits // 8 != end - start:
        shown = shape if len(shape) <= 8 else f"of {len(shape)} dimensions"
        raise _Bad(f"tensor {_shown(name)} ({dtype}, shape {shown}) needs {bits / 8:g} bytes, its data_offsets "
                   f"span {end - start}")
    return start, end


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad(f"{METADATA_KEY} is not an object of strings")


def _check_tensors(header: dict[str, Any], data_bytes: int) -> None:
    """Every entry valid, and the spans in offset order tiling the data section exactly."""
    _check_metadata(header.get(METADATA_KEY))
    spans = sorted((_span(name, entry), name) for name, entry in header.items() if name != METADATA_KEY)
    position = 0
    for (start, end), name in spans:
        if start != position:
            problem = "overlaps the tensor before it" if start < position else "leaves a hole before it"
            raise _Bad(f"tensor {_shown(name)} starts at byte {start} of the data, expected {position}: it {problem}")
        position = end
    if position > data_bytes:
        raise _Bad(f"the header describes {position} bytes of tensor data, the file holds {data_bytes}", TRUNCATED)
    if position < data_bytes:
        raise _Bad(f"the file holds {data_bytes - position} bytes after the last tensor's data")
