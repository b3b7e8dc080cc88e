"""End-to-end KL divergence of the model with some weights replaced, measured fast.

The float model's next-token log-probabilities on a few windows and the hidden states entering every block
are computed once. A change inside block ``i`` cannot alter what blocks before ``i`` compute, so each
measurement runs the model from block ``i`` on: the blocks before it are swapped for pass-throughs and block
``i`` receives its cached float input. The model's own forward still runs everything after the blocks (final
norm, head, soft-capping), so nothing architecture-specific is re-implemented here. A change to the token
embedding runs the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.model.finite import check_metrics
from lowbit.pipeline.layers import find_blocks


class _PassThrough(nn.Module):
    """Stands in for a block that cannot be affected: returns its input hidden states as the block would
    (a tensor or a one-element tuple), and answers attribute lookups (``attention_type``, ...) like the block."""

    def __init__(self, block: nn.Module, returns_tuple: bool):
        super().__init__()
        self.__dict__["_block"] = block
        self.__dict__["_tuple"] = returns_tuple

    def forward(self, hidden_states=None, *args, **kwargs):
        return (hidden_states,) if self.__dict__["_tuple"] else hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class KLDProbe:
    """Measures mean KL(float || changed) per position on fixed windows, running only what a change affects."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, compute_dtype: torch.dtype = torch.float32):
        self.model, self.windows, self.dtype = model, windows, compute_dtype
        self.prefix, self.blocks = find_blocks(model)
        self.block_inputs: list[torch.Tensor] = []
        self.returns_tuple = False
        hooks = [b.register_forward_pre_hook(self._capture, with_kwargs=True) for b in self.blocks]
        hooks.append(self.blocks[0].register_forward_hook(self._output_kind))
        try:
            self.reference = self._logprobs()
        finally:
            for h in hooks:
                h.remove()
        self.block_of = {f"{self.prefix}.{i}." if self.prefix else f"{i}.": i for i in range(len(self.blocks))}

    def _capture(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.block_inputs.append(hidden.detach().clone())

    def _output_kind(self, module, args, output):
        self.returns_tuple = isinstance(output, tuple)

    @torch.inference_mode()
    def _logprobs(self) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(input_ids=self.windows, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)

    def block_index(self, module_name: str) -> int | None:
        """The block a module lives in (None: outside every block, e.g. the embedding or the head)."""
        for prefix, index in self.block_of.items():
            if module_name.startswith(prefix):
                return index
        return None

    @contextmanager
    def _from_block(self, index: int) -> Iterator[None]:
        """Run the model from block ``index`` on: earlier blocks pass through, block ``index`` gets its cached input."""
        saved = [self.blocks[i] for i in range(index)]
        cached = self.block_inputs[index]

        def inject(module, args, kwargs):
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        handle = self.blocks[index].register_forward_pre_hook(inject, with_kwargs=True)
        for i, block in enumerate(saved):
            self.blocks[i] = _PassThrough(block, self.returns_tuple)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(saved):
                self.blocks[i] = block

    def kld(self, start_block: int | None) -> float:
        """Mean KL(float || current model) per position, running from ``start_block`` (None: the whole model)."""
        if start_block is None or start_block == 0:
            test = self._logprobs()
        else:
            with self._from_block(start_block):
                test = self._logprobs()
        ref = self.reference
        value = float((ref.exp() * (ref - test)).sum(-1).mean())
        check_metrics({"kld": value}, "a sensitivity measurement")
        return max(value, 0.0)

    @contextmanager
    def replaced(self, weights: dict[nn.Parameter, torch.Tensor]) -> Iterator[None]:
        """Temporarily give parameters other values (restored exactly afterwards)."""
        saved = {p: p.data.clone() for p in weights}
        try:
            with torch.no_grad():
                for p, value in weights.items():
                    p.data.copy_(value.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, value in saved.items():
                    p.data.copy_(value)

    def kld_with(self, weights: dict[nn.Parameter, torch.Tensor], start_block: int | None) -> float:
        """KLD of the model with ``weights`` replaced, run from ``start_block``."""
        with self.replaced(weights):
            return self.kld(start_block)
