"""Sensitivity analysis, budgeted mixed precision and the compare report.

``sensitivity``: per-linear and per-block KL divergence measured end to end, and cheap proxies from one
calibration pass; ``allocate``: per-module specs (or GGUF types) minimizing predicted KLD under a bit budget,
solved exactly as an integer program; ``compare``: every option on the same model and tokens, rendered by
``page`` as one HTML page with plots.
"""
