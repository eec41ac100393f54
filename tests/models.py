"""Small hand-written test models (no torchvision), fast on a couple of CPU cores.

Each builder returns a freshly initialised ``nn.Module``; ``example_input(name)`` gives a
small batch (2 samples) it accepts. ``MODELS`` maps the names to the builders.

Channel structure (what ``chase_ext.graph.find_channel_groups`` should find by default):

* ``vgg_small``: every conv is prunable (the last one through pool -> flatten -> linear,
  a Consumer with repeat = H*W of the final map), and ``classifier.0`` (linear -> relu ->
  linear). ``classifier.3`` feeds the model output.
* ``resnet_basic``: stem -> maxpool -> identity-residual block, so the stem is *not*
  prunable; ``layerX.Y.conv1`` are prunable; ``conv2`` and ``downsample.0`` feed adds.
* ``resnet_bottleneck``: torchvision-like (``self.relu`` called 3 times per block); the
  first block has a downsample, so the stem feeds only convs and is prunable;
  ``conv1``/``conv2`` of every block are prunable, ``conv3``/``downsample.0`` are not.
* ``mobilenet_v2_small``: stem (16) -> block 1 (expand ratio 1, 16 -> 8, no residual):
  the stem is prunable through block 1's depthwise conv; every expand conv is prunable
  through its depthwise conv; project convs whose output meets a residual add are not
  (``features.2.conv.2``, ``features.3.conv.2``), the others are (``features.1.conv.1``,
  ``features.4.conv.2``); the last conv is prunable through pool -> flatten -> linear.
* ``mlp``: ``0`` (through BatchNorm1d) and ``3`` prunable; ``5`` feeds the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "vgg_small",
    "resnet_basic",
    "resnet_bottleneck",
    "mobilenet_v2_small",
    "mlp",
    "example_input",
    "MODELS",
    "resnext_small",
    "zero_inputs_",
    "mask_channels_",
    "TinyResNeXt",
    "keep_per_block",
]


# --------------------------------------------------------------------------- VGG
class VGGSmall(nn.Module):
    def __init__(self, cfg=(8, "M", 16, "M", 32, 32, "M"), in_ch=3, size=32, num_classes=10, hidden=32):
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_ch, size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                s //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * s * s, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )
        self.final_hw = s * s

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg_small(in_ch: int = 3, size: int = 32, num_classes: int = 10) -> nn.Module:
    return VGGSmall(in_ch=in_ch, size=size, num_classes=num_classes)


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # reused three times, like torchvision
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


class GroupedBottleneck(Bottleneck):
    """ResNeXt's bottleneck: a grouped 3x3 conv (4 conv groups) at twice the width."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=4):
        super().__init__(inplanes, planes, stride, downsample)
        width = planes * 2
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)


