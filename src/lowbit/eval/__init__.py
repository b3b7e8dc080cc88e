"""Measuring what quantization changed: language-model agreement, embedding similarity, sizes."""
