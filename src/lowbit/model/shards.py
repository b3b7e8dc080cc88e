"""Hugging Face's sharded safetensors layout: ``model-0000k-of-0000n.safetensors`` files and
``model.safetensors.index.json``, whose ``weight_map`` names the file of every tensor.

Read for model sources (``lowbit.model.streaming``) and for lowbit's own outputs (``lowbit.model.checkpoint``),
with one-line errors for an index that is not JSON, names a file that is absent, or lists a tensor its file
does not hold. Written by ``ShardWriter`` group by group (a streamed run's finished blocks), so that no more
than one shard's tensors wait in memory before they are on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.model.load import validate_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_name(k: int, n: int) -> str:
    """The file name of shard ``k`` (1-based) of ``n``, as transformers' ``save_pretrained`` names it."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def read_weight_map(folder: Path, index: str = INDEX_FILE) -> dict[str, Path]:
    """Tensor name -> shard file, from ``folder/index``, every shard checked to exist and to hold its tensors.

    Only the shards' headers are read. A shard name with a folder part (``../x``) is refused: the index may
    only name files beside it.
    """
    folder = Path(folder)
    mapping = _index_mapping(folder, index)
    for name in sorted(set(mapping.values())):
        path = folder / name
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise LowbitError(f"{folder}: {index} names {name!r}, not a .safetensors file beside it")
        if not path.is_file():
            raise LowbitError(f"{folder}: shard {name} named by {index} is missing; copy the whole folder again")
        validate_safetensors(path)
    _check_listed_tensors(folder, index, mapping)
    return {key: folder / name for key, name in mapping.items()}


def _index_mapping(folder: Path, index: str) -> dict[str, str]:
    try:
        data = json.loads((folder / index).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise LowbitError(f"{folder}: {index} is not valid JSON ({reason}); restore it from the original") from None
    mapping = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise LowbitError(f"{folder}: {index} has no weight_map of tensor names to shard files")
    return mapping


def _check_listed_tensors(folder: Path, index: str, mapping: dict[str, str]) -> None:
    """Every tensor the index lists is in the shard it names (a truncated or swapped shard is caught here)."""
    by_file: dict[str, list[str]] = {}
    for key, name in mapping.items():
        by_file.setdefault(name, []).append(key)
    for name, keys in sorted(by_file.items()):
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                held = set(f.keys())
        except (SafetensorError, OSError) as exc:
            raise LowbitError(f"{folder}: cannot read shard {name}: {str(exc).splitlines()[0][:120]}") from None
        absent = sorted(set(keys) - held)
        if absent:
            raise LowbitError(f"{folder}: {index} lists {absent[0]} in {name}, which does not hold it "
                              f"({len(absent)} such tensors); the index and the shards do not belong together")


class ShardWriter:
    """Writes groups of tensors into ``folder`` as shards of at most ``max_bytes`` each; a group is never split
    (one larger than ``max_bytes`` gets a shard of its own).

    ``add`` buffers a group and writes the buffered shard first when the group would not fit in it; ``finish``
    writes the last one and gives the shards their final names. One shard is written as ``model.safetensors``
    with no index, as Hugging Face does; several as ``model-0000k-of-0000n.safetensors`` plus the index.
    ``metadata(entries)`` gives each shard's header metadata from the entries of the groups in it, so every
    shard describes its own tensors. Meant to write into a temporary folder that is renamed when complete.
    """

    def __init__(self, folder: Path, max_bytes: int, metadata: Callable[[dict], dict[str, str]]):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.folder, self.max_bytes, self._metadata = Path(folder), int(max_bytes), metadata
        self._tensors: dict[str, torch.Tensor] = {}
        self._entries: dict = {}
        self._parts: list[tuple[Path, list[str]]] = []
        self._total = 0
        self._finished = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes of tensor data waiting for the current shard to be written."""
        return sum(_nbytes(t) for t in self._tensors.values())

    def add(self, tensors: dict[str, torch.Tensor], entries: dict) -> None:
        """Queue one group of tensors (and its metadata entries) for the current shard."""
        if self._finished:
            raise RuntimeError("ShardWriter.add after finish")
        size = sum(_nbytes(t) for t in tensors.values())
        if self._tensors and self.buffered_bytes + size > self.max_bytes:
            self._flush()
        self._tensors.update({name: t.contiguous() for name, t in tensors.items()})
        self._entries.update(entries)
        self._total += size

    def finish(self) -> list[Path]:
        """Write the last shard and name every shard; returns the weight files in order."""
        if self._finished:
            raise RuntimeError("ShardWriter.finish called twice")
        if self._tensors or not self._parts:
            self._flush()
        self._finished = True
        if len(self._parts) == 1:
            single = self.folder / SINGLE_FILE
            self._parts[0][0].rename(single)
            return [single]
        n = len(self._parts)
        files, weight_map = [], {}
        for k, (part, names) in enumerate(self._parts, start=1):
            final = self.folder / shard_name(k, n)
            part.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files

    def _flush(self) -> None:
        part = self.folder / f".shard-{len(self._parts) + 1:05d}.part"
        save_file(self._tensors, str(part), metadata=self._metadata(self._entries))
        self._parts.append((part, sorted(self._tensors)))
        self._tensors, self._entries = {}, {}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
