"""Spec strings: parsing, canonical form, and one-line errors for impossible specs."""

from __future__ import annotations

import pytest

from lowbit.errors import LowbitError
from lowbit.formats import parse_spec
from lowbit.formats.spec import QuantSpec


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("int4:g128:asym", "int4:g128:asym"),
        ("INT8:channel", "int8:channel"),
        ("int8", "int8:channel"),
        ("int3:group128:asym:mse", "int3:g128:asym:mse"),
        ("int4:b64x32", "int4:b64x32"),
        ("int8:tensor:scale=fp32", "int8:tensor:scale=fp32"),
        ("int2:g64:sym", "int2:g64"),
    ],
)
def test_parse_and_canonical_string(text, canonical):
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec


def test_fields():
    spec = parse_spec("int4:g128:asym:mse")
    assert spec == QuantSpec("int4", "group", 128, (0, 0), False, "fp16", "mse")
    assert spec.bits == 4
    assert spec.block_size(576, 1536) == (1, 128)
    assert parse_spec("int8:channel").block_size(10, 20) == (1, 20)
    assert parse_spec("int8:tensor").block_size(10, 20) == (10, 20)


@pytest.mark.parametrize(
    "text, message",
    [
        ("int9:g128", "unknown number format 'int9'"),
        ("int1", "unknown number format 'int1'"),
        ("int4:g0", "group size must be a positive integer"),
        ("int4:g-8", "group size must be a positive integer"),
        ("int4:b0x8", "block shape must be two positive integers"),
        ("int4:g128:fast", "unknown option 'fast'"),
        ("int4:scale=fp8", "unknown scale dtype"),
        ("", "empty quantization spec"),
    ],
)
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(LowbitError, match=message) as info:
        parse_spec(text)
    assert "\n" not in str(info.value)


def test_spec_is_frozen():
    spec = parse_spec("int4:g128")
    with pytest.raises(Exception):
        spec.group_size = 64  # type: ignore[misc]
