"""Resumable calibration: the state of a block-by-block run, saved after every finished block.

A run writing ``<out>`` keeps its state in ``<out>.calib-state/`` (beside the output, like QAT's
``<out>.qat-state``):

- ``block-00003.safetensors``, one per finished block: its QTensors and input quantizers stored exactly as
  lowbit's weights file stores them (``lowbit.model.checkpoint.encode_quantized``), and its other float
  parameters as they are after quantization (AWQ/SmoothQuant scales folded in). The quantized weights
  themselves are not stored: they are ``dequantize(QTensor)``.
- ``inputs-00003.safetensors``: the hidden states block 3 computed, one tensor per calibration batch (the
  next block's inputs). Only the latest is kept, so the folder grows by one block's parameters per block.
  The rest of a block's inputs (attention mask, positions, rotary tables) does not change from block to
  block and is recomputed by running the embeddings again.
- ``state.json``: format version, the fingerprint, blocks done, blocks whose bf16 pass was redone in fp32.

Every file is written under a temporary name, fsynced and renamed, ``state.json`` last: it is the commit
point, so a run killed anywhere (``kill -9`` included) leaves the previous complete state. A resumed run
refuses a state whose fingerprint (model files, calibration tokens, recipe and options, software versions)
differs from its own. Tensors only in safetensors, metadata in JSON; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor
from lowbit.model.act_quant import InputQuantizer
from lowbit.model.checkpoint import encode_quantized, read_input_quantizers, read_qtensors, weights_metadata
from lowbit.model.load import validate_safetensors
from lowbit.recipe import Recipe

log = logging.getLogger("lowbit")

STATE_VERSION = 1
STATE_SUFFIX = ".calib-state"
STATE_JSON = "state.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json")
DIFFERENCE_NAMES = {"model": "model", "data": "calibration data", "recipe": "recipe or calibration options",
                    "software": "lowbit/torch/transformers version"}
_READ_ERRORS = (LowbitError, OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)


def state_folder(out_dir: Path) -> Path:
    """Where the calibration state of a run writing ``out_dir`` lives: ``<out_dir>.calib-state`` beside it."""
    return out_dir.parent / f"{out_dir.name}{STATE_SUFFIX}"


@dataclass(frozen=True)
class Fingerprint:
    """Digests of everything that changes a calibrated run's result, one per part so a mismatch can say which."""

    model: str
    data: str
    recipe: str
    software: str

    def differences(self, other: Fingerprint) -> list[str]:
        """Names of the parts that differ from ``other``."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def source_identity(path: Path) -> dict[str, Any]:
    """A model source without hashing its weights: absolute path, and each weight/config file's name, size and
    modification time (a GGUF file, or the files of a Hugging Face folder)."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return {"path": str(path), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def make_fingerprint(source: dict[str, Any], recipe: Recipe, calib_ids: torch.Tensor, batch_size: int,
                     compute_dtype: torch.dtype, stream: bool) -> Fingerprint:
    """The fingerprint of a calibrated run: model source, calibration tokens and batching, recipe with every
    option and the calibration precision, and the versions of lowbit, torch and transformers."""
    import transformers

    ids = calib_ids.to(torch.int64).contiguous()
    data = hashlib.sha256(ids.numpy().tobytes())
    data.update(json.dumps({"shape": list(ids.shape), "batch_size": batch_size}).encode())
    return Fingerprint(
        model=_digest(source), data=data.hexdigest(),
        recipe=_digest({"recipe": recipe.to_dict(), "compute_dtype": str(compute_dtype), "stream": stream}),
        software=_digest({"lowbit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class SavedBlock:
    """One finished block read back: QTensors, other float parameters, static input scales (None: dynamic)."""

    qtensors: dict[str, QTensor]
    floats: dict[str, torch.Tensor]
    input_scales: dict[str, torch.Tensor | None]


class BlockState:
    """The calibration state folder of one run: saved after each finished block, read back on ``--resume``.

    Made by ``BlockState.open``. ``done`` is how many blocks are finished (0 for a fresh run). A fresh run
    over a folder an earlier run left replaces it, but only when it saves its first block, so a run that
    fails before that leaves the old state as it was.
    """

    def __init__(self, folder: Path, fingerprint: Fingerprint, done: int = 0, fp32_blocks: tuple[int, ...] = (),
                 inputs_file: str | None = None, replace: bool = False):
        self.folder, self.fingerprint, self.done = Path(folder), fingerprint, done
        self.fp32_blocks, self.inputs_file, self._replace = list(fp32_blocks), inputs_file, replace

    @classmethod
    def open(cls, folder: Path, fingerprint: Fingerprint, resume: bool) -> BlockState:
        """The state to continue from (``resume``; refused if made for other inputs), or a fresh one."""
        folder = Path(folder)
        if resume and (folder / STATE_JSON).is_file():
            return cls._load(folder, fingerprint)
        if resume:
            log.warning("lowbit: note: no calibration state in %s; starting from the first block", folder)
        elif folder.exists():
            log.warning("lowbit: note: replacing the calibration state an earlier run left in %s (pass --resume "
                        "to continue it instead)", folder)
        return cls(folder, fingerprint, replace=folder.exists())

    @classmethod
    def _load(cls, folder: Path, fingerprint: Fingerprint) -> BlockState:
        try:
            meta = json.loads((folder / STATE_JSON).read_text())
            saved = Fingerprint(**meta["fingerprint"])
            version, done, inputs = meta["lowbit_calib_state"], int(meta["blocks_done"]), meta["inputs"]
            fp32 = tuple(int(i) for i in meta["fp32_blocks"])
        except _READ_ERRORS as exc:
            raise _damaged(folder, STATE_JSON, exc) from None
        if version != STATE_VERSION:
            raise LowbitError(f"the calibration state in {folder} has format version {version}, this lowbit reads "
                              f"{STATE_VERSION}; run without --resume to start over")
        differs = saved.differences(fingerprint)
        if differs:
            what = " and ".join(DIFFERENCE_NAMES[d] for d in differs)
            raise LowbitError(f"the calibration state in {folder} was made with another {what}; run with the same "
                              "inputs, or without --resume to start over (the state is then replaced)")
        log.warning("lowbit: note: resuming from %s: %d blocks already done", folder, done)
        return cls(folder, fingerprint, done, fp32, inputs)

    def read_block(self, index: int) -> SavedBlock:
        """Finished block ``index`` as it was saved."""
        path = self.folder / block_file(index)
        try:
            qtensors, floats = read_qtensors(path)
            scales = {name: scale for name, (_, scale) in read_input_quantizers(path).items()}
        except _READ_ERRORS as exc:
            raise _damaged(self.folder, path.name, exc) from None
        return SavedBlock(qtensors, floats, scales)

    def read_inputs(self) -> list[torch.Tensor]:
        """The hidden states the last finished block computed, one tensor per calibration batch."""
        path = self.folder / str(self.inputs_file)
        try:
            validate_safetensors(path)
            with safe_open(str(path), framework="pt") as f:
                return [f.get_tensor(key) for key in sorted(f.keys())]  # bf16 after a bf16 pass, as the run held them
        except _READ_ERRORS as exc:
            raise _damaged(self.folder, path.name, exc) from None

    def save_block(self, index: int, qtensors: dict[str, QTensor], quantizers: dict[str, InputQuantizer],
                   floats: dict[str, torch.Tensor], outputs: list[torch.Tensor], fp32_blocks: list[int]) -> None:
        """Commit finished block ``index``: its results, its outputs (the next inputs), then ``state.json``."""
        self._prepare()
        tensors, entries = encode_quantized(qtensors, quantizers)
        tensors.update({name: t.contiguous() for name, t in floats.items()})
        _save_atomic(self.folder / block_file(index), tensors, weights_metadata(entries))
        inputs = inputs_file(index)
        batches = {f"batch.{i:05d}": h.contiguous() for i, h in enumerate(outputs)}
        _save_atomic(self.folder / inputs, batches, {"lowbit_calib_inputs": str(STATE_VERSION), "block": str(index)})
        meta = {"lowbit_calib_state": STATE_VERSION, "lowbit_version": __version__,
                "fingerprint": asdict(self.fingerprint), "blocks_done": index + 1, "inputs": inputs,
                "fp32_blocks": list(fp32_blocks)}
        _write_atomic(self.folder / STATE_JSON, (json.dumps(meta, indent=2) + "\n").encode())
        self.done, self.inputs_file, self.fp32_blocks = index + 1, inputs, list(fp32_blocks)
        for old in self.folder.glob("inputs-*.safetensors"):
            if old.name != inputs:
                old.unlink()

    def remove(self) -> None:
        """Delete the folder: the output it was for is written."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _prepare(self) -> None:
        if self._replace:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._replace = False
        self.folder.mkdir(parents=True, exist_ok=True)


def block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def inputs_file(index: int) -> str:
    return f"inputs-{index:05d}.safetensors"


def _damaged(folder: Path, name: str, exc: Exception) -> LowbitError:
    reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
    return LowbitError(f"the calibration state in {folder} is damaged ({name}: {reason}); run without --resume "
                       "to start over")


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file under a temporary name, fsynced, renamed into place, the rename fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _commit(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _commit(tmp, path)


def _commit(tmp: Path, path: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
