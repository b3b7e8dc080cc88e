"""RTN, GPTQ, AWQ and SmoothQuant on a tiny model of every family in the table: outputs stay finite and
GPTQ's error feedback beats plain rounding."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import parse_spec
from lowbit.pipeline.calibrated import quantize_calibrated
from lowbit.recipe import Recipe, Rule
from tests.arch_models import DECODERS, ENCODERS, lowbit_model, quantized_errors


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_methods_run_finite_and_gptq_beats_rtn(family):
    errors = quantized_errors(family)
    assert all(e > 0 for e in errors.values())
    assert errors["gptq"] < errors["rtn"], errors


def test_a_family_outside_the_table_gets_gptq_but_awq_refuses_in_one_line():
    from lowbit.errors import LowbitError

    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = lambda method: Recipe(scheme="W4A16", method=method, rules=(Rule(("Linear",), parse_spec("int4:g32")),))
    model = lowbit_model("llama")
    model.config.model_type = "my-new-llm"
    with pytest.raises(LowbitError, match="my-new-llm") as err:
        quantize_calibrated(model, recipe("awq"), calib, batch_size=4, progress=False)
    assert "\n" not in str(err.value)
    qm = quantize_calibrated(model, recipe("gptq"), calib, batch_size=4, progress=False)
    assert len(qm.qtensors) == 14
