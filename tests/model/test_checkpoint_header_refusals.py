"""A lowbit checkpoint whose ``lowbit`` header metadata is not a JSON object (a crafted or damaged file) is refused
in one LowbitError line naming the file, by every reader of the header."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.model.checkpoint import read_header, read_qtensors


@pytest.mark.parametrize("text, match", [("{not json", "is not JSON"), ("[" * 100_000, "is not JSON"),
                                         ('["format_version", 1]', "a JSON list, not an object")])
@pytest.mark.parametrize("reader", [read_header, read_qtensors])
def test_lowbit_metadata_that_is_not_a_json_object(tmp_path, text, match, reader):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"lowbit": text})
    with pytest.raises(LowbitError, match=match) as err:
        reader(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and len(message) < 400, message
