"""``--format gguf --target-bpw/--target-size``: one GGUF block type per tensor, chosen under the budget.

Candidates are llama.cpp's block types (``candidates.GGUF_CANDIDATES``); a type is offered for a tensor only if
its block divides the row (llama.cpp's row rule, so e.g. SmolLM2's rows of 576 take the 32-value types and the
k-quants only fit its rows of 1536). llama.cpp runs every tensor on its own, so nothing is fused. A size target
is the whole file: ``lowbit.export.gguf.overhead_bytes`` (header, tokenizer, norms, padding) plus the tensors
the allocation does not decide, at the mix's types, are fixed; the rest is the allocation's budget.
The plan is returned as ``(tensor name, type)`` pairs for ``GGUFExportOptions.types`` and kept in a recipe
(``options.gguf_types``) so that ``--recipe`` writes the same file again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowbit.analysis.allocate import Allocation, build_items
from lowbit.analysis.budget import Budget, choose
from lowbit.analysis.sensitivity import EVAL_TOKENS, AnalyzeOptions, Sensitivity, analyze
from lowbit.errors import LowbitError
from lowbit.model.load import LoadedModel
from lowbit.recipe import Recipe, load_recipe, save_recipe


@dataclass(frozen=True)
class GGUFPlan:
    """The per-tensor types and the allocation behind them."""

    types: tuple[tuple[str, str], ...]
    allocation: Allocation
    sensitivity: Sensitivity


def plan_gguf(loaded: LoadedModel, opts: Any, budget: Budget, candidates: tuple[str, ...] = (),
              progress: bool = True) -> GGUFPlan:
    """Allocate GGUF types for ``opts`` (a GGUFExportOptions) under ``budget``."""
    from lowbit.export.gguf import overhead_bytes
    from lowbit.gguf.plan import planned_tensors, tensor_bytes

    analysis = AnalyzeOptions(model=opts.model, candidates=candidates, formats=("gguf",), calib_text=opts.calib_text,
                              eval_tokens=EVAL_TOKENS if opts.calib_text is None else 0)
    analysis, allowed = analysis.for_allocation()
    sens = analyze(analysis, loaded=loaded, progress=progress)
    planned = [p for p in planned_tensors(loaded, opts.type) if p.quantizable]
    tensor_of = {p.module: p.name for p in planned if p.module}
    exclude = frozenset(m.name for m in sens.modules if m.name not in tensor_of)
    allocated = {tensor_of[m.name] for m in sens.modules if m.name in tensor_of}
    fixed = sum(tensor_bytes(p.choice.type, p.shape) for p in planned if p.name not in allocated)
    # The overhead with every allocated tensor at its first candidate: another plan moves it by padding only.
    items = build_items(sens, fuse=False, exclude=exclude, allowed=allowed)
    if not items:
        raise LowbitError("no tensor of this model can be allocated GGUF types")
    draft = tuple((it.name, it.options[0].candidate) for it in items)
    fixed += overhead_bytes(replace(opts, types=tuple((tensor_of[m], c) for m, c in draft)), loaded)
    allocation = choose(sens, budget, fixed, fuse=False, exclude=exclude, allowed=allowed)
    types = tuple((tensor_of[module], cand) for module, cand in allocation.choices.items())
    return GGUFPlan(types, allocation, sens)


def plan_recipe(plan: GGUFPlan, opts: Any, budget: Budget) -> Recipe:
    """The recipe that writes this file again with ``--format gguf --recipe``."""
    return Recipe(scheme=f"gguf-mix-{plan.allocation.bits_per_weight:.2f}bpw", method=opts.method, rules=(),
                  options={"gguf_type": opts.type, "gguf_types": dict(plan.types),
                           "allocation": {"target": budget.label(), "sensitivity": plan.sensitivity.fingerprint,
                                          **plan.allocation.describe()}})


def recipe_path(gguf_path: str | Path) -> Path:
    """Where a GGUF file's recipe goes: ``model.gguf`` -> ``model.recipe.yaml``."""
    path = Path(gguf_path)
    return path.with_name(path.stem + ".recipe.yaml")


def save_plan_recipe(recipe: Recipe, gguf_path: str | Path) -> Path:
    path = recipe_path(gguf_path)
    save_recipe(recipe, path)
    return path


def types_from_recipe(path: str | Path) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """(base GGUF type, per-tensor types) of a recipe written by a budgeted GGUF export."""
    recipe = load_recipe(path)
    types = recipe.options.get("gguf_types")
    if not isinstance(types, dict) or not types:
        raise LowbitError(f"{path} has no options.gguf_types: it is not the recipe of a budgeted GGUF file")
    return recipe.options.get("gguf_type"), tuple((str(k), str(v)) for k, v in types.items())
