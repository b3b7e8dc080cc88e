"""Quantization methods: (weight, spec, statistics) -> QTensor. No model walking here."""

from __future__ import annotations

from typing import Callable

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor
from lowbit.methods.rtn import rtn

Method = Callable[..., QTensor]

METHODS: dict[str, Method] = {"rtn": rtn}


def get_method(name: str) -> Method:
    """The method called ``name``, or a one-line error listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise LowbitError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None
