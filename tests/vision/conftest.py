"""A digits ResNet trained briefly (8 epochs, a few seconds) into a temporary cache, shared by the vision tests."""

from __future__ import annotations

import pytest

from lowbit.vision.digits import load_digits_split
from lowbit.vision.digits_model import DigitsNetConfig, digits_net
from lowbit.vision.train import TrainConfig

SHORT = DigitsNetConfig(train=TrainConfig(epochs=8))


@pytest.fixture(scope="session")
def digits():
    return load_digits_split(0)


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("lowbit_cache")))
        return digits_net(SHORT, digits)
