"""Streaming a Hugging Face safetensors folder one block at a time, for models larger than memory.

The model is built on the meta device (no memory). Everything outside the repeated blocks (embeddings,
final norm, head) is materialized and loaded at once; each block's float weights are read from the
files only when the pipeline reaches it, and dropped back to meta once it is quantized, so at most one
block's float weights exist at a time. Non-persistent buffers outside the blocks (rotary frequencies)
are rebuilt by constructing their module again from the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.conv1d import has_conv1d
from lowbit.model.load import CAUSAL_LM, model_kind, validate_safetensors
from lowbit.pipeline.layers import find_blocks


class StreamingSource:
    """A meta-device model whose tensors are read from safetensors files on demand."""

    def __init__(self, folder: str | Path):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        self.folder = Path(folder)
        self.key_to_file = _weight_map(self.folder)
        self.config = AutoConfig.from_pretrained(str(self.folder))
        self.kind = model_kind(self.config)
        auto = AutoModelForCausalLM if self.kind == CAUSAL_LM else AutoModel
        with torch.device("meta"):
            self.model = auto.from_config(self.config, dtype=torch.float32)
        self.model.eval()
        if has_conv1d(self.model):
            raise LowbitError(f"--stream does not read transposed Conv1D projections ({self.config.model_type}) yet; "
                              "run without --stream")
        self.prefix, self.blocks = find_blocks(self.model)
        self._materialize_outside_blocks()

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def load_block(self, index: int) -> None:
        """Read block ``index``'s float weights from disk."""
        block = self.blocks[index]
        block.to_empty(device="cpu")
        self._load(self.block_prefix(index), block)

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s weights (back to the meta device)."""
        self.blocks[index].to("meta")

    def materialized_blocks(self) -> list[int]:
        """Indices of blocks whose weights are in memory now."""
        return [i for i, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]

    def _materialize_outside_blocks(self) -> None:
        block_ids = {id(m) for m in self.blocks.modules()}
        for name, module in self.model.named_modules():
            if id(module) in block_ids:
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.is_meta:
                    key = f"{name}.{pname}" if name else pname
                    setattr(module, pname, nn.Parameter(self._tensor(key, param.shape), requires_grad=False))
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.is_meta:
                    self._rebuild(name, module)
                    break
        if getattr(self.config, "tie_word_embeddings", False) and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def _rebuild(self, name: str, module: nn.Module) -> None:
        try:
            fresh = type(module)(self.config)
        except TypeError:
            raise LowbitError(f"streaming cannot rebuild {type(module).__name__} ({name}); load the model fully") from None
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, fresh)

    def _tensor(self, key: str, shape) -> torch.Tensor:
        file = self.key_to_file.get(key)
        if file is None:
            tied = "lm_head.weight" == key and getattr(self.config, "tie_word_embeddings", False)
            if tied:
                return torch.empty(shape)  # re-tied to the embeddings right after
            raise LowbitError(f"{self.folder}: tensor {key} is missing from the safetensors files")
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key).float()

    def _load(self, prefix: str, module: nn.Module) -> None:
        with torch.no_grad():
            for pname, param in module.named_parameters():
                param.copy_(self._tensor(prefix + pname, param.shape))


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from a sharded index or from the files themselves."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        files = {folder / f for f in set(mapping.values())}
        for file in files:
            validate_safetensors(file)
        return {k: folder / v for k, v in mapping.items()}
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        validate_safetensors(file)
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file for k in f.keys()})
    if not out:
        raise LowbitError(f"{folder} has no .safetensors weights to stream")
    return out
