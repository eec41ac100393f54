"""Benchmark models built in code (no torchvision in the CPU environment).

* :func:`resnet50` — torchvision-equivalent ResNet-50 (v1.5: stride on the 3x3 conv,
  ``self.relu`` reused three times per block, kaiming fan-out init, BN weight 1 / bias 0),
  for 224x224 inputs. ``width_div`` shrinks every width (quick mode only).
* :func:`vgg_cifar` — VGG-11/16 with BatchNorm for 32x32 CIFAR inputs (conv3x3-BN-ReLU
  blocks, five 2x2 max-pools, then one linear layer on the 512-wide 1x1 map), the usual
  CIFAR variant. Every conv is a prunable channel producer (the last one through
  pool -> flatten -> linear).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet50", "vgg_cifar", "VGG_CFGS"]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # called three times, as in torchvision
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width_div: int = 1, num_classes: int = 1000):
        super().__init__()
        w = lambda c: max(1, c // width_div)  # noqa: E731
        self.inplanes = w(64)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(w(64), layers[0], 1)
        self.layer2 = self._make_layer(w(128), layers[1], 2)
        self.layer3 = self._make_layer(w(256), layers[2], 2)
        self.layer4 = self._make_layer(w(512), layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(width_div: int = 1, num_classes: int = 1000) -> ResNet:
    """ResNet-50 as torchvision builds it (25.6 M parameters, 4.09 GMACs at 224x224)."""
    return ResNet((3, 4, 6, 3), width_div=width_div, num_classes=num_classes)


VGG_CFGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGGCifar(nn.Module):
    def __init__(self, cfg, width_div: int = 1, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                v = max(1, int(v) // width_div)
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)  # 32 / 2^5 = 1x1 map
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_cifar(name: str = "vgg16", width_div: int = 1, num_classes: int = 10) -> VGGCifar:
    """VGG-11/16 with BatchNorm for 32x32 inputs (VGG-16: 14.7 M parameters, 313 MMACs)."""
    return VGGCifar(VGG_CFGS[name], width_div=width_div, num_classes=num_classes)
