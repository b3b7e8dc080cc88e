"""A GGUF's tokenizer metadata is read through lowbit's checks and copied as it is: a chat template from an
untrusted file is a string carried verbatim, never rendered or compiled (not while loading, not while copying)."""

from __future__ import annotations

import struct

import gguf
import jinja2
import pytest

from lowbit.errors import LowbitError
from lowbit.gguf.tokenizer import copy_from_gguf
from lowbit.model.load import load_model
from tests.model.untrusted_samples import HOSTILE_TEMPLATE, gguf_file, kv, s, write_tiny_gguf


@pytest.fixture
def no_jinja(monkeypatch):
    """Any attempt to compile or render a template fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a chat template was compiled or rendered")

    monkeypatch.setattr(jinja2.Environment, "from_string", refuse)
    monkeypatch.setattr(jinja2.Environment, "compile", refuse)
    monkeypatch.setattr(jinja2.Template, "render", refuse)


def test_a_hostile_chat_template_is_copied_verbatim(tmp_path, no_jinja):
    path = write_tiny_gguf(tmp_path / "m.gguf", chat_template=HOSTILE_TEMPLATE)
    fields = {key: (vtype, value, sub) for key, vtype, value, sub in copy_from_gguf(path)}
    assert fields["tokenizer.chat_template"] == (gguf.GGUFValueType.STRING, HOSTILE_TEMPLATE, None)
    assert fields["tokenizer.ggml.tokens"][2] == gguf.GGUFValueType.STRING


def test_a_model_with_a_hostile_template_loads_without_rendering_it(tmp_path, no_jinja):
    path = write_tiny_gguf(tmp_path / "m.gguf", chat_template=HOSTILE_TEMPLATE)
    loaded = load_model(str(path))
    assert loaded.tokenizer.chat_template == HOSTILE_TEMPLATE
    assert loaded.tokenizer("the cat").input_ids


def test_an_empty_array_is_not_copied(tmp_path):
    """gguf-py's writer refuses an empty array, and one says nothing: the copy leaves it out."""
    scores = kv("tokenizer.ggml.scores", gguf.GGUFValueType.ARRAY, struct.pack("<IQ", gguf.GGUFValueType.FLOAT32, 0))
    path = gguf_file(tmp_path, [kv("tokenizer.ggml.model", gguf.GGUFValueType.STRING, s("gpt2")), scores])
    assert [key for key, *_ in copy_from_gguf(path)] == ["tokenizer.ggml.model"]


def test_a_corrupt_file_is_refused_before_copying(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[16:24] = (2**63).to_bytes(8, "little")  # the key count
    path.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="corrupt or truncated GGUF"):
        copy_from_gguf(path)
