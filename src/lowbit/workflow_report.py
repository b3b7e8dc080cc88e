"""What a quantize job writes beside the weights: the checkpoint's manifest and report.json, and the plan for the
token embedding and output head (whose default keeps a 4-bit output within the size of the model's Q4_K_M GGUF).

Shared by the in-memory job (``lowbit.workflow``), the streamed one (``lowbit.workflow_stream``) and QAT
(``lowbit.workflow_qat``), so the three write the same fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowbit import __version__
from lowbit.eval.estimate import gguf_bytes, recipe_bytes
from lowbit.eval.size import quantized_bits_per_weight
from lowbit.model.apply import QuantizedModel
from lowbit.model.checkpoint import WEIGHTS_FILE, weights_bytes
from lowbit.model.embeddings import EmbeddingPlan, HeadOptions, plan_embeddings
from lowbit.model.load import LoadedModel
from lowbit.recipe import Recipe

if TYPE_CHECKING:
    from lowbit.workflow import QuantizeOptions


def _main_spec(recipe: Recipe) -> str | None:
    specs = [str(r.spec) for r in recipe.rules if r.spec is not None]
    return specs[-1] if specs else None


def checkpoint_manifest(loaded: LoadedModel, recipe: Recipe) -> dict[str, Any]:
    return {"lowbit_version": __version__, "format_version": 1, "source": loaded.source, "kind": loaded.kind,
            "scheme": recipe.scheme, "method": recipe.method, "spec": _main_spec(recipe)}


def checkpoint_report(loaded: LoadedModel, qm: QuantizedModel, out: Path, metrics, seconds) -> dict[str, Any]:
    weights = out / WEIGHTS_FILE
    bpw = quantized_bits_per_weight(weights)
    return {
        "model": loaded.source, "kind": loaded.kind, "scheme": qm.recipe.scheme, "method": qm.recipe.method,
        "spec": _main_spec(qm.recipe), "float_dtype": qm.recipe.float_dtype,
        "size_bytes": weights_bytes(weights), "source_bytes": loaded.source_bytes,
        "bits_per_weight": bpw if bpw is not None else float(16 if qm.recipe.float_dtype != "fp32" else 32),
        "quantized_tensors": len(qm.qtensors), "quantized_weights": sum(q.numel for q in qm.qtensors.values()),
        "eval": metrics, "seconds": seconds, "lowbit_version": __version__,
    }


REFERENCE_GGUF = "Q4_K_M"  # a 4-bit output is never larger than this GGUF mix of the same model


def _size_bound(recipe: Recipe, model: torch.nn.Module) -> int | None:
    """Tensor bytes of the Q4_K_M GGUF of ``model`` when the recipe's main spec has 4 bits or fewer, else None."""
    specs = [r.spec for r in recipe.rules if r.spec is not None]
    if not specs or specs[-1].bits > 4:
        return None
    reference = gguf_bytes(model, REFERENCE_GGUF)
    return None if reference is None else reference["bytes"]


def plan_heads(opts: QuantizeOptions, recipe: Recipe, model: torch.nn.Module) -> EmbeddingPlan:
    """The recipe with rules for the token embedding and output head (flags, or the default, which for 4-bit
    schemes stays within the Q4_K_M GGUF size)."""
    bound = _size_bound(recipe, model)
    fits = None if bound is None else (lambda r: recipe_bytes(model, r) <= bound)
    return plan_embeddings(recipe, model, HeadOptions(opts.embeddings, opts.lm_head), fits)


def heads_report(heads: EmbeddingPlan, qm: QuantizedModel, model: torch.nn.Module, size: int) -> dict[str, Any]:
    """report.json's ``embeddings``/``lm_head`` (what they got and why) and, for 4-bit schemes,
    ``gguf_reference``: the Q4_K_M GGUF's tensor bytes next to the bytes written."""
    out: dict[str, Any] = heads.describe(qm.qtensors)
    bound = _size_bound(qm.recipe, model)
    if bound is not None:
        out["gguf_reference"] = {"type": REFERENCE_GGUF, "tensor_bytes": bound, "output_bytes": size,
                                 "not_larger": size <= bound}
    return out


def write_report(report: dict[str, Any], path: Path) -> None:
    """report.json, pretty-printed."""
    path.write_text(json.dumps(report, indent=2) + "\n")
