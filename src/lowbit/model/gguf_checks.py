"""Bounded checks of an untrusted GGUF file's header, metadata and tensor table, made before any reader allocates
from it.

gguf-py's ``GGUFReader`` (which lowbit and transformers use) takes every length and count in a file as given: a
string length past the end of the file, a tensor or key count of 2**63, a dimension product that overflows, all
become reads or allocations of whatever size the file says (the shapes of the 2024 GGUF parser CVEs). This walks
the same structure front to back with small struct reads: every length is checked against the bytes left before
it is read, every count against the smallest size its entries can take, and the tensor table against the rules
llama.cpp's ``gguf.cpp`` enforces (no empty or duplicate keys, no nested arrays, no duplicate tensor names,
names under 64 bytes, at most 4 dimensions, a known ggml type, whole blocks per row, a power-of-two alignment,
offsets equal to the running padded sum, data inside the file). Metadata values are only checked (UTF-8 strings,
0/1 booleans), never interpreted: a chat template is a string like any other.
"""

from __future__ import annotations

import codecs
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lowbit.errors import LowbitError

VERSIONS = (2, 3)  # what gguf-py reads; v1 counted in 32 bits and llama.cpp refuses it too
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL; gguf.cpp refuses longer names
MAX_STRING_BYTES = 1 << 30  # gguf.cpp's GGUF_MAX_STRING_LENGTH
# lowbit's own bounds. gguf-py builds about 1 KB of numpy views per metadata array element and per tensor, so a
# small file of many tiny entries would cost gigabytes: the largest real tokenizers hold under 1M elements in all
# (Gemma 3: tokens, scores and types of 262,144 entries each), real files a few hundred keys and tensors.
MAX_ARRAY_ELEMENTS = 1 << 21  # all metadata arrays together
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 18
INT64_MAX = (1 << 63) - 1
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32
_CHUNK = 1 << 20  # bytes read at a time when a long string or a boolean array is checked

_COUNTS = struct.Struct("<IQQ")  # after the magic: version, tensor count, key count
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<IQ")  # element type, element count
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]
_SCALARS = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# the fewest bytes a metadata entry (key length, a 1-byte key, value type, a 1-byte value) and a tensor-info entry
# (name length, a 1-byte name, dimension count, ggml type, offset) can take: counts are checked against these
_MIN_KEY_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8

# what goes before the problem in the error message
BOUNDS = "is a corrupt or truncated GGUF file"
TRUNCATED = "is a truncated GGUF file"
CORRUPT = "is a corrupt GGUF file"


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table: dims innermost first (ggml order), offset from the data section's start."""

    name: str
    dims: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What the checks found: the file is well formed and every tensor's bytes lie inside it."""

    version: int
    keys: tuple[str, ...]
    alignment: int
    data_start: int
    tensors: tuple[TensorEntry, ...]


class _Bad(Exception):
    """A problem found in the file; ``check_gguf`` turns it into a one-line LowbitError naming the file."""

    def __init__(self, problem: str, kind: str = CORRUPT):
        super().__init__(problem)
        self.kind = kind


def check_gguf(path: str | Path) -> GGUFLayout:
    """Check a GGUF file's header, metadata and tensor table with bounded reads; a LowbitError names the file and
    the first problem (bad magic, unsupported version, a length or count past the end, duplicate or empty keys,
    nested arrays, invalid UTF-8, non-0/1 booleans, a bad tensor entry, misplaced offsets, data past the end)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _check_file(f, os.fstat(f.fileno()).st_size)
    except _Bad as bad:
        raise LowbitError(f"{path} {bad.kind}: {bad}") from None
    except OSError as exc:
        raise LowbitError(f"cannot read {path}: {exc.strerror or exc}") from None


class _Reader:
    """Little-endian reads from a file, front to back, each checked against the bytes left before it is made."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size, self.pos = file, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def ensure(self, n: int, what: str) -> None:
        if n > self.left:
            raise _Bad(f"{what} needs {n} bytes but only {self.left} are left", BOUNDS)

    def take(self, n: int, what: str) -> bytes:
        self.ensure(n, what)
        data = self.file.read(n)
        if len(data) != n:
            raise _Bad(f"the file ended while reading {what} (was it changed while being read?)", TRUNCATED)
        self.pos += n
        return data

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def skip(self, n: int, what: str) -> None:
        self.ensure(n, what)
        self.file.seek(n, os.SEEK_CUR)
        self.pos += n

    def length(self, what: str, limit: int) -> int:
        """A string's u64 length prefix, checked against ``limit`` and the bytes left."""
        if self.left < _U64.size:  # checked here so that the message is only formatted when it is needed
            self.ensure(_U64.size, f"the length of {what}")
        (n,) = _U64.unpack(self.take(_U64.size, what))
        if n > limit:
            raise _Bad(f"{what} is {n} bytes long, more than the {limit} allowed", BOUNDS)
        self.ensure(n, what)
        return n


