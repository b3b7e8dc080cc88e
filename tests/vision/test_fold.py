import torch
from torch import nn

from lowbit.vision.fold import fold_batchnorm, fold_conv_bn
from lowbit.vision.smallnet import SmallResNet


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def test_folded_model_matches_unfolded_to_1e5():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    _randomize_bn(model)
    x = torch.randn(16, 1, 8, 8)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=0)


def test_fold_kernel_against_a_loop():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.1
    gamma, beta = torch.randn(4, generator=g), torch.randn(4, generator=g)
    fw, fb = fold_conv_bn(w, b, mean, var, gamma, beta, 1e-5)
    for c in range(4):
        k = gamma[c] / torch.sqrt(var[c] + 1e-5)
        assert torch.allclose(fw[c], w[c] * k, atol=1e-6)
        assert torch.allclose(fb[c], (b[c] - mean[c]) * k + beta[c], atol=1e-6)
