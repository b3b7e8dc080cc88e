"""Choose one precision per weight (or per group of weights that must share one) to minimize the predicted
KL divergence under a bit budget.

This is a multiple-choice knapsack. It is solved exactly as a 0/1 integer program with SciPy's ``milp``
(the HiGHS solver): one binary per (item, candidate), one "exactly one choice" row per item, one budget row.
Why an integer program rather than dynamic programming: the budget row uses the exact bit counts (a DP needs
them rounded onto a grid, which makes it approximate, or a table as large as the budget), further linear
constraints (per-format rules, latency) are one more row each, and HiGHS proves optimality in milliseconds
for the few hundred items a model has.

Predicted KLD is additive over items: to second order, independent small changes add up. The compare
report puts the measured KLD beside the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lowbit.analysis.sensitivity import ModuleSensitivity, Sensitivity
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Option:
    """One way to store an item: the candidate, its exact bits and its predicted KLD."""

    candidate: str
    bits: int
    cost: float


@dataclass(frozen=True)
class Item:
    """Weights that get one precision together (q/k/v and gate/up that engines fuse, or one tensor)."""

    name: str
    modules: tuple[str, ...]
    numel: int
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate per module, and what the choice costs and predicts."""

    choices: dict[str, str]
    bits: int
    numel: int
    predicted_kld: float
    budget_bits: int
    items: int = 0
    by_candidate: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / max(self.numel, 1)

    def describe(self) -> dict:
        return {"bits_per_weight": round(self.bits_per_weight, 4), "bits": self.bits, "weights": self.numel,
                "budget_bits": self.budget_bits, "predicted_kld": self.predicted_kld, "items": self.items,
                "modules_by_candidate": dict(self.by_candidate)}


def build_items(sens: Sensitivity, fuse: bool = True, exclude: frozenset[str] = frozenset(),
                allowed: tuple[str, ...] | None = None) -> list[Item]:
    """Allocation items from a sensitivity analysis: linears grouped by shared input when ``fuse`` (what
    vLLM fuses into qkv_proj/gate_up_proj), the embedding and an untied head on their own; modules in
    ``exclude`` are left out (the user fixed them). ``allowed`` restricts the candidates."""
    groups: dict[str, list[ModuleSensitivity]] = {}
    for m in sens.modules:
        if m.name in exclude:
            continue
        key = m.group if fuse and m.kind == "linear" else m.name
        groups.setdefault(key, []).append(m)
    items = []
    for key, members in groups.items():
        names = [c for c in sens.candidates if (allowed is None or c in allowed)
                 and all(c in m.bits and c in m.predicted for m in members)]
        options = tuple(Option(c, sum(m.bits[c] for m in members), sum(m.predicted[c] for m in members))
                        for c in names)
        if not options:
            raise LowbitError(f"no candidate precision fits {', '.join(m.name for m in members)}")
        items.append(Item(key, tuple(m.name for m in members), sum(m.numel for m in members), options))
    return items


def reachable_bits(items: list[Item]) -> tuple[int, int]:
    """The smallest and largest total bits any choice gives."""
    return (sum(min(o.bits for o in it.options) for it in items), sum(max(o.bits for o in it.options) for it in items))


def allocate(items: list[Item], budget_bits: int, what: str = "budget") -> Allocation:
    """The choice of one option per item minimizing summed predicted KLD with total bits <= ``budget_bits``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    lo, hi = reachable_bits(items)
    numel = sum(it.numel for it in items)
    if budget_bits < lo or budget_bits > hi:
        raise LowbitError(f"{what} is out of reach: the candidates give {lo / numel:.3f} to {hi / numel:.3f} bits per "
                          f"weight ({lo / 8e6:.2f} to {hi / 8e6:.2f} MB of these weights)")
    index = [(i, j) for i, it in enumerate(items) for j in range(len(it.options))]
    cost = np.array([items[i].options[j].cost for i, j in index])
    bits = np.array([float(items[i].options[j].bits) for i, j in index])
    one = lil_matrix((len(items), len(index)))
    for k, (i, _) in enumerate(index):
        one[i, k] = 1.0
    # Costs are tiny (KLD per position): scale them so HiGHS's absolute tolerances do not decide the optimum.
    scale = 1.0 / max(float(np.abs(cost).max()), 1e-30)
    result = milp(cost * scale, integrality=np.ones(len(index)), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one.tocsr(), 1, 1), LinearConstraint(bits[None], -np.inf, budget_bits)],
                  options={"mip_rel_gap": 1e-9, "time_limit": 120})
    if result.x is None:
        raise LowbitError(f"the allocation solver found no plan within the {what} ({result.message})")
    chosen = [k for k in range(len(index)) if result.x[k] > 0.5]
    choices: dict[str, str] = {}
    by_candidate: dict[str, int] = {}
    total_bits, total_cost = 0, 0.0
    for k in chosen:
        i, j = index[k]
        option = items[i].options[j]
        total_bits += option.bits
        total_cost += option.cost
        for module in items[i].modules:
            choices[module] = option.candidate
            by_candidate[option.candidate] = by_candidate.get(option.candidate, 0) + 1
    return Allocation(choices, total_bits, numel, total_cost, int(budget_bits), len(items), by_candidate)


def frontier(items: list[Item], points: int = 12) -> list[Allocation]:
    """Optimal allocations at evenly spaced budgets between the smallest and largest reachable size."""
    lo, hi = reachable_bits(items)
    return [allocate(items, int(lo + (hi - lo) * k / (points - 1))) for k in range(points)]
