"""The bounded GGUF checks: each rule of llama.cpp's gguf.cpp (and the 2024 parser CVE shapes) on hand-made files,
and a real file's layout agreeing with gguf-py's reader. Every refusal is one LowbitError line naming the file."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from lowbit.errors import LowbitError
from lowbit.model import gguf_checks
from lowbit.model.gguf_checks import MAX_ARRAY_ELEMENTS, MAX_KEYS, check_gguf
from lowbit.model.load import validate_gguf
from tests.model.untrusted_samples import gguf_file, info, kv, s, u32, write_tiny_gguf

T = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def f32_tensor(name: str = "w", n: int = 8, offset: int = 0) -> bytes:
    return info(name, (n,), Q.F32, offset)


def refused(path: Path, match: str) -> str:
    with pytest.raises(LowbitError, match=match) as err:
        check_gguf(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_a_real_file_passes_and_agrees_with_gguf_py(tiny):
    layout = check_gguf(tiny)
    reader = validate_gguf(tiny)
    assert layout.data_start == reader.data_offset and layout.alignment == reader.alignment == 32
    assert list(layout.keys) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for entry, tensor in zip(layout.tensors, reader.tensors, strict=True):
        assert (entry.name, entry.type, entry.nbytes) == (tensor.name, tensor.tensor_type, tensor.n_bytes)
        assert entry.dims == tuple(int(d) for d in tensor.shape)
        assert layout.data_start + entry.offset == tensor.data_offset
    assert {t.type.name for t in layout.tensors} == {"F32", "F16", "Q8_0", "Q4_0"}


def test_a_file_with_metadata_only_passes(tmp_path):
    layout = check_gguf(gguf_file(tmp_path, [kv("general.name", T.STRING, s("x")), u32("a.b", 1)]))
    assert layout.keys == ("general.name", "a.b") and layout.tensors == ()


@pytest.mark.parametrize("head, match", [(b"", "not a GGUF file"), (b"GGU", "not a GGUF file"),
                                         (b"GGML" + bytes(20), "bad magic bytes"),
                                         (b"GGUF\x03\x00", "header needs 20 bytes but only 2 are left")])
def test_magic_and_short_headers(tmp_path, head, match):
    path = tmp_path / "m.gguf"
    path.write_bytes(head)
    refused(path, match)


@pytest.mark.parametrize("version, match", [(0, "version 0 is not supported"), (1, "version 1 is not supported"),
                                            (4, "version 4 is not supported"), (0x03000000, "big-endian")])
def test_versions(tmp_path, version, match):
    refused(gguf_file(tmp_path, version=version), match)


def test_version_2_is_read(tmp_path):
    assert check_gguf(gguf_file(tmp_path, [u32("a", 1)], version=2)).version == 2


@pytest.mark.parametrize("n_tensors, n_kv", [(2**63, 0), (2**64 - 1, 0), (0, 2**63), (0, 2**64 - 1), (2**62, 2**62)])
def test_cve_shaped_counts_are_refused_before_any_read(tmp_path, n_tensors, n_kv):
    """CVE-2024-21836-like: n_tensors / n_kv so large that count * entry size overflows or exceeds the file."""
    refused(gguf_file(tmp_path, n_tensors=n_tensors, n_kv=n_kv), "exceed lowbit's limits")


def test_counts_are_checked_against_the_bytes_after_the_header(tmp_path):
    message = refused(gguf_file(tmp_path, [u32("a", 1)], n_kv=1000), "corrupt or truncated")
    assert "1000 metadata keys and 0 tensors need at least 14000 bytes" in message
    refused(gguf_file(tmp_path, n_tensors=100), "0 metadata keys and 100 tensors need at least 2500 bytes")
    refused(gguf_file(tmp_path, n_kv=MAX_KEYS + 1), "exceed lowbit's limits")


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 2**31, 100])
def test_key_length_past_the_end(tmp_path, length):
    """CVE-2024-21802/23605-like: a string length larger than what is left of the file."""
    entry = struct.pack("<Q", length) + b"abc" + bytes(20)
    refused(gguf_file(tmp_path, [entry]), "metadata key 0")


def test_string_value_length_past_the_end_and_over_the_cap(tmp_path):
    refused(gguf_file(tmp_path, [kv("k", T.STRING, struct.pack("<Q", 50) + b"short")]),
            r"the string value of 'k' needs 50 bytes but only 5 are left")
    refused(gguf_file(tmp_path, [kv("k", T.STRING, struct.pack("<Q", 2**40) + b"x")]),
            r"is 1099511627776 bytes long, more than the 1073741824 allowed")


def test_long_strings_are_checked_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_checks, "_CHUNK", 7)  # a multi-byte character then straddles chunk boundaries
    text = "é中" * 50
    assert check_gguf(gguf_file(tmp_path, [kv("k", T.STRING, s(text))])).keys == ("k",)
    refused(gguf_file(tmp_path, [kv("k", T.STRING, s(text.encode()[:-1]))]),
            "the string value of 'k' is not valid UTF-8")


@pytest.mark.parametrize("sub, count", [(T.STRING, 2**62), (T.UINT32, 2**61), (T.UINT64, 2**64 - 1), (T.UINT8, 10**6)])
def test_array_counts_past_the_end(tmp_path, sub, count):
    entry = kv("arr", T.ARRAY, struct.pack("<IQ", sub, count) + bytes(16))
    refused(gguf_file(tmp_path, [entry]), "elements|arrays hold more than")


def test_array_elements_are_bounded_in_all(tmp_path):
    half = MAX_ARRAY_ELEMENTS // 2 + 1
    kvs = [kv(f"a{i}", T.ARRAY, struct.pack("<IQ", T.UINT8, half) + bytes(half)) for i in range(2)]
    refused(gguf_file(tmp_path, kvs), f"more than {MAX_ARRAY_ELEMENTS} elements in all \\(at 'a1'\\)")


def test_string_array_element_past_the_end(tmp_path):
    entry = kv("tokens", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + s("ok") + struct.pack("<Q", 999) + b"xy")
    refused(gguf_file(tmp_path, [entry]), "a string in 'tokens' needs 999 bytes")


def test_nested_arrays_and_unknown_types(tmp_path):
    refused(gguf_file(tmp_path, [kv("a", T.ARRAY, struct.pack("<IQ", T.ARRAY, 0))]), "array of arrays")
    refused(gguf_file(tmp_path, [kv("a", 13, b"\0" * 8)]), "'a' has unknown value type 13")
    refused(gguf_file(tmp_path, [kv("a", T.ARRAY, struct.pack("<IQ", 99, 0))]), "unknown value type 99")


def test_empty_and_duplicate_keys(tmp_path):
    refused(gguf_file(tmp_path, [u32("", 1)]), "metadata key 0 is empty")
    refused(gguf_file(tmp_path, [u32("a", 1), u32("b", 1), u32("a", 2)]), "metadata key 'a' appears twice")


def test_names_from_the_file_cannot_break_the_line(tmp_path):
    message = refused(gguf_file(tmp_path, [u32("x\ny", 1), u32("x\ny", 1)]), "appears twice")
    assert r"'x\ny'" in message
    long_key = "k" * 10_000
    assert len(refused(gguf_file(tmp_path, [u32(long_key, 1), u32(long_key, 1)]), "appears twice")) < 300


def test_booleans_are_0_or_1(tmp_path):
    assert check_gguf(gguf_file(tmp_path, [kv("b", T.BOOL, b"\x01")]))
    refused(gguf_file(tmp_path, [kv("b", T.BOOL, b"\x02")]), "boolean 'b' holds 2")
    refused(gguf_file(tmp_path, [kv("b", T.ARRAY, struct.pack("<IQ", T.BOOL, 3) + b"\x00\x01\xff")]),
            "boolean array 'b' holds a value other than 0 or 1")


@pytest.mark.parametrize("where", ["key", "value", "array", "tensor"])
def test_strings_are_utf8(tmp_path, where):
    bad = b"ab\xff"
    if where == "tensor":
        path = gguf_file(tmp_path, tensors=[info(bad, (8,), Q.F32, 0)], data=bytes(32))
    else:
        entry = {"key": kv(bad, T.UINT8, b"\0"), "value": kv("k", T.STRING, s(bad)),
                 "array": kv("k", T.ARRAY, struct.pack("<IQ", T.STRING, 1) + s(bad))}[where]
        path = gguf_file(tmp_path, [entry])
    refused(path, "not valid UTF-8")


@pytest.mark.parametrize("entry, match", [
    (kv("general.alignment", T.UINT64, struct.pack("<Q", 32)), "must be a UINT32"),
    (u32("general.alignment", 0), "is 0, not a power of two"), (u32("general.alignment", 48), "is 48, not a power of two"),
])
def test_alignment_is_a_u32_power_of_two(tmp_path, entry, match):
    refused(gguf_file(tmp_path, [entry]), match)


def test_a_custom_alignment_places_the_data(tmp_path):
    tensors = [f32_tensor("a", 8, 0), f32_tensor("b", 8, 64)]
    path = gguf_file(tmp_path, [u32("general.alignment", 64)], tensors, bytes(96), alignment=64)
    layout = check_gguf(path)
    assert layout.alignment == 64 and layout.data_start % 64 == 0
    assert layout.data_start == gguf.GGUFReader(str(path)).data_offset


def test_tensor_names(tmp_path):
    ok = gguf_file(tmp_path, tensors=[f32_tensor("n" * 63)], data=bytes(32))
    assert check_gguf(ok).tensors[0].name == "n" * 63
    refused(gguf_file(tmp_path, tensors=[f32_tensor("n" * 64)], data=bytes(32)), "64 bytes long, more than the 63")
    refused(gguf_file(tmp_path, tensors=[f32_tensor("")], data=bytes(32)), "tensor 0 has an empty name")
    refused(gguf_file(tmp_path, tensors=[f32_tensor("w", 8, 0), f32_tensor("w", 8, 32)], data=bytes(64)),
            "tensor name 'w' appears twice")


@pytest.mark.parametrize("dims, match", [((1, 1, 1, 1, 1), "5 dimensions, more than ggml's 4"),
                                         ((8, 0), "a dimension of 0"), ((2**63,), "a dimension of 9223372036854775808"),
                                         ((2**32, 2**32), "more than 2\\*\\*63-1 elements"),
                                         ((2**62, 2, 2), "more than 2\\*\\*63-1 elements")])
def test_tensor_dimensions(tmp_path, dims, match):
    refused(gguf_file(tmp_path, tensors=[info("w", dims, Q.F32, 0)], data=bytes(32)), match)


@pytest.mark.parametrize("qtype, match", [(4, "unknown ggml type 4"), (2**31, "unknown ggml type 2147483648"),
                                          (1000, "unknown ggml type 1000")])
def test_tensor_types(tmp_path, qtype, match):
    refused(gguf_file(tmp_path, tensors=[info("w", (32,), qtype, 0)], data=bytes(64)), match)


def test_rows_hold_whole_blocks(tmp_path):
    refused(gguf_file(tmp_path, tensors=[info("w", (48, 2), Q.Q8_0, 0)], data=bytes(128)),
            "rows of 48 elements, not a multiple of Q8_0's block of 32")
    refused(gguf_file(tmp_path, tensors=[info("w", (), Q.Q4_K, 0)], data=bytes(256)), "rows of 1 elements")
    assert check_gguf(gguf_file(tmp_path, tensors=[info("w", (64, 2), Q.Q8_0, 0)], data=bytes(136)))


@pytest.mark.parametrize("offsets, match", [((8, 32), "'a' starts at data offset 8, expected 0"),
                                            ((0, 16), "'b' starts at data offset 16, expected 32"),
                                            ((0, 64), "'b' starts at data offset 64, expected 32"),
                                            ((32, 0), "'a' starts at data offset 32, expected 0")])
def test_offsets_are_the_running_padded_sum(tmp_path, offsets, match):
    tensors = [f32_tensor("a", 5, offsets[0]), f32_tensor("b", 5, offsets[1])]
    refused(gguf_file(tmp_path, tensors=tensors, data=bytes(128)), match)


def test_tensor_data_inside_the_file(tmp_path, tiny):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:-1])
    message = refused(cut, "is a truncated GGUF file: tensor data ends at byte")
    assert f"the file has {tiny.stat().st_size - 1}" in message
    exact = gguf_file(tmp_path, tensors=[f32_tensor("a", 5)], data=bytes(20))  # the last tensor needs no padding
    assert check_gguf(exact).tensors[0].nbytes == 20


def test_validate_gguf_and_its_callers_refuse_in_one_line(tmp_path):
    from lowbit.gguf.tokenizer import copy_from_gguf
    from lowbit.inspect_files import inspect_path

    bad = gguf_file(tmp_path, n_kv=2**63)
    for read in (validate_gguf, copy_from_gguf, inspect_path):
        with pytest.raises(LowbitError, match="corrupt or truncated GGUF") as err:
            read(bad)
        assert "\n" not in str(err.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(LowbitError, match="cannot read"):
        check_gguf(tmp_path / "absent.gguf")
