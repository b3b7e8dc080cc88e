"""Token embeddings and the output head: which spec they get, by flag or by default, as ordinary recipe rules.

Why: in small models with large vocabularies the token embedding is a big share of the weights (SmolLM2-135M:
21%, Gemma3-270M: 63%). Kept in fp16 it made a W4A16 Gemma3-270M 1.5x the size of its Q4_K_M GGUF.

Default: when the token embedding holds more than ``EMBEDDING_SHARE`` (20%) of all weight elements and the
recipe quantizes anything, it is stored as ``int8:channel`` (one scale per row, i.e. per token); otherwise it
stays in float. An untied output head stays in float unless asked; a tied head *is* the embedding's tensor:
it is quantized and stored once, under the embedding, and follows the embedding's choice. A caller may pass
``fits`` (does a recipe stay within a size bound?) and then the defaults step down until it fits
(``lowbit.workflow``: a 4-bit output is never larger than the Q4_K_M GGUF of the same model).

The choice is written as rules naming the module (e.g. ``{targets: [model.embed_tokens], spec: int8:channel}``,
or ``spec: keep``) in front of the scheme's rules, so the saved recipe.yaml reproduces it. A recipe whose
rules or ignores already select the embedding is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec, parse_spec
from lowbit.recipe import KEEP_WORDS, Recipe, Rule, target_matches

EMBEDDING_SHARE = 0.20
DEFAULT_SPEC = "int8:channel"
SMALLER_SPEC = "int6:channel"  # 6.03 bits per weight at 640 columns: below Q6_K's 6.5625
SHORT_SPECS = {"int8": "int8:channel", "int4": "int4:g32"}


@dataclass(frozen=True)
class HeadOptions:
    """What was asked for the token embedding and the output head: ``int8`` (per row), ``int4`` (groups of 32),
    ``keep``, any spec string, or None for the default."""

    embeddings: str | None = None
    lm_head: str | None = None


@dataclass(frozen=True)
class EmbeddingPlan:
    """The recipe with the embedding/head rules in it, and why each got what it got (for report.json)."""

    recipe: Recipe
    embedding: str | None  # module names (None: the model has no input embedding)
    head: str | None
    tied: bool
    embedding_reason: str
    head_reason: str

    def describe(self, quantized: dict) -> dict[str, str]:
        """report.json's ``embeddings`` and ``lm_head`` fields from the QTensors actually written."""
        def what(module: str | None, reason: str) -> str:
            qt = quantized.get(f"{module}.weight") if module else None
            return f"{qt.spec if qt is not None else 'keep'} ({reason})"

        out = {"embeddings": what(self.embedding, self.embedding_reason) if self.embedding else "none"}
        if self.head is not None:
            out["lm_head"] = (f"tied to {self.embedding}: {out['embeddings']}" if self.tied
                              else what(self.head, self.head_reason))
        return out


def parse_choice(text: str, flag: str) -> QuantSpec | None:
    """``int8`` -> int8:channel, ``int4`` -> int4:g32, ``keep`` -> None, anything else is a spec string."""
    text = text.strip().lower()
    if text in KEEP_WORDS:
        return None
    try:
        return parse_spec(SHORT_SPECS.get(text, text))
    except LowbitError as exc:
        raise LowbitError(f"{flag} {text!r}: {exc} (or use int8, int4, keep)") from None


def embedding_share(model: nn.Module) -> float:
    """Elements of the token embedding over all parameter elements (a tied head counted once)."""
    emb = model.get_input_embeddings()
    total = sum(p.numel() for p in model.parameters())
    return emb.weight.numel() / total if total else 0.0


def head_names(model: nn.Module) -> tuple[str | None, str | None, bool]:
    """(token embedding module name, output head module name, whether the head is tied to the embedding);
    a name is None where the model has no such module."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = emb is not None and head is not None and head.weight is emb.weight
    return _module_name(model, emb), _module_name(model, head), tied


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _selects(recipe: Recipe, name: str, module: nn.Module) -> bool:
    """Whether the recipe's ignores or rules name this module already (a rule for ``Linear`` does not count)."""
    targets = list(recipe.ignore) + [t for r in recipe.rules for t in r.targets]
    return any(target_matches(t, name, module) for t in targets)


