"""Recipe: ordered rules that say which module gets which spec, plus an ignore list. Saved with every output.

A target is a module type name (``Linear``), a name pattern (``lm_head``, ``*.mlp.down_proj``; a bare name
also matches as the last part of a dotted name), or a regular expression prefixed with ``re:``. The first
matching rule wins; ignored modules stay in the recipe's float dtype.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.activation import ActivationSpec, parse_activation_spec
from lowbit.formats.spec import QuantSpec, parse_spec
from lowbit.schemes import FLOAT_DTYPES

RECIPE_VERSION = 1
DEFAULT_IGNORE = ("lm_head",)
KEEP_WORDS = ("keep", "float", "fp16", "bf16", "none")


@dataclass(frozen=True)
class Rule:
    """Modules matching any of ``targets`` get ``spec`` (None keeps them in float)."""

    targets: tuple[str, ...]
    spec: QuantSpec | None
    input_spec: ActivationSpec | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything needed to redo a quantization: scheme name, method, float dtype, rules and ignores."""

    scheme: str
    method: str = "rtn"
    float_dtype: str = "fp16"
    rules: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lowbit.methods import split_method

        split_method(self.method)
        if self.float_dtype not in FLOAT_DTYPES:
            raise LowbitError(f"unknown float dtype {self.float_dtype!r}; use one of {', '.join(FLOAT_DTYPES)}")

    def rule_for(self, name: str, module: nn.Module) -> Rule | None:
        """The first rule matching module ``name``, or None when it is ignored or matches nothing."""
        if any(target_matches(t, name, module) for t in self.ignore):
            return None
        for rule in self.rules:
            if any(target_matches(t, name, module) for t in rule.targets):
                return rule
        return None

    def spec_for(self, name: str, module: nn.Module) -> QuantSpec | None:
        """The spec for the weight of module ``name``, or None when it stays in float."""
        rule = self.rule_for(name, module)
        return rule.spec if rule else None

    def input_spec_for(self, name: str, module: nn.Module) -> ActivationSpec | None:
        """How the input of module ``name`` is quantized (None: left in float)."""
        rule = self.rule_for(name, module)
        return rule.input_spec if rule and rule.spec else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON."""
        return {
            "lowbit_recipe": RECIPE_VERSION,
            "scheme": self.scheme,
            "method": self.method,
            "float_dtype": self.float_dtype,
            "ignore": list(self.ignore),
            "options": dict(self.options),
            "rules": [_rule_dict(r) for r in self.rules],
        }


def _rule_dict(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"targets": list(rule.targets), "spec": str(rule.spec) if rule.spec else "keep"}
    if rule.input_spec is not None:
        out["input"] = str(rule.input_spec)
    return out


def target_matches(target: str, name: str, module: nn.Module) -> bool:
    """Whether one target (type name, glob, or ``re:`` regex) selects module ``name``."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    if target == type(module).__name__:
        return True
    return fnmatch.fnmatchcase(name, target) or fnmatch.fnmatchcase(name, "*." + target)


def parse_rule(text: str) -> Rule:
    """Parse a CLI rule ``PATTERN=SPEC`` (SPEC may be ``keep`` to leave matches in float)."""
    if "=" not in text:
        raise LowbitError(f"rule {text!r} must look like PATTERN=SPEC, e.g. '*.down_proj=int8:channel'")
    pattern, spec_text = (part.strip() for part in text.split("=", 1))
    return Rule(targets=(pattern,), spec=_spec_or_keep(spec_text))


def _spec_or_keep(text: str) -> QuantSpec | None:
    return None if text.lower() in KEEP_WORDS else parse_spec(text)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a recipe from plain data; unknown keys are an error (a typo must not be silently ignored)."""
    known = {"lowbit_recipe", "scheme", "method", "float_dtype", "ignore", "rules", "options"}
    if not isinstance(data, dict):
        raise LowbitError(f"{source}: a recipe must be a mapping with keys {', '.join(sorted(known))}")
    unknown = set(data) - known
    if unknown:
        raise LowbitError(f"{source}: unknown recipe keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    rules = []
    for i, rule in enumerate(data.get("rules") or []):
        if not isinstance(rule, dict) or not {"targets", "spec"} <= set(rule) <= {"targets", "spec", "input"}:
            raise LowbitError(f"{source}: rule {i} must have the keys 'targets' and 'spec' (and optionally 'input')")
        targets = rule["targets"]
        targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
        input_spec = parse_activation_spec(str(rule["input"])) if rule.get("input") else None
        rules.append(Rule(targets=targets, spec=_spec_or_keep(str(rule["spec"])), input_spec=input_spec))
    return Recipe(
        scheme=str(data.get("scheme", "custom")),
        method=str(data.get("method", "rtn")),
        float_dtype=str(data.get("float_dtype", "fp16")),
        rules=tuple(rules),
        ignore=tuple(str(t) for t in data.get("ignore", DEFAULT_IGNORE)),
        options=dict(data.get("options") or {}),
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe file (safe loader only)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LowbitError(f"recipe file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(data, source=str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the recipe as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
