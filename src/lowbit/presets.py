"""The seeds' layer strategies as named presets: ordinary recipes (``--preset NAME`` = ``--recipe`` of that data).

- ``layers``: the per-layer-type table (seed 002, 4.1): embeddings 8-bit; attention mixed (q/k/v, which are
  sensitive, 8-bit per channel; the output projection 4-bit grouped); feed-forward 4-bit grouped; output head
  in full precision.
- ``edge``: the IoT case study (seed 002, 6.2): attention kept in 16-bit, feed-forward 8-bit grouped, output head
  in full precision.
- ``mobile``: the phone case study (seed 002, 6.1): everything 4-bit (groups of 128, the embedding in rows of
  groups of 32), "14 GB to 3.5 GB".

Targets are name globs that cover the families lowbit knows (``self_attn``/``attn``/``attention`` for
attention, ``mlp``/``intermediate``/``output.dense`` for the feed-forward part) plus two aliases resolved per
model: ``@embeddings`` (the token embedding) and ``@head`` (the output head). A head tied to the embedding is
one tensor: the embedding's rule decides it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.recipe import Recipe, recipe_from_dict

ATTENTION = ["*.self_attn.*", "*.attn.*", "*.attention.*"]
FEED_FORWARD = ["*.mlp.*", "*.intermediate.*", "*.output.dense"]

PRESETS: dict[str, dict[str, Any]] = {
    "layers": {
        "scheme": "preset-layers",
        "ignore": ["@head"],
        "rules": [
            {"targets": ["@embeddings"], "spec": "int8:channel"},
            {"targets": ["*.q_proj", "*.k_proj", "*.v_proj", "*.qkv_proj", "*.c_attn", "*.query", "*.key", "*.value"],
             "spec": "int8:channel"},
            {"targets": ATTENTION, "spec": "int4:g128:asym"},
            {"targets": FEED_FORWARD, "spec": "int4:g128:asym"},
            {"targets": ["Linear"], "spec": "int4:g128:asym"},
        ],
    },
    "edge": {
        "scheme": "preset-edge",
        "ignore": ["@head"],
        "rules": [
            {"targets": ATTENTION, "spec": "keep"},
            {"targets": FEED_FORWARD, "spec": "int8:g128"},
            {"targets": ["Linear"], "spec": "int8:g128"},
        ],
    },
    "mobile": {
        "scheme": "preset-mobile",
        "ignore": [],
        "rules": [
            {"targets": ["@embeddings"], "spec": "int4:g32:asym"},
            {"targets": ["@head"], "spec": "int4:g32:asym"},
            {"targets": ["Linear"], "spec": "int4:g128:asym"},
        ],
    },
}


def preset_recipe(name: str) -> Recipe:
    """The preset called ``name`` as a recipe (aliases still unresolved), or a one-line error."""
    key = name.lower()
    if key not in PRESETS:
        raise LowbitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return recipe_from_dict(PRESETS[key], source=f"preset {key}")


def resolve_targets(recipe: Recipe, model: nn.Module) -> Recipe:
    """``@embeddings`` / ``@head`` replaced by the model's module names (dropped when it has none)."""
    from lowbit.model.embeddings import head_names

    emb, head, _ = head_names(model)
    aliases = {"@embeddings": emb, "@head": head}

    def resolve(targets: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in targets if t.startswith("@") and t not in aliases]
        if unknown:
            raise LowbitError(f"unknown recipe alias {unknown[0]!r}; known: {', '.join(aliases)}")
        return tuple(aliases.get(t, t) for t in targets if not (t in aliases and aliases[t] is None))

    if not any(t.startswith("@") for r in recipe.rules for t in r.targets) and not any(
            t.startswith("@") for t in recipe.ignore):
        return recipe
    rules = tuple(replace(r, targets=resolve(r.targets)) for r in recipe.rules)
    return replace(recipe, rules=tuple(r for r in rules if r.targets), ignore=resolve(recipe.ignore))
