"""The safetensors header checks: the reference reader's rules (header length, UTF-8 JSON, dtype, shape x dtype =
span, spans tiling the data exactly) plus duplicate names and ``__metadata__`` of strings, on hand-made headers
and a real file. Every refusal is one LowbitError line naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from lowbit.errors import LowbitError
from lowbit.model.load import validate_safetensors
from lowbit.model.safetensors_checks import MAX_HEADER_BYTES, check_safetensors
from tests.model.untrusted_samples import write_tiny_safetensors


def st_file(tmp_path: Path, header: dict | str | bytes, data: bytes | int = 0, name: str = "m.safetensors") -> Path:
    """A safetensors file from a header (a dict is dumped as JSON, text and bytes are taken as they are)."""
    raw = json.dumps(header) if isinstance(header, dict) else header
    raw = raw.encode() if isinstance(raw, str) else raw
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (bytes(data) if isinstance(data, int) else data))
    return path


def entry(dtype: str = "F32", shape: list = (2, 2), start: int = 0, end: int = 16) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def refused(path: Path, match: str) -> str:
    with pytest.raises(LowbitError, match=match) as err:
        check_safetensors(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_a_real_file_passes(tmp_path):
    path = write_tiny_safetensors(tmp_path / "t.safetensors")
    header = check_safetensors(path)
    validate_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}
        assert f.metadata() == header["__metadata__"] == {"format": "pt", "note": "tiny"}


def test_entries_in_any_order_and_empty_files_pass(tmp_path):
    header = {"b": entry(start=16, end=32), "a": entry(), "__metadata__": None}
    assert set(check_safetensors(st_file(tmp_path, header, 32))) == {"a", "b", "__metadata__"}
    assert check_safetensors(st_file(tmp_path, {})) == {}
    assert check_safetensors(st_file(tmp_path, {"s": entry("F64", [], 0, 8), "e": entry("I32", [0, 4], 8, 8)}, 8))
    assert check_safetensors(st_file(tmp_path, {"f4": entry("F4", [3, 2], 0, 3)}, 3))


@pytest.mark.parametrize("raw, match", [(b"", "fewer than the 8-byte header length"),
                                        (b"\x05\x00", "fewer than the 8-byte"),
                                        (struct.pack("<Q", 0), "header length 0 is outside"),
                                        (struct.pack("<Q", MAX_HEADER_BYTES + 1), "is outside 1..100000000"),
                                        (struct.pack("<Q", 2**64 - 1), "header length 18446744073709551615 is outside"),
                                        (struct.pack("<Q", 100) + b"{}", "header length 100 runs past the end")])
def test_header_length(tmp_path, raw, match):
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    refused(path, match)


@pytest.mark.parametrize("header, match", [(b'{"a": "\xff"}', "not valid UTF-8"),
                                           ("{not json", "not valid JSON"),
                                           ("[1, 2]", "is a JSON list, not an object"),
                                           ("[" * 200_000 + "]" * 200_000, "nests too deeply|not valid JSON"),
                                           ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
                                           ('{"a": 1, "a": 1}', "names 'a' twice"),
                                           ('{"a": NaN}', "holds NaN, which is not JSON"),
                                           ('{"t": {"x": [-Infinity]}}', "holds -Infinity"),
                                           ('{"\\ud800": {}}', "lone surrogate escape"),
                                           ('{"__metadata__": {"k": [["\\udc00"]]}}', "lone surrogate escape"),
                                           ('{"__metadata__": {"k": "1", "k": "2"}}', "names 'k' twice")])
def test_header_json(tmp_path, header, match):
    refused(st_file(tmp_path, header), match)


@pytest.mark.parametrize("bad, match", [
    ({"dtype": "F33"}, "unknown dtype 'F33'"), ({"dtype": ["F32"]}, "unknown dtype"),
    ({"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}, "lowbit cannot read: .*F6_E2M3, which torch"),
    ({"shape": [2, -2]}, "not a list of non-negative integers"), ({"shape": [2.0, 2]}, "non-negative integers"),
    ({"shape": [True, 4]}, "non-negative integers"), ({"shape": "2,2"}, "non-negative integers"),
    ({"data_offsets": [0]}, "not two non-negative integers"), ({"data_offsets": [-1, 15]}, "non-negative"),
    ({"data_offsets": [16, 0]}, "ends \\(byte 0\\) before it starts \\(byte 16\\)"),
    ({"shape": [2, 3]}, "needs 24 bytes, its data_offsets span 16"),
    ({"shape": [2**40, 2**40]}, "overflows a 64-bit byte count"),
    ({"shape": [2**62, 0]}, "overflows"),  # the reference multiplies in order: the overflow comes first
    ({"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}, "needs 1.5 bytes"),
])
def test_entries(tmp_path, bad, match):
    refused(st_file(tmp_path, {"t": {**entry(), **bad}}, 16), match)


def test_an_entry_must_be_an_object(tmp_path):
    refused(st_file(tmp_path, {"t": [1, 2]}, 16), "the entry for 't' is not an object")


@pytest.mark.parametrize("spans, size, match", [
    (((0, 16), (20, 36)), 36, "'b' starts at byte 20 of the data, expected 16: it leaves a hole"),
    (((0, 16), (8, 24)), 24, "'b' starts at byte 8 of the data, expected 16: it overlaps"),
    (((4, 20), (20, 36)), 36, "'a' starts at byte 4 of the data, expected 0"),
    (((0, 16), (16, 32)), 40, "holds 8 bytes after the last tensor's data"),
    (((0, 16), (16, 32)), 31, "is a truncated safetensors file: the header describes 32 bytes of tensor data, "
                              "the file holds 31"),
])
def test_spans_tile_the_data_section(tmp_path, spans, size, match):
    header = {"a": entry(start=spans[0][0], end=spans[0][1]), "b": entry(start=spans[1][0], end=spans[1][1])}
    refused(st_file(tmp_path, header, size), match)


@pytest.mark.parametrize("metadata", [{"k": 1}, ["a"], "text", {"k": None}])
def test_metadata_maps_strings_to_strings(tmp_path, metadata):
    refused(st_file(tmp_path, {"__metadata__": metadata}), "__metadata__ is not an object of strings")


def test_names_from_the_file_cannot_break_the_line(tmp_path):
    message = refused(st_file(tmp_path, {"a\nb": entry(dtype="X")}, 16), "unknown dtype")
    assert r"'a\nb'" in message
    shape = [1] * 100_000 + [3]
    assert len(refused(st_file(tmp_path, {"t": entry(shape=shape)}, 16), "of 100001 dimensions")) < 300


def test_callers_refuse_in_one_line(tmp_path):
    from lowbit.inspect_files import inspect_path
    from lowbit.model.checkpoint import read_header

    bad = st_file(tmp_path, {"a": entry(), "b": entry(start=8, end=24)}, 24)
    for read in (validate_safetensors, read_header, inspect_path):
        with pytest.raises(LowbitError, match="corrupt safetensors file: tensor 'b'") as err:
            read(bad)
        assert "\n" not in str(err.value)
