"""CNN quantization: the built-in digits ResNet, BatchNorm folding, PTQ and QAT (W8A8, W4A4, XNOR) with
fake-quant modules, QDQ ONNX export for onnxruntime's int8 kernels, and the ResNet-50 size/latency table."""

from lowbit.vision.digits import DigitsSplit, load_digits_split
from lowbit.vision.digits_model import DigitsNetConfig, digits_net
from lowbit.vision.fold import fold_batchnorm, fold_conv_bn
from lowbit.vision.freeze import FrozenCNN, freeze
from lowbit.vision.onnx_export import export_onnx
from lowbit.vision.ptq import calibrate, prepare, quantize_cnn
from lowbit.vision.qat import QATConfig, train_qat
from lowbit.vision.resnet50 import ResNet50, resnet50
from lowbit.vision.schemes import SCHEMES, CNNScheme, get_scheme
from lowbit.vision.train import TrainConfig, accuracy, fit

__all__ = [
    "CNNScheme", "DigitsNetConfig", "DigitsSplit", "FrozenCNN", "QATConfig", "ResNet50", "SCHEMES", "TrainConfig",
    "accuracy", "calibrate", "digits_net", "export_onnx", "fit", "fold_batchnorm", "fold_conv_bn", "freeze",
    "get_scheme", "load_digits_split", "prepare", "quantize_cnn", "resnet50", "train_qat",
]
