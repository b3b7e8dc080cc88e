"""Number formats, specs and the quantize/dequantize primitives (pure tensor math)."""

from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import dequantize, fake_quantize, quantize
from lowbit.formats.registry import format_names, get_format
from lowbit.formats.spec import QuantSpec, parse_spec

__all__ = ["QTensor", "QuantSpec", "dequantize", "fake_quantize", "format_names", "get_format", "parse_spec", "quantize"]