def _shown(text: str) -> str:
    """A name from the file as it may appear in a one-line message: quoted, escaped, cut."""
    return repr(text if len(text) <= 60 else text[:60] + "...")


def _text(reader: _Reader, what: str, limit: int = MAX_STRING_BYTES) -> str:
    """A length-prefixed UTF-8 string whose text is needed (a key, a tensor name)."""
    raw = reader.take(reader.length(what, limit), what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8") from None


def _skip_text(reader: _Reader, what: str) -> None:
    """A length-prefixed string value: checked to be UTF-8 (a long one a chunk at a time), not kept."""
    n = reader.length(what, MAX_STRING_BYTES)
    try:
        if n <= _CHUNK:
            reader.take(n, what).decode("utf-8")
            return
        decoder = codecs.getincrementaldecoder("utf-8")()
        while n:
            chunk = reader.take(min(n, _CHUNK), what)
            n -= len(chunk)
            decoder.decode(chunk, final=n == 0)
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8") from None


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Bad(f"metadata {_shown(key)} has unknown value type {raw}") from None


def _check_scalar(reader: _Reader, vtype: GGUFValueType, key: str) -> object:
    """One non-array value; the number (None for a string) is returned for the keys that are interpreted."""
    if vtype == GGUFValueType.STRING:
        _skip_text(reader, f"the string value of {_shown(key)}")
        return None
    (value,) = reader.unpack(_SCALARS[vtype], f"the value of {_shown(key)}")
    if vtype == GGUFValueType.BOOL and value > 1:
        raise _Bad(f"boolean {_shown(key)} holds {value}, not 0 or 1")
    return value


def _check_array(reader: _Reader, key: str, budget: int) -> int:
    """An array value: element type (never another array), count within the file and within ``budget`` (the
    elements all arrays may still hold, returned less this one's), then each element (strings) or the whole
    block at once (fixed-size types)."""
    raw, count = reader.unpack(_ARRAY_HEAD, f"the array header of {_shown(key)}")
    sub = _value_type(raw, key)
    if sub == GGUFValueType.ARRAY:
        raise _Bad(f"metadata {_shown(key)} is an array of arrays, which GGUF does not allow")
    budget -= count
    if budget < 0:
        raise _Bad(f"metadata arrays hold more than {MAX_ARRAY_ELEMENTS} elements in all (at {_shown(key)})")
    what = f"the {count} elements of {_shown(key)}"
    if sub == GGUFValueType.STRING:
        reader.ensure(count * _U64.size, what)  # every string has at least its 8-byte length
        element = f"a string in {_shown(key)}"
        for _ in range(count):
            _skip_text(reader, element)
        return budget
    nbytes = count * _SCALARS[sub].size
    if sub != GGUFValueType.BOOL:
        reader.skip(nbytes, what)
        return budget
    reader.ensure(nbytes, what)
    while nbytes:
        chunk = reader.take(min(nbytes, _CHUNK), what)
        nbytes -= len(chunk)
        if chunk.translate(None, b"\x00\x01"):
            raise _Bad(f"boolean array {_shown(key)} holds a value other than 0 or 1")
    return budget


def _check_header(reader: _Reader) -> tuple[int, int, int]:
    """(version, tensor count, key count), each count checked against the bytes after the header."""
    if reader.take(min(4, reader.size), "the magic bytes") != b"GGUF":
        raise _Bad("bad magic bytes, expected 'GGUF'", "is not a GGUF file")
    version, n_tensors, n_keys = reader.unpack(_COUNTS, "the header")
    if version & 0xFFFF == 0 and version:
        raise _Bad(f"version field {version:#010x} looks big-endian; lowbit reads little-endian GGUF files")
    if version not in VERSIONS:
        raise _Bad(f"GGUF version {version} is not supported (lowbit reads versions {VERSIONS[0]} and {VERSIONS[1]})")
    if n_keys > MAX_KEYS or n_tensors > MAX_TENSORS:
        raise _Bad(f"{n_keys} metadata keys and {n_tensors} tensors exceed lowbit's limits "
                   f"({MAX_KEYS} keys, {MAX_TENSORS} tensors)", BOUNDS)
    least = n_keys * _MIN_KEY_BYTES + n_tensors * _MIN_TENSOR_BYTES
    if least > reader.left:
        raise _Bad(f"{n_keys} metadata keys and {n_tensors} tensors need at least {least} bytes, only "
                   f"{reader.left} follow the header", BOUNDS)
    return version, n_tensors, n_keys


def _check_metadata(reader: _Reader, n_keys: int) -> tuple[tuple[str, ...], int]:
    """(keys, alignment) after checking every key and value."""
    keys: dict[str, None] = {}
    alignment = DEFAULT_ALIGNMENT
    budget = MAX_ARRAY_ELEMENTS
    for i in range(n_keys):
        key = _text(reader, f"metadata key {i}")
        if not key:
            raise _Bad(f"metadata key {i} is empty")
        if key in keys:
            raise _Bad(f"metadata key {_shown(key)} appears twice")
        keys[key] = None
        (raw,) = reader.unpack(_U32, f"the value type of {_shown(key)}")
        vtype = _value_type(raw, key)
        if vtype == GGUFValueType.ARRAY:
            budget = _check_array(reader, key, budget)
            value = None
        else:
            value = _check_scalar(reader, vtype, key)
        if key == ALIGNMENT_KEY:
            alignment = _alignment(vtype, value)
    return tuple(keys), alignment


def _alignment(vtype: GGUFValueType, value: object) -> int:
    """``general.alignment``: a u32 power of two, as gguf.cpp and gguf-py require."""
    if vtype != GGUFValueType.UINT32:
        raise _Bad(f"{ALIGNMENT_KEY} must be a UINT32, it is a {vtype.name}")
    if value == 0 or value & (value - 1):
        raise _Bad(f"{ALIGNMENT_KEY} is {value}, not a power of two")
    return value


def _tensor_type(raw: int, name: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        qtype = None
    if qtype not in GGML_QUANT_SIZES:
        raise _Bad(f"tensor {_shown(name)} has unknown ggml type {raw}")
    return qtype


def _check_dims(dims: tuple[int, ...], name: str) -> int:
    """The element count of a tensor whose dimensions are all positive and whose product fits in an int64."""
    count = 1
    for d in dims:
        if d == 0 or d > INT64_MAX:
            raise _Bad(f"tensor {_shown(name)} has a dimension of {d} (shape {list(dims)})")
        count *= d
        if count > INT64_MAX:
            raise _Bad(f"tensor {_shown(name)} has more than 2**63-1 elements (shape {list(dims)})")
    return count


def _check_tensor(reader: _Reader, i: int, seen: set[str]) -> TensorEntry:
    """One tensor-info entry: name, dimensions, ggml type (whole blocks per row) and offset."""
    name = _text(reader, f"tensor name {i}", MAX_NAME_BYTES)
    if not name:
        raise _Bad(f"tensor {i} has an empty name")
    if name in seen:
        raise _Bad(f"tensor name {_shown(name)} appears twice")
    seen.add(name)
    (n_dims,) = reader.unpack(_U32, f"the dimension count of {_shown(name)}")
    if n_dims > MAX_DIMS:
        raise _Bad(f"tensor {_shown(name)} has {n_dims} dimensions, more than ggml's {MAX_DIMS}")
    dims = reader.unpack(_DIMS[n_dims], f"the dimensions of {_shown(name)}")
    count = _check_dims(dims, name)
    (raw,) = reader.unpack(_U32, f"the ggml type of {_shown(name)}")
    qtype = _tensor_type(raw, name)
    block, type_size = GGML_QUANT_SIZES[qtype]
    row = dims[0] if dims else 1
    if row % block:
        raise _Bad(f"tensor {_shown(name)} has rows of {row} elements, not a multiple of {qtype.name}'s "
                   f"block of {block}")
    (offset,) = reader.unpack(_U64, f"the data offset of {_shown(name)}")
    return TensorEntry(name, tuple(dims), qtype, offset, count // block * type_size)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _check_placement(tensors: list[TensorEntry], table_end: int, alignment: int, size: int) -> int:
    """The data section's start, after checking that each tensor starts at the running sum of the padded sizes
    before it (as ggml requires) and that the last one ends inside the file."""
    data_start = _pad(table_end, alignment)
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise _Bad(f"tensor {_shown(t.name)} starts at data offset {t.offset}, expected {expected} (each tensor "
                       f"follows the one before, padded to {alignment} bytes)")
        expected += _pad(t.nbytes, alignment)
    if tensors:
        end = data_start + tensors[-1].offset + tensors[-1].nbytes
        if end > size:
            raise _Bad(f"tensor data ends at byte {end}, the file has {size}", TRUNCATED)
    return data_start


def _check_file(file: BinaryIO, size: int) -> GGUFLayout:
    reader = _Reader(file, size)
    version, n_tensors, n_keys = _check_header(reader)
    keys, alignment = _check_metadata(reader, n_keys)
    seen: set[str] = set()
    tensors = [_check_tensor(reader, i, seen) for i in range(n_tensors)]
    data_start = _check_placement(tensors, reader.pos, alignment, size)
    return GGUFLayout(version, keys, alignment, data_start, tuple(tensors))
