"""Apply a recipe to a model: quantize each targeted weight with the recipe's method, cast the rest.

The model is changed in place into its fake-quant twin: every quantized weight holds exactly
dequantize(QTensor), every other parameter holds its value rounded to the recipe's float dtype. So what
is evaluated is bit for bit what is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.formats.qtensor import QTensor
from lowbit.formats.quantize import check_finite, dequantize
from lowbit.formats.spec import QuantSpec
from lowbit.errors import LowbitError
from lowbit.methods import get_method, needs_calibration
from lowbit.model.act_quant import attach_input_quantizer
from lowbit.recipe import Recipe

FLOAT_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class QuantizedModel:
    """The fake-quant model plus what gets written: QTensors and float tensors, keyed by parameter name."""

    model: nn.Module
    recipe: Recipe
    qtensors: dict[str, QTensor] = field(default_factory=dict)
    float_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    fp32_blocks: list[int] = field(default_factory=list)  # blocks whose bf16 calibration overflowed: redone in fp32


def plan(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module, QuantSpec]]:
    """The (module name, module, spec) of every weight the recipe quantizes, in model order.

    A weight shared by several modules (an output head tied to the token embedding) is quantized once, under
    the first module that a rule gives a spec, so it is stored once and the other module reloads tied.
    """
    chosen, seen = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2 and id(weight) not in seen:
            spec = recipe.spec_for(name, module)
            if spec is not None:
                chosen.append((name, module, spec))
                seen.add(id(weight))
    return chosen


def quantize_model(model: nn.Module, recipe: Recipe, progress: bool = True) -> QuantizedModel:
    """Quantize ``model`` in place by ``recipe`` (data-free methods) and return what should be written."""
    start = time.perf_counter()
    for pname, param in model.named_parameters():
        check_finite(param.data, pname)
    if needs_calibration(recipe.method):
        raise LowbitError(f"method {recipe.method} needs calibration data; run it through the calibrated pipeline")
    method = get_method(recipe.method)
    result = QuantizedModel(model=model, recipe=recipe)
    with torch.no_grad():
        for name, module, spec in tqdm(plan(model, recipe), desc=f"{recipe.method} {recipe.scheme}", disable=not progress):
            pname = f"{name}.weight" if name else "weight"
            qt = method(module.weight, spec, name=pname)
            module.weight.data.copy_(dequantize(qt).to(module.weight.dtype))
            result.qtensors[pname] = qt
            input_spec = recipe.input_spec_for(name, module)
            if input_spec is not None:
                if not input_spec.dynamic:
                    raise LowbitError(f"{name}: static activation scales ({input_spec}) need calibration data")
                attach_input_quantizer(module, input_spec)
    cast_float_tensors(model, result)
    result.seconds = time.perf_counter() - start
    return result


def cast_float_tensors(model: nn.Module, result: QuantizedModel, root: nn.Module | None = None, prefix: str = "") -> None:
    """Round every parameter that was not quantized to the recipe's float dtype, in the model and the result.

    ``root``/``prefix`` restrict this to one submodule (a streamed block about to be released); parameters
    on the meta device (released blocks) and ones already stored are skipped.
    """
    float_dtype = FLOAT_TORCH_DTYPES[result.recipe.float_dtype]
    quantized = {id(model.get_parameter(name)) for name in result.qtensors}
    with torch.no_grad():
        for pname, param in (root or model).named_parameters():
            name = prefix + pname
            if id(param) in quantized or not param.is_floating_point() or param.is_meta or name in result.float_tensors:
                continue
            stored = param.data.to(float_dtype)
            param.data.copy_(stored.to(param.dtype))
            result.float_tensors[name] = stored
