"""Calibration and evaluation text: the built-in pydoc corpus, plain text, jsonl."""
