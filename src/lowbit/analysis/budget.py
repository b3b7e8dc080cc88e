"""``--target-bpw`` / ``--target-size``: from a budget to a recipe (lowbit formats) or a per-tensor GGUF plan.

The budget is parsed (``90MB``, ``1.5GiB``, ``3.5`` bits per weight), the sensitivity analysis is read from
the cache or measured, the allocator picks one candidate per item, and the choice becomes ordinary recipe
rules (one exact module name each), so ``--recipe recipe.yaml`` reproduces it exactly. A GGUF plan is kept in
the recipe's ``options.gguf_types`` (GGUF tensor name -> block type).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.analysis.allocate import Allocation, Item, allocate, build_items, reachable_bits
from lowbit.analysis.candidates import KEEP
from lowbit.analysis.sensitivity import Sensitivity
from lowbit.errors import LowbitError
from lowbit.formats.spec import parse_spec
from lowbit.recipe import Recipe, Rule

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """Either an average bits per weight over the allocated weights, or a total size in bytes."""

    bits_per_weight: float | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bits_per_weight is None) == (self.size_bytes is None):
            raise LowbitError("give exactly one of --target-bpw and --target-size")
        if self.bits_per_weight is not None and not 0 < self.bits_per_weight <= 32:
            raise LowbitError(f"--target-bpw must be between 0 and 32, got {self.bits_per_weight}")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise LowbitError("--target-size must be positive")

    def label(self) -> str:
        if self.bits_per_weight is not None:
            return f"{self.bits_per_weight:g} bpw"
        return f"{self.size_bytes / 1e6:.1f} MB"

    def bits(self, items: list[Item], fixed_bytes: int) -> int:
        """The bit budget of ``items`` (the rest of the output takes ``fixed_bytes``)."""
        if self.bits_per_weight is not None:
            return int(self.bits_per_weight * sum(it.numel for it in items))
        budget = 8 * (self.size_bytes - fixed_bytes)
        if budget <= 0:
            raise LowbitError(f"--target-size {self.label()} is smaller than what stays outside the allocation "
                              f"({fixed_bytes / 1e6:.1f} MB: float tensors, metadata)")
        return budget


def parse_size(text: str) -> int:
    """``90MB``, ``1.5GiB``, ``123456`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise LowbitError(f"--target-size {text!r} must be a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def choose(sens: Sensitivity, budget: Budget, fixed_bytes: int, fuse: bool, exclude: frozenset[str],
           allowed: tuple[str, ...] | None = None) -> Allocation:
    """The optimal allocation of ``sens``'s modules (minus ``exclude``) under ``budget``, choosing among
    ``allowed`` candidates (None: every analyzed one)."""
    items = build_items(sens, fuse=fuse, exclude=exclude, allowed=allowed)
    if not items:
        raise LowbitError("every weight is fixed by a rule or flag: nothing is left for the budget to allocate")
    bits = budget.bits(items, fixed_bytes)
    try:
        return allocate(items, bits, what=f"the target {budget.label()}")
    except LowbitError as exc:
        if budget.size_bytes is None:
            raise
        lo, hi = reachable_bits(items)
        raise LowbitError(f"{exc}; as a total size: {(fixed_bytes + lo / 8) / 1e6:.2f} to "
                          f"{(fixed_bytes + hi / 8) / 1e6:.2f} MB") from None


def allocation_rules(allocation: Allocation, input_spec=None) -> tuple[Rule, ...]:
    """One rule per module: its chosen spec, or keep."""
    rules = []
    for module, candidate in allocation.choices.items():
        spec = None if candidate == KEEP else parse_spec(candidate)
        rules.append(Rule(targets=(module,), spec=spec, input_spec=input_spec if spec is not None else None))
    return tuple(rules)


def allocation_recipe(base: Recipe, allocation: Allocation, budget: Budget, sens: Sensitivity,
                      user_rules: tuple[Rule, ...], input_spec=None) -> Recipe:
    """``base`` with the allocation's rules after the user's own (first match wins, so a user rule still
    decides a module it names); an allocated head is no longer ignored."""
    allocated = set(allocation.choices)
    ignore = tuple(t for t in base.ignore if t not in allocated and not (t == "lm_head" and "lm_head" in allocated))
    options = dict(base.options)
    options["allocation"] = {"target": budget.label(), "sensitivity": sens.fingerprint, "probe": sens.probe,
                             **allocation.describe()}
    return Recipe(scheme=f"mix-{allocation.bits_per_weight:.2f}bpw", method=base.method,
                  float_dtype=base.float_dtype, rules=user_rules + allocation_rules(allocation, input_spec),
                  ignore=ignore, options=options)