class ResNet(nn.Module):
    def __init__(self, block, layers, widths=(8, 16), stem=8, in_ch=3, num_classes=10):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_basic(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    """Stem 8 -> layer1: 1 block (identity shortcut) -> layer2: 2 blocks (first downsamples)."""
    return ResNet(BasicBlock, (1, 2), widths=(8, 16), stem=8, in_ch=in_ch, num_classes=num_classes)


def resnet_bottleneck(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    """Stem 8 -> layer1: 2 bottlenecks (4 -> 16, first with downsample) -> layer2: 2 (8 -> 32)."""
    return ResNet(Bottleneck, (2, 2), widths=(4, 8), stem=8, in_ch=in_ch, num_classes=num_classes)


def resnext_small(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    """resnet_bottleneck with ResNeXt blocks: grouped 3x3 convs of 8 and 16 channels in 4
    conv groups (only ``grouped_channels`` prunes through them)."""
    return ResNet(GroupedBottleneck, (2, 2), widths=(4, 8), stem=8, in_ch=in_ch, num_classes=num_classes)


@torch.no_grad()
def zero_inputs_(weight: torch.Tensor, consumer, drop: torch.Tensor, channels: int, offset: int = 0) -> None:
    """Zero what ``consumer`` (a ``chase_ext.groups.Consumer``) reads of channels ``drop``
    of a group of ``channels``: its columns (from ``offset`` on, inside a concatenation),
    or for a grouped conv the column of each channel in the rows of its conv group."""
    if consumer.groups == 1:
        cols = (drop.view(-1, 1) * consumer.repeat + torch.arange(consumer.repeat, device=drop.device)).reshape(-1)
        weight[:, cols + offset] = 0
        return
    a, b = channels // consumer.groups, weight.shape[0] // consumer.groups
    for c in drop.tolist():
        j = c // a
        weight[j * b:(j + 1) * b, c % a] = 0


@torch.no_grad()
def mask_channels_(model: nn.Module, groups, keep) -> None:
    """The 'masked' model: the channels not in ``keep`` (per group) get their producer rows
    and biases and their consumers' inputs zeroed."""
    mods = dict(model.named_modules())
    for g, k in zip(groups, keep):
        drop = torch.ones(g.channels, dtype=torch.bool)
        drop[k] = False
        d = drop.nonzero().flatten().to(next(model.parameters()).device)
        for p in g.producers:
            mods[p].weight[d] = 0
            if mods[p].bias is not None:
                mods[p].bias[d] = 0
        for c in g.consumers:
            zero_inputs_(mods[c.module].weight, c, d, g.channels, g.offsets.get(c.module, 0))


class TinyResNeXt(nn.Module):
    """Bottlenecks whose 3x3 conv is grouped (ResNeXt, RegNet): under SPEC their 1x1 convs
    cannot shrink alone, and the block outputs are residual-coupled; input (N, 3, H, W)."""

    def __init__(self, width=32, groups=4, bias=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(64, width, 1, bias=bias) for _ in range(2))
        self.b = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=bias) for _ in range(2))
        self.c = nn.ModuleList(nn.Conv2d(width, 64, 1) for _ in range(2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for a, b, c in zip(self.a, self.b, self.c):
            x = torch.relu(x + c(torch.relu(b(torch.relu(a(x))))))
        return self.fc(x.mean((2, 3)))


def keep_per_block(channels: int, blocks: int, keep_per: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted random channels to keep, ``keep_per`` of each of ``blocks`` equal blocks."""
    width = channels // blocks
    return torch.cat([torch.randperm(width, generator=gen)[:keep_per] + j * width for j in range(blocks)]).sort().values


# --------------------------------------------------------------------------- MobileNetV2
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Small(nn.Module):
    # (expand_ratio, out_channels, stride)
    SETTING = ((1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2))

    def __init__(self, in_ch=3, num_classes=10, stem=16, last=32):
        super().__init__()
        feats: list[nn.Module] = [ConvBNReLU(in_ch, stem, stride=2)]
        c = stem
        for t, cout, s in self.SETTING:
            feats.append(InvertedResidual(c, cout, s, t))
            c = cout
        feats.append(ConvBNReLU(c, last, kernel=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2_small(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    return MobileNetV2Small(in_ch=in_ch, num_classes=num_classes)


# --------------------------------------------------------------------------- EfficientNet
def efficientnet_small(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    """chase_ext.training's EfficientNet (MBConv blocks with squeeze-and-excitation): stem 16
    -> 16->8 (expand 1) -> 8->12 (expand 4, stride 2) -> 12->12 (residual) -> head 48."""
    from chase_ext.training import efficientnet

    return efficientnet(((1, 8, 1, 1), (4, 12, 2, 2)), stem=16, head=48, in_ch=in_ch, num_classes=num_classes)


class GatedMLP(nn.Module):
    """A transformer MLP's SwiGLU (``w2(silu(w1(x)) * w3(x))``) between two linears."""

    def __init__(self, in_features=20, dim=16, hidden=32, num_classes=5):
        super().__init__()
        self.inp = nn.Linear(in_features, dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.inp(x)
        return self.head(self.w2(nn.functional.silu(self.w1(x)) * self.w3(x)))


# --------------------------------------------------------------------------- MLP
def mlp(in_features: int = 20, hidden: int = 32, num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class DenseLayer(nn.Module):
    """DenseNet's layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3 over the concatenation of all earlier
    outputs of its block (torchvision's layout)."""

    def __init__(self, cin, growth, inner):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth, 3, padding=1, bias=False)

    def forward(self, feats):
        x = self.conv1(torch.relu(self.norm1(torch.cat(feats, 1))))
        return self.conv2(torch.relu(self.norm2(x)))


class TinyDenseNet(nn.Module):
    """Two dense blocks (3 and 2 layers, growth 6) with a transition: every layer's output
    is read inside concatenations, through a norm (under SPEC, only the inner convs
    prune); input (N, 3, H, W)."""

    def __init__(self, in_ch=3, num_classes=10, growth=6, inner=12):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.block1 = nn.ModuleList(DenseLayer(8 + i * growth, growth, inner) for i in range(3))
        self.tnorm = nn.BatchNorm2d(8 + 3 * growth)
        self.tconv = nn.Conv2d(8 + 3 * growth, 10, 1, bias=False)
        self.block2 = nn.ModuleList(DenseLayer(10 + i * growth, growth, inner) for i in range(2))
        self.norm5 = nn.BatchNorm2d(10 + 2 * growth)
        self.fc = nn.Linear(10 + 2 * growth, num_classes)

    def forward(self, x):
        feats = [F.max_pool2d(torch.relu(self.norm0(self.stem(x))), 2)]
        for layer in self.block1:
            feats.append(layer(feats))
        x = F.avg_pool2d(self.tconv(torch.relu(self.tnorm(torch.cat(feats, 1)))), 2)
        feats = [x]
        for layer in self.block2:
            feats.append(layer(feats))
        x = torch.relu(self.norm5(torch.cat(feats, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet_small(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    return TinyDenseNet(in_ch, num_classes)


class TinyInception(nn.Module):
    """Inception-style branches (1x1; 1x1 -> 3x3; pool -> 1x1) concatenated, a SqueezeNet
    Fire module (squeeze, then 1x1 and 3x3 expands concatenated), and a head reading a
    concatenation of flattened maps at several column offsets (a 2x2 map, 4 columns per
    channel, then a pooled one); input (N, 3, H, W)."""

    def __init__(self, in_ch=3, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 12, 3, padding=1)
        self.b1 = nn.Conv2d(12, 8, 1)
        self.b2a = nn.Conv2d(12, 6, 1)
        self.b2b = nn.Conv2d(6, 10, 3, padding=1)
        self.b3 = nn.Conv2d(12, 4, 1)
        self.bn = nn.BatchNorm2d(22)
        self.squeeze = nn.Conv2d(22, 8, 1)
        self.e1 = nn.Conv2d(8, 8, 1)
        self.e3 = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(22, 6, 1)
        self.fc = nn.Linear(16 * 4 + 6, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([self.b1(x), self.b2b(torch.relu(self.b2a(x))), self.b3(F.max_pool2d(x, 3, 1, 1))], 1)
        x = torch.relu(self.bn(x))
        s = torch.relu(self.squeeze(x))
        f = torch.relu(torch.cat([self.e1(s), self.e3(s)], dim=1))
        side = F.adaptive_avg_pool2d(torch.relu(self.side(x)), 1).flatten(1)
        return self.fc(torch.cat([F.adaptive_avg_pool2d(f, 2).flatten(1), side], 1))


def inception_small(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    return TinyInception(in_ch, num_classes)


class TinyUNet(nn.Module):
    """Encoder-decoder with a skip concatenation; the encoder's second stage is a residual
    pair (two convs added, ``coupled_channels``) whose sum is also concatenated; input
    (N, 3, H, W) with H, W divisible by 2."""

    def __init__(self, in_ch=3, num_classes=10):
        super().__init__()
        self.enc1 = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.enc2a = nn.Conv2d(8, 12, 3, padding=1)
        self.enc2b = nn.Conv2d(8, 12, 1)
        self.dec = nn.Conv2d(12 + 8, 10, 3, padding=1)
        self.dec_bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10 + 12, num_classes, 1)

    def forward(self, x):
        s = torch.relu(self.bn1(self.enc1(x)))
        p = F.max_pool2d(s, 2)
        e = torch.relu(self.enc2a(p) + self.enc2b(p))
        u = F.interpolate(e, scale_factor=2.0, mode="nearest")
        d = torch.relu(self.dec_bn(self.dec(torch.cat([u, s], 1))))
        d = F.max_pool2d(d, 2)
        return self.head(torch.cat((d, e), dim=1)).mean((2, 3))


def unet_small(in_ch: int = 3, num_classes: int = 10) -> nn.Module:
    return TinyUNet(in_ch, num_classes)


MODELS = {
    "vgg_small": vgg_small,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2_small": mobilenet_v2_small,
    "efficientnet_small": efficientnet_small,
    "resnext_small": resnext_small,
    "densenet_small": densenet_small,
    "inception_small": inception_small,
    "unet_small": unet_small,
    "mlp": mlp,
}
# how channel spaces that meet may join (find_channel_groups keywords)
JOINS = {"plain": {}, "coupled": {"coupled": True}, "gated": {"gated": True}, "coupled+gated": {"coupled": True, "gated": True},
         "grouped": {"grouped": True}, "concat": {"concat": True},
         "all": {"coupled": True, "gated": True, "grouped": True, "concat": True}}


class TwoGroupNet(nn.Module):
    """Two prunable Linear groups (one through a BatchNorm1d), with a forward of its own (a
    compiled frame is this class's code); input (N, 12)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.bn = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.fc1(x)))
        return self.head(torch.relu(self.fc2(x)))


def perturb_bn(model: nn.Module, seed: int = 1, mean_scale: float = 0.1, var_min: float = 0.5,
               bias_scale: float = 0.1) -> nn.Module:
    """Non-trivial BatchNorm running stats and affine parameters, so eval-mode BN is not the
    identity (and folding it has something to do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * mean_scale)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + var_min)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * bias_scale)
    return model


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A small deterministic input batch for the model called ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name in ("mlp", "gated_mlp"):
        return torch.randn(batch, 20, generator=g)
    if name in MODELS:
        return torch.randn(batch, 3, 32, 32, generator=g)
    raise KeyError(f"unknown test model {name!r}; known: {sorted(MODELS)}")
