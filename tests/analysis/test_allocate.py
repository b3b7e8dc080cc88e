"""The allocator finds the true optimum of the multiple-choice knapsack, and refuses unreachable budgets."""

from __future__ import annotations

import itertools
import random

import pytest

from lowbit.analysis.allocate import Item, Option, allocate, build_items, reachable_bits
from lowbit.analysis.budget import Budget, parse_size
from lowbit.analysis.sensitivity import ModuleSensitivity, Sensitivity
from lowbit.errors import LowbitError


def _random_items(seed: int, n: int = 6) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        numel = rng.randint(100, 1000)
        options = []
        for bits_per in (2, 3, 4, 8):
            cost = rng.uniform(0.5, 2.0) * 4.0 ** (4 - bits_per) * numel / 1000
            options.append(Option(f"int{bits_per}", bits_per * numel + rng.randint(0, 50), cost))
        items.append(Item(f"m{i}", (f"m{i}",), numel, tuple(options)))
    return items


def _brute_force(items: list[Item], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*(it.options for it in items)):
        if sum(o.bits for o in combo) <= budget:
            best = min(best, sum(o.cost for o in combo))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_the_exact_optimum(seed):
    items = _random_items(seed)
    lo, hi = reachable_bits(items)
    for fraction in (0.1, 0.35, 0.6, 0.9):
        budget = int(lo + fraction * (hi - lo))
        result = allocate(items, budget)
        assert result.bits <= budget
        assert result.predicted_kld == pytest.approx(_brute_force(items, budget), rel=1e-9)
        assert set(result.choices) == {it.name for it in items}


def test_budget_out_of_reach_names_the_range():
    items = _random_items(0)
    lo, hi = reachable_bits(items)
    numel = sum(it.numel for it in items)
    for budget in (lo - 1, hi + 1):
        with pytest.raises(LowbitError) as err:
            allocate(items, budget, what="the target")
        message = str(err.value)
        assert "\n" not in message and f"{lo / numel:.3f}" in message and f"{hi / numel:.3f}" in message


def test_fused_groups_share_one_choice():
    def module(name, group, cost4, cost3):
        return ModuleSensitivity(name, (10, 100), "linear", group, {"a4": 4000, "a3": 3000},
                                 predicted={"a4": cost4, "a3": cost3})

    sens = Sensitivity("m", "f", ["a3", "a4"], "a3", False,
                       [module("q", "q", 0.01, 0.5), module("k", "q", 0.01, 0.01), module("up", "up", 0.01, 0.02)],
                       [], {}, {}, {})
    fused = build_items(sens, fuse=True)
    assert [it.modules for it in fused] == [("q", "k"), ("up",)]
    result = allocate(fused, 11000)  # room for one 4-bit group: the sensitive q/k pair gets it
    assert result.choices == {"q": "a4", "k": "a4", "up": "a3"}
    assert [it.modules for it in build_items(sens, fuse=False)] == [("q",), ("k",), ("up",)]


def test_budget_parsing():
    assert parse_size("90MB") == 90_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("1234") == 1234
    for bad in ("ninety", "90XB", ""):
        with pytest.raises(LowbitError):
            parse_size(bad)
    with pytest.raises(LowbitError):
        Budget()
    with pytest.raises(LowbitError):
        Budget(bits_per_weight=0)
    assert Budget(bits_per_weight=3.5).bits([Item("a", ("a",), 1000, (Option("x", 1, 0.0),))], 0) == 3500
