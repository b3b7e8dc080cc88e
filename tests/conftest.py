"""Shared fixtures: a tiny random-initialized Llama saved as a real Hugging Face folder, with its own tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_VOCAB = 512


def make_tokenizer(text: str):
    """A small byte-level BPE tokenizer trained on ``text`` and wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[:100_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(seed: int = 0):
    """A 2-layer Llama with rows of 96 (not a multiple of 64) so ragged groups are exercised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Path of a saved tiny Llama folder (config.json, model.safetensors, tokenizer files)."""
    from lowbit.data.text import default_text

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(default_text()).save_pretrained(str(path))
    return path
