"""Training checkpoints that an interrupted QAT run resumes from: safetensors + JSON, never pickle.

A state folder holds ``state.safetensors`` (every trainable parameter by name, and the optimizer's moment
tensors as ``opt.<param index>.<key>``) and ``state.json`` (step, fingerprint of what is being trained,
optimizer hyper-parameters, loss history). Both are written to temporary names and renamed, the JSON last,
so a run killed while saving leaves the previous complete state. A resumed run refuses a state whose
fingerprint (model, recipe, data and training options) differs from its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


@dataclass
class TrainState:
    """Where a run is: optimizer steps done and what was logged on the way."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def save_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
               fingerprint: str) -> None:
    """Write the trainable parameters, optimizer moments and ``state`` into ``folder`` (atomically per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{name}": p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for index, moments in opt["state"].items():
        for key, value in moments.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    meta = {"fingerprint": fingerprint, "step": state.step, "seconds": state.seconds, "history": state.history,
            "param_groups": opt["param_groups"]}
    tmp = folder / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / STATE_TENSORS)
    tmp_json = folder / f".{STATE_JSON}.tmp"
    tmp_json.write_text(json.dumps(meta))
    os.replace(tmp_json, folder / STATE_JSON)


def saved_step(folder: Path) -> int | None:
    """The step of the state saved in ``folder``, or None if there is none (or it cannot be read)."""
    try:
        return int(json.loads((folder / STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def has_state(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> TrainState:
    """Restore parameters and optimizer from ``folder``; refuse a state made for other inputs."""
    try:
        meta: dict[str, Any] = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read the training state in {folder}: {e}") from None
    if meta.get("fingerprint") != fingerprint:
        raise LowbitError(f"the training state in {folder} was made for another model, recipe, data or options; "
                          "remove it or run without --resume")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                name = key[len("param."):]
                if name not in params or params[name].shape != value.shape:
                    raise LowbitError(f"the training state in {folder} does not match the model ({name})")
                params[name].copy_(value)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
    return TrainState(step=int(meta["step"]), history=list(meta["history"]), seconds=float(meta["seconds"]))
