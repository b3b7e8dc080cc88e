import torch

from lowbit.vision.digits_model import DigitsNetConfig, cache_dir, digits_net
from lowbit.vision.train import TrainConfig, accuracy
from tests.vision.conftest import SHORT


def test_split_is_fixed_and_normalized(digits):
    assert digits.train_x.shape == (1438, 1, 8, 8) and digits.test_x.shape == (359, 1, 8, 8)
    assert abs(float(digits.train_x.mean())) < 1e-5 and abs(float(digits.train_x.std()) - 1) < 1e-4


def test_trained_net_is_cached_and_accurate(digits, digits_model, tmp_path_factory, monkeypatch):
    assert accuracy(digits_model, digits.test_x, digits.test_y) > 95.0
    files = list(tmp_path_factory.getbasetemp().glob("lowbit_cache*/vision/*.safetensors"))
    assert any(SHORT.fingerprint() in f.name for f in files)
    monkeypatch.setenv("LOWBIT_CACHE", str(files[0].parents[1]))
    assert cache_dir() == files[0].parent
    again = digits_net(SHORT, digits)  # loaded, not trained: identical weights
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), digits_model.state_dict().values()))
    assert DigitsNetConfig(train=TrainConfig(epochs=9)).fingerprint() != SHORT.fingerprint()
