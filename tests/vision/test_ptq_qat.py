import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.vision.ptq import quantize_cnn
from lowbit.vision.qat import QATConfig, train_qat
from lowbit.vision.quant import ActQuant, QConv2d, QLinear, XnorConv2d
from lowbit.vision.train import TrainConfig, accuracy, fit


def test_int8_ptq_drop_below_half_a_point(digits, digits_model):
    q = quantize_cnn(digits_model, "int8", digits.train_x[:512])
    acts = [m for m in q.modules() if isinstance(m, ActQuant)]
    assert sum(not a.signed for a in acts) >= 5 and all(a.bits == 8 for a in acts)  # uint8 after ReLUs
    drop = accuracy(digits_model, digits.test_x, digits.test_y) - accuracy(q, digits.test_x, digits.test_y)
    assert drop < 0.5


def test_w4a4_qat_drop_below_two_points(digits, digits_model):
    q = train_qat(digits_model, digits.train_x, digits.train_y, QATConfig("w4a4", calibration_images=128))
    assert all(m.wq.qmax == 7 for m in q.modules() if isinstance(m, (QConv2d, QLinear)))
    drop = accuracy(digits_model, digits.test_x, digits.test_y) - accuracy(q, digits.test_x, digits.test_y)
    assert drop < 2.0


def test_xnor_keeps_edges_int8_and_learns(digits, digits_model):
    short = TrainConfig(epochs=8, lr=0.1, weight_decay=0.0, optimizer="sgd")
    q = train_qat(digits_model, digits.train_x, digits.train_y, QATConfig("xnor", short, calibration_images=128))
    layers = [m for m in q.modules() if isinstance(m, (QConv2d, QLinear, XnorConv2d))]
    assert isinstance(layers[0], QConv2d) and isinstance(layers[-1], QLinear)
    assert all(isinstance(m, XnorConv2d) for m in layers[1:-1])
    assert accuracy(q, digits.test_x, digits.test_y) > 30.0  # well above chance (10%); 60 epochs: bench/vision_table.py


def test_nan_loss_stops_with_one_line_and_keeps_last_good_state(digits, digits_model):
    model = copy.deepcopy(digits_model)
    x = digits.train_x[:256].clone()
    x[200:] = float("nan")  # the last batches of every epoch are poisoned; epoch 1 never completes
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LowbitError) as err:
        fit(model, x, digits.train_y[:256], TrainConfig(epochs=2, batch_size=256, optimizer="sgd"), what="test")
    assert "\n" not in str(err.value) and "loss is nan" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dataset_shorter_than_a_batch_is_refused(digits, digits_model):
    with pytest.raises(LowbitError, match="fewer than one batch"):
        fit(copy.deepcopy(digits_model), digits.train_x[:10], digits.train_y[:10], TrainConfig(batch_size=64))
