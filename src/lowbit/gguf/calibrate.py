"""Input statistics of a model's linear layers on calibration text, keyed by the GGUF tensor they feed:
the Hessian ``H = sum x x^T`` (for error feedback) and its diagonal over the token count (the importance
matrix llama.cpp's ``llama-imatrix`` computes). Collected with forward hooks; the model is not changed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Calibration:
    """Per GGUF tensor name: the input Hessian (float64, cols x cols); and how many tokens made it."""

    hessians: dict[str, np.ndarray]
    n_tokens: int
    n_chunks: int

    def imatrix(self) -> dict[str, np.ndarray]:
        """Mean squared activation per input column: diag(H) / tokens."""
        return {name: (np.diag(h) / max(self.n_tokens, 1)).astype(np.float32) for name, h in self.hessians.items()}


@torch.inference_mode()
def collect(model: nn.Module, targets: dict[str, str], windows: torch.Tensor, progress: bool = True) -> Calibration:
    """Run ``windows`` (n, length) through ``model``; ``targets`` maps Linear module names to GGUF tensor names."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(gguf_name: str):
        def accumulate(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            h = x.T @ x
            sums[gguf_name] = sums[gguf_name] + h if gguf_name in sums else h
        return accumulate

    for module_name, gguf_name in targets.items():
        hooks.append(modules[module_name].register_forward_hook(hook(gguf_name)))
    try:
        device = next(model.parameters()).device
        for ids in tqdm(windows, desc="calibrate", disable=not progress):
            model(input_ids=ids[None].to(device))
    finally:
        for h in hooks:
            h.remove()
    return Calibration({k: v.cpu().numpy() for k, v in sums.items()}, int(windows.numel()), int(windows.shape[0]))
