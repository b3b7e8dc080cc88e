"""ResNet-50 as laid out in He et al. (2016), Table 1, in torchvision's v1.5 variant (stride on the 3x3 conv).

7x7/2 stem conv, 3x3/2 max-pool, then stages of 3, 4, 6, 3 bottleneck blocks (1x1 reduce, 3x3, 1x1 expand
by 4) with 64, 128, 256, 512 inner channels, a 1x1 projection shortcut where the shape changes, global
average pooling and a 1000-way linear layer: 25,557,032 parameters. Random initialization (He normal for
convs) is enough for size and speed measurements; ``width`` shrinks every stage for small tests.
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 convs with BN, ReLU between, projection shortcut when the shape changes."""

    def __init__(self, c_in: int, inner: int, stride: int):
        super().__init__()
        c_out = inner * EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(c_in, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, inner, 3, stride, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = nn.Conv2d(inner, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.downsample = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + self.downsample(x))


class ResNet50(nn.Module):
    """ResNet-50 (ImageNet layout); ``width`` is the first stage's inner width (64 in the paper)."""

    def __init__(self, classes: int = 1000, width: int = 64, stages: tuple[int, ...] = STAGES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        layers, c_in = [], width
        for i, blocks in enumerate(stages):
            inner = width * 2**i
            stage = [Bottleneck(c_in, inner, 1 if i == 0 else 2)]
            c_in = inner * EXPANSION
            stage += [Bottleneck(c_in, inner, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(seed: int = 0, **kwargs) -> ResNet50:
    """A randomly initialized ResNet-50 (seeded), in eval mode."""
    torch.manual_seed(seed)
    return ResNet50(**kwargs).eval()
