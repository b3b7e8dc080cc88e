"""Text sources: the default corpus, plain text and jsonl files, windows, and the eval/calibration split."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.data.text import calibration_windows, default_text, eval_windows, load_text, paragraphs
from lowbit.errors import LowbitError


def test_default_text_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    text = default_text()
    assert len(text) > 400_000
    first = sorted(topics)[0]
    assert text.startswith(topics[first])
    assert load_text(None) == text


def test_plain_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(tmp_path / "a.txt") == "hello world"
    lines = [json.dumps({"text": "first"}), "", json.dumps("second"), json.dumps({"text": "third", "id": 3})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    assert load_text(tmp_path / "b.jsonl") == "first\n\nsecond\n\nthird"


@pytest.mark.parametrize("content, match", [("{bad json", "not valid JSON"), ('{"body": "x"}', "no 'text' string field")])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(LowbitError, match=match):
        load_text(tmp_path / "c.jsonl")


def test_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        load_text(tmp_path / "nope.txt")


def test_eval_windows_are_the_first_tokens_and_calibration_never_overlaps():
    ids = torch.arange(10_000)
    ev = eval_windows(ids, 8, 512)
    assert ev.ids.shape == (8, 512) and torch.equal(ev.ids.flatten(), ids[:4096])
    cal = calibration_windows(ids, 4, 512, eval_tokens=ev.n_tokens)
    assert cal.ids.shape == (4, 512)
    assert int(cal.ids.min()) >= 4096
    assert all(int(w[0]) % 512 == 0 for w in cal.ids)  # aligned windows of the remaining stream


def test_short_texts_give_fewer_windows_or_a_clear_error():
    assert eval_windows(torch.arange(1500), 8, 512).ids.shape == (2, 512)
    with pytest.raises(LowbitError, match="only 100 tokens"):
        eval_windows(torch.arange(100), 8, 512)
    with pytest.raises(LowbitError, match="no calibration text left"):
        calibration_windows(torch.arange(1000), 4, 512, eval_tokens=1000)


def test_paragraphs():
    assert paragraphs("short\n\n" + "a" * 30 + "\n\n" + "b" * 25, 5) == ["a" * 30, "b" * 25]
