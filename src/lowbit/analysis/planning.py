"""The recipe of a budgeted ``lowbit quantize`` (``--target-bpw`` / ``--target-size``) for lowbit-family formats.

What the user fixed stays fixed: modules named by ``--rule`` or ``--ignore``, and the embedding/head when
``--embeddings``/``--lm-head`` are given, are not allocated (their bytes count as fixed for a size target).
Everything else (every linear in the blocks, the token embedding and an untied head) gets the allocator's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.analysis.allocate import Allocation
from lowbit.analysis.budget import Budget, allocation_recipe, choose
from lowbit.analysis.sensitivity import AnalyzeOptions, Sensitivity, analyze
from lowbit.eval.estimate import FLOAT_BYTES, recipe_bytes
from lowbit.model.embeddings import EmbeddingPlan, head_names, parse_choice
from lowbit.model.load import LoadedModel
from lowbit.recipe import Recipe, Rule, target_matches

HEADER_BYTES_PER_TENSOR = 160  # safetensors JSON header entry, roughly (codes, scales, zeros per weight)


@dataclass(frozen=True)
class BudgetedPlan:
    """The recipe to apply, the allocation behind it, and the sensitivity analysis it used."""

    heads: EmbeddingPlan
    allocation: Allocation
    sensitivity: Sensitivity


def plan_budget(loaded: LoadedModel, base: Recipe, budget: Budget, analysis: AnalyzeOptions, user_rules: tuple[Rule, ...],
                user_ignore: tuple[str, ...], embeddings: str | None, lm_head: str | None, input_spec=None,
                progress: bool = True) -> BudgetedPlan:
    """Analyze (or read the cached analysis), allocate under ``budget``, and build the recipe."""
    model = loaded.model
    emb, head, tied = head_names(model)
    fixed_rules = list(user_rules)
    if embeddings and emb:
        fixed_rules.append(Rule(targets=(emb,), spec=parse_choice(embeddings, "--embeddings")))
    if lm_head and head and not tied:
        fixed_rules.append(Rule(targets=(head,), spec=parse_choice(lm_head, "--lm-head")))
    analysis, allowed = analysis.for_allocation()
    sens = analyze(analysis, loaded=loaded, progress=progress)
    modules = dict(model.named_modules())
    exclude = frozenset(m.name for m in sens.modules if _fixed(m.name, modules[m.name], fixed_rules, user_ignore)
                        or (tied and head and m.name == head and lm_head))
    fixed_bytes = _fixed_bytes(model, base, sens, exclude, tuple(fixed_rules), user_ignore)
    allocation = choose(sens, budget, fixed_bytes, fuse=True, exclude=exclude, allowed=allowed)
    recipe = allocation_recipe(base, allocation, budget, sens, tuple(fixed_rules), input_spec)
    reason = f"budgeted allocation, {budget.label()}"
    heads = EmbeddingPlan(recipe, emb, head, tied, "fixed by --embeddings" if embeddings else reason,
                          "fixed by --lm-head" if lm_head else reason)
    return BudgetedPlan(heads, allocation, sens)


def _fixed(name: str, module: nn.Module, rules: list[Rule], ignore: tuple[str, ...]) -> bool:
    targets = list(ignore) + [t for r in rules for t in r.targets]
    return any(target_matches(t, name, module) for t in targets)


def _fixed_bytes(model: nn.Module, base: Recipe, sens: Sensitivity, exclude: frozenset[str], rules: tuple[Rule, ...],
                 ignore: tuple[str, ...]) -> int:
    """Bytes of everything the allocation does not decide: float tensors, user-fixed weights, header."""
    allocated = [m for m in sens.modules if m.name not in exclude]
    fixed = Recipe(scheme="fixed", method="rtn", float_dtype=base.float_dtype, rules=rules,
                   ignore=tuple(ignore) + tuple(m.name for m in allocated))
    float_bytes = FLOAT_BYTES[base.float_dtype]
    tensors = sum(1 for _ in model.parameters()) + 2 * len(sens.modules)
    return (recipe_bytes(model, fixed) - sum(m.numel for m in allocated) * float_bytes
            + HEADER_BYTES_PER_TENSOR * tensors)