def plan_embeddings(recipe: Recipe, model: nn.Module, opts: HeadOptions,
                    fits: Callable[[Recipe], bool] | None = None) -> EmbeddingPlan:
    """Put the embedding and head choices into ``recipe`` as rules (see the module docstring).

    With ``fits``, defaults (never a flag or a recipe's own rule) step down until the recipe fits: the
    embedding int8 -> int6 (or, at most 20% of the weights, float -> int8 -> int6), then an untied head
    float -> int8 -> int6. Without it, or when nothing fits, the first (resp. last) step is taken.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    emb_module = get_in() if get_in else None
    if not isinstance(emb_module, nn.Embedding):
        if opts.embeddings or opts.lm_head:
            raise LowbitError("--embeddings/--lm-head need a model with a token embedding table")
        return EmbeddingPlan(recipe, None, None, False, "", "")
    get_out = getattr(model, "get_output_embeddings", None)
    head_module = get_out() if get_out else None
    emb, head = _module_name(model, emb_module), _module_name(model, head_module)
    tied = head_module is not None and head_module.weight is emb_module.weight
    if tied and opts.embeddings and opts.lm_head and (
            parse_choice(opts.embeddings, "--embeddings") != parse_choice(opts.lm_head, "--lm-head")):
        raise LowbitError(f"{head} is tied to {emb} (one tensor): give --embeddings and --lm-head the same value, "
                          "or only one of them")
    emb_steps = _embedding_steps(recipe, model, emb, emb_module, opts, tied)
    head_steps = _head_steps(recipe, head, head_module, opts) if head and not tied else [((), False, "")]
    pairs = [(e, head_steps[0]) for e in emb_steps] + [(emb_steps[-1], h) for h in head_steps[1:]]
    for (emb_rules, emb_reason), (head_rules, drop_ignore, head_reason) in pairs:
        ignore = tuple(t for t in recipe.ignore if t not in (head, "lm_head")) if drop_ignore else recipe.ignore
        candidate = replace(recipe, rules=emb_rules + head_rules + recipe.rules, ignore=ignore)
        if fits is None or fits(candidate):
            break
    return EmbeddingPlan(candidate, emb, head, tied, emb_reason, head_reason)


Step = tuple[tuple[Rule, ...], str]


def _embedding_steps(recipe: Recipe, model: nn.Module, emb: str, module: nn.Module, opts: HeadOptions,
                     tied: bool) -> list[Step]:
    """The embedding's (rules, reason) options, most preferred first."""
    if opts.embeddings or (tied and opts.lm_head):
        flag = "--embeddings" if opts.embeddings else "--lm-head"
        spec = parse_choice(opts.embeddings or opts.lm_head or "", flag)
        return [((Rule((emb,), spec),), flag if opts.embeddings else "--lm-head, tied")]
    if _selects(recipe, emb, module):
        return [((), "recipe")]
    if not any(r.spec is not None for r in recipe.rules):
        return [((Rule((emb,), None),), "default: nothing else is quantized")]
    share = embedding_share(model)
    pct = f"default: {100 * share:.0f}% of weights"
    int8 = ((Rule((emb,), parse_spec(DEFAULT_SPEC)),), pct)
    int6 = ((Rule((emb,), parse_spec(SMALLER_SPEC)),), f"{pct}; int8 would exceed the size bound")
    if share > EMBEDDING_SHARE:
        return [int8, int6]
    keep = ((Rule((emb,), None),), f"{pct}, at most {100 * EMBEDDING_SHARE:.0f}%")
    return [keep, (int8[0], f"{pct}; fp16 would exceed the size bound"), int6]


HeadStep = tuple[tuple[Rule, ...], bool, str]


def _head_steps(recipe: Recipe, head: str, module: nn.Module, opts: HeadOptions) -> list[HeadStep]:
    """An untied head's (rules, drop it from the ignore list, reason) options, most preferred first."""
    if opts.lm_head:
        return [((Rule((head,), parse_choice(opts.lm_head, "--lm-head")),), True, "--lm-head")]
    by_default = head == "lm_head" and "lm_head" in recipe.ignore
    if _selects(recipe, head, module) and not by_default:
        return [((), False, "recipe")]
    return [((), False, "default"),
            ((Rule((head,), parse_spec(DEFAULT_SPEC)),), True, "default: fp16 would exceed the size bound"),
            ((Rule((head,), parse_spec(SMALLER_SPEC)),), True, "default: int8 would exceed the size bound")]
