"""The trained digits ResNet, cached on disk by a hash of everything that determines its weights.

The weights live in ``$LOWBIT_CACHE/vision`` (default ``~/.cache/lowbit/vision``) as safetensors, with the
training config and a format version in the file's metadata; a changed config or version trains anew.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.vision.digits import DigitsSplit, load_digits_split
from lowbit.vision.smallnet import SmallResNet
from lowbit.vision.train import TrainConfig, fit

CACHE_VERSION = 1


@dataclass(frozen=True)
class DigitsNetConfig:
    """What the cached network depends on: data split seed, width, and the optimizer settings."""

    split_seed: int = 0
    width: int = 16
    train: TrainConfig = field(default_factory=TrainConfig)

    def fingerprint(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where trained vision models are kept: ``$LOWBIT_CACHE/vision`` or ``~/.cache/lowbit/vision``."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "vision"


def digits_net(config: DigitsNetConfig = DigitsNetConfig(), data: DigitsSplit | None = None) -> SmallResNet:
    """The float digits ResNet for ``config``: loaded from the cache, or trained (seconds) and cached."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"digits-resnet-{config.fingerprint()}.safetensors"
    torch.manual_seed(config.train.seed)
    model = SmallResNet(width=config.width)
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    data = data or load_digits_split(config.split_seed)
    fit(model, data.train_x, data.train_y, config.train, what="digits float training")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"format_version": str(CACHE_VERSION), "config": json.dumps(asdict(config), sort_keys=True)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    tmp.replace(path)
    return model.eval()
