"""Streaming a Hugging Face safetensors folder one block at a time, for models larger than memory.

The model is built on the meta device (no memory): the constructor reads only the config and the files'
headers, so a run can be planned (``lowbit.pipeline.memory_plan``) before any weight is read. Each block's
float weights are read from the files only when the pipeline reaches it, and dropped back to meta once it is
quantized, so at most one block's float weights exist at a time. Everything outside the repeated blocks
(embeddings, final norm, head) is needed only to compute the first block's inputs and at the end (it is
quantized or cast last), so the pipeline loads it for those two moments (``load_outside`` /
``release_outside``): with a large vocabulary it is several blocks' worth. Non-persistent buffers outside the
blocks (rotary frequencies) are rebuilt by constructing their module again from the config.

A sharded folder is read through its ``model.safetensors.index.json`` (``lowbit.model.shards``). Everything
that can be wrong with the files is found before any work: a shard that is missing (named by the index, or a
gap in ``model-0000k-of-0000n``), an index that is not JSON, a tensor listed in a shard that does not hold it,
a parameter of the model that no file holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.conv1d import has_conv1d
from lowbit.model.load import CAUSAL_LM, model_kind, validate_safetensors
from lowbit.model.shards import INDEX_FILE, read_weight_map
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
        self._check_complete()

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

    def release_outside(self) -> None:
        """Drop the parameters outside the blocks (back to the meta device); buffers (rotary tables) stay."""
        for module in self._outside_modules():
            for pname, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    setattr(module, pname, nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False))

    def load_outside(self) -> None:
        """Read the parameters outside the blocks that are not in memory (tied ones re-tied)."""
        self._materialize_outside_blocks()

    def materialized_blocks(self) -> list[int]:
        """Indices of blocks whose weights are in memory now."""
        return [i for i, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]

    def _check_complete(self) -> None:
        """Every parameter of the model is in some file (a tied output head may be absent)."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        for name, _ in self.model.named_parameters():
            if name not in self.key_to_file and not (tied and name == "lm_head.weight"):
                where = f"listed in no shard of {INDEX_FILE}" if (self.folder / INDEX_FILE).is_file() else \
                    "in none of its .safetensors files"
                raise LowbitError(f"{self.folder}: tensor {name} is {where}; the folder is incomplete")

    def _outside_modules(self) -> list[nn.Module]:
        block_ids = {id(m) for m in self.blocks.modules()}
        return [m for m in self.model.modules() if id(m) not in block_ids]

    def _materialize_outside_blocks(self) -> None:
        block_ids = {id(m) for m in self.blocks.modules()}
        for name, module in self.model.named_modules():
            if id(module) in block_ids:
                continue
            for pname, param in list(module.named_parameters(recurse=False)):
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
    if (folder / INDEX_FILE).is_file():
        return read_weight_map(folder)
    files = sorted(folder.glob("*.safetensors"))
    _check_numbered_shards(folder, files)
    out = {}
    for file in files:
        validate_safetensors(file)
        with safe_open(str(file), framework="pt") as f:
            out.update({k: file for k in f.keys()})
    if not out:
        raise LowbitError(f"{folder} has no .safetensors weights to stream")
    return out


_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")


def _check_numbered_shards(folder: Path, files: list[Path]) -> None:
    """Without an index, ``model-0000k-of-0000n`` files must still be all n of them."""
    numbered = [m for m in (_SHARD.fullmatch(f.name) for f in files) if m]
    if not numbered:
        return
    n = int(numbered[0].group(2))
    present = {int(m.group(1)) for m in numbered if int(m.group(2)) == n}
    missing = [k for k in range(1, n + 1) if k not in present]
    if missing:
        width = len(numbered[0].group(1))
        name = f"model-{missing[0]:0{width}d}-of-{numbered[0].group(2)}.safetensors"
        raise LowbitError(f"{folder}: shard {name} is missing ({len(missing)} of {n}) and there is no {INDEX_FILE}")
