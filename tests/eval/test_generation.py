"""Generation quality: the greedy loop against hand-computed chains and transformers' own ``generate``, the
metrics against sacrebleu/rouge-score and hand values, divergence spans, and the prompt sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.data.text import default_text
from lowbit.errors import LowbitError
from lowbit.eval.engines import TransformersLM
from lowbit.eval.generation import (Continuations, common_prefix, continuation_text, divergence_span,
                                    generation_metrics, greedy_continuation, rouge_l)
from lowbit.eval.prompts import Prompt, default_prompts, encode_prompts, eval_end_chars, read_prompts
from tests.arch_models import DECODERS, tiny_model
from tests.conftest import make_tokenizer


# ---- the greedy loop ---------------------------------------------------------------------------------------------

def bigram(table: np.ndarray):
    """A 'model' whose next-token logits are a table row of the last token."""
    return lambda ids: table[ids[-1]]


def test_greedy_follows_the_argmax_chain():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((9, 9))
    expected, last = [], 4
    for _ in range(7):  # the obviously-correct chain
        last = int(np.argmax(table[last]))
        expected.append(last)
    assert greedy_continuation(bigram(table), [1, 4], 7) == expected


def test_greedy_stops_at_a_stop_token_and_keeps_it():
    table = np.zeros((5, 5))
    table[0, 1] = table[1, 2] = table[2, 3] = 1.0
    assert greedy_continuation(bigram(table), [0], 10, stop_ids={2}) == [1, 2]
    assert greedy_continuation(bigram(table), [0], 2) == [1, 2]  # no stop ids: exactly new_tokens


def test_greedy_ties_take_the_lowest_id_and_nan_is_an_error():
    assert greedy_continuation(lambda ids: np.array([0.0, 3.0, 3.0]), [0], 2) == [1, 1]
    with pytest.raises(LowbitError, match="the W2 model produced non-finite logits at generated token 1"):
        greedy_continuation(lambda ids: np.array([0.0, np.nan]), [0], 2, label="the W2 model")


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([1, 2], [1, 2, 9]) == 2 and common_prefix([], [1]) == 0


@pytest.mark.parametrize("family", DECODERS)
def test_our_loop_equals_transformers_generate(family):
    """Token for token, on tiny random models of every decoder family, two prompts through one cache."""
    model = tiny_model(family, seed=3)
    lm = TransformersLM(model)
    g = torch.Generator().manual_seed(1)
    seen = set()
    for length in (7, 12):
        prompt = torch.randint(3, 512, (1, length), generator=g)
        with torch.no_grad():
            theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)[0, length:].tolist()
        ours = greedy_continuation(lm, prompt[0].tolist(), 20)
        assert ours == theirs
        seen |= set(ours)
    assert len(seen) > 1  # real continuations, not one token repeated everywhere


# ---- metrics -----------------------------------------------------------------------------------------------------

def pair(ref: str, test: str, ref_ids=(1, 2, 3), test_ids=None) -> Continuations:
    return Continuations(tuple(ref_ids), tuple(ref_ids if test_ids is None else test_ids), ref, test)


def test_identical_continuations_are_perfect():
    texts = ["The quick brown fox jumps over the lazy dog.", "Lists are mutable sequences, typically used to store"]
    pairs = [pair(t, t, ref_ids=range(10 + i)) for i, t in enumerate(texts)]
    m = generation_metrics(pairs)
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0)
    assert m["rouge_l"] == 1.0 and m["exact_match"] == 1.0
    assert m["tokens_to_divergence"] == m["reference_tokens"] == 10.5 and m["prompts"] == 2


def test_known_pair_matches_sacrebleu_rouge_and_hand_values():
    import sacrebleu

    ref, test = "the cat sat on the mat", "the cat lay on the mat"
    m = generation_metrics([pair(ref, test, ref_ids=(5, 6, 7, 8), test_ids=(5, 6, 9, 8))])
    assert m["bleu"] == sacrebleu.corpus_bleu([test], [[ref]]).score
    assert m["chrf"] == sacrebleu.corpus_chrf([test], [[ref]]).score
    # by hand: n-gram precisions 5/6, 3/5, 1/4 and 0/3 (sacrebleu's 'exp' smoothing: 1/(2*3)), lengths equal
    assert m["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, rel=1e-9)
    assert m["rouge_l"] == pytest.approx(5 / 6)  # LCS 5 of 6 words both ways
    assert m["exact_match"] == 0.0 and m["tokens_to_divergence"] == 2 and m["reference_tokens"] == 4


def test_rouge_l_of_identical_texts_without_words_is_one():
    assert rouge_l("...", "...") == 1.0
    assert rouge_l("...", "!!!") == 0.0


def test_corpus_metrics_are_not_means_of_sentences():
    """BLEU/chrF are corpus scores (one set of n-gram counts), ROUGE-L the mean of per-prompt F1."""
    import sacrebleu

    refs, tests = ["a b c d e f", "one two three four"], ["a b c d e f", "one two five four"]
    m = generation_metrics([pair(r, t) for r, t in zip(refs, tests)])
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(tests, [refs]).score)
    assert m["rouge_l"] == pytest.approx((1.0 + 0.75) / 2)


# ---- texts and divergence spans ------------------------------------------------------------------------------------

PIECES = {1: "▁The", 2: "▁cat", 3: "▁sat", 4: "▁lay", 5: "▁on", 6: "."}


def sp_decode(ids):
    """SentencePiece-like: ▁ is a space, and a decoded text never starts with one."""
    return "".join(PIECES[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_continuation_keeps_the_leading_space_a_fragment_would_lose():
    assert sp_decode([2, 3]) == "cat sat"
    assert continuation_text(sp_decode, [1], [2, 3]) == " cat sat"


def test_divergence_span_marks_the_first_different_token():
    prompt, ref, test = [1], [2, 3, 5, 6], [2, 4, 5, 6]
    k = common_prefix(ref, test)
    for ids in (ref, test):
        text = continuation_text(sp_decode, prompt, ids)
        start, end = divergence_span(sp_decode, prompt, ids, k, text)
        assert text[:start] == " cat" and text[start:end] == (" sat" if ids is ref else " lay")
    # a side that stopped where the other went on: an empty span at its end
    text = continuation_text(sp_decode, prompt, [2])
    assert divergence_span(sp_decode, prompt, [2], 1, text) == (4, 4)


def test_divergence_span_covers_a_character_split_between_tokens():
    """Byte tokens: 'é' (C3 A9) and 'è' (C3 A8) share their first byte; the mark must cover the whole character."""
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    ref, test = list(b"ab" + "é".encode()), list(b"ab" + "è".encode())
    k = common_prefix(ref, test)
    assert k == 3
    text = continuation_text(decode, [], ref)
    assert text == "abé" and divergence_span(decode, [], ref, k, text) == (2, 3)
    longer = list(b"ab" + "é".encode() + b"xy")
    text = continuation_text(decode, [], longer)
    assert divergence_span(decode, [], longer, k, text) == (2, 3)


# ---- prompts -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(default_text())


def test_default_prompts_are_deterministic_distinct_and_after_the_eval_windows(tokenizer):
    prompts = default_prompts(tokenizer, n=12)
    assert prompts == default_prompts(tokenizer, n=12) and len(prompts) == 12
    assert len({p.text for p in prompts}) == 12 and len({p.source for p in prompts}) == 12
    text = default_text()
    skip = eval_end_chars(tokenizer, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert skip == len(tokenizer.decode(ids[:8 * 512]))  # offsets agree with decoding the eval tokens
    for p in prompts:
        assert p.source.startswith("pydoc_data.topics:") and len(p.text.split()) == 12 and p.text[0].isupper()
        assert text.find(p.text) >= skip  # from the text after the evaluation windows
    everything = default_prompts(tokenizer, n=1000)
    assert 40 < len(everything) < 79 and set(prompts) <= set(everything)


def test_read_prompts_fields_blank_lines_and_limit(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "First one"}\n\n{"text": "Second", "id": 2}\n"Third"\n{"prompt": "   "}\n'
                    '{"prompt": "Fourth", "text": "not this"}\n')
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["First one", "Second", "Third", "Fourth"]
    assert [p.source for p in prompts] == ["p.jsonl:1", "p.jsonl:3", "p.jsonl:4", "p.jsonl:6"]
    assert [p.text for p in read_prompts(path, 2)] == ["First one", "Second"]


@pytest.mark.parametrize("content, message", [
    ("", "has no usable line"),
    ('\n{"prompt": ""}\n{"text": "  "}\n', "has no usable line"),
    ('{"prompt": "ok"}\n{oops\n', "p.jsonl:2 is not valid JSON"),
    ('{"question": "why"}\n', "p.jsonl:1 has no \"prompt\" or \"text\" string field"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(LowbitError, match=message) as err:
        read_prompts(path)
    assert str(path.name) in str(err.value) and "\n" not in str(err.value)


def test_a_prompt_longer_than_the_context_names_file_and_line(tokenizer):
    prompts = [Prompt("A short one", "p.jsonl:1"), Prompt("word " * 300, "p.jsonl:2")]
    assert len(encode_prompts(tokenizer, prompts[:1], 16, 256, "p.jsonl")[0]) > 0
    with pytest.raises(LowbitError, match=r"p.jsonl: prompt p.jsonl:2 has \d+ tokens; with 16 new tokens it is "
                                          r"longer than the model's context of 256"):
        encode_prompts(tokenizer, prompts, 16, 256, "p.jsonl")

