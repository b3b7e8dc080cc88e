"""Folders whose weights are already quantized are refused in one line before anything is loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from lowbit.errors import LowbitError
from lowbit.model.load import load_model


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "fp8"])
def test_a_folder_with_a_quantization_config_is_refused(tmp_path, tiny_llama_dir, method):
    folder = tmp_path / "q"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match=f"already quantized \\({method}\\)") as err:
        load_model(str(folder))
    assert "\n" not in str(err.value)


def test_a_lowbit_output_is_refused_as_a_source(tmp_path, tiny_llama_dir):
    folder = tmp_path / "out"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "lowbit.json").write_text("{}")
    with pytest.raises(LowbitError, match="lowbit output"):
        load_model(str(folder))
