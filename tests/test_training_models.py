"""The models ``chase_ext.training`` ships for the demo and the recipe benchmarks."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from chase_ext import ChaseOptimizer
from chase_ext import training as T
from chase_ext.measure import count_macs


def test_resnet_shape_and_cost():
    m = T.resnet()
    x = torch.randn(3, 1, 28, 28)
    assert m(x).shape == (3, 10)
    # 28x28 stem, 14x14 and 7x7 stages; 4.3 M MACs, about the demo VGG's 3.8 M
    assert count_macs(m, x[:1])["macs"] == 4_328_960
    assert sum(p.numel() for p in m.parameters() if p.dim() > 1) < 60_000
    wide = T.resnet((8, 16, 32), (1, 1, 1), stem=8, in_ch=3, num_classes=5)
    assert wide(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert wide.layers[2][0].conv3.out_channels == 128


@pytest.mark.parametrize("kw", [dict(widths=(16,), blocks=(2, 2)), dict(widths=(), blocks=()),
                                dict(blocks=(0, 2)), dict(widths=(0, 8)), dict(stem=0)])
def test_resnet_rejects_bad_shapes(kw):
    with pytest.raises(ValueError, match="resnet: widths and blocks"):
        T.resnet(**kw)


def _train_then_slim_exactly(m, opt, x, y, steps=40):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        before = m(x)
    opt.slim_()
    with torch.no_grad():
        after = m(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("coupled", [False, True])
def test_resnet_groups_and_exact_slim(coupled):
    """Each stage's block outputs, its shortcut and the later blocks' outputs are one group
    when coupled (SPEC: not prunable); slimming after channel removal changes no output."""
    torch.manual_seed(0)
    m = T.resnet()
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    opt = ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), m, density=0.2,
                         channel_sparsity=0.5, total_steps=40, example_inputs=x[:2], coupled_channels=coupled,
                         update_interval=4, channel_interval=4, channel_end=0.5, seed=0)
    groups = [r["group"] for r in opt.channel_report()]
    coupled_groups = [g for g in groups if "+" in g]
    if coupled:
        assert coupled_groups == ["layers.0.0.conv3+layers.0.0.downsample.0+layers.0.1.conv3",
                                  "layers.1.0.conv3+layers.1.0.downsample.0+layers.1.1.conv3"]
    else:
        assert coupled_groups == [] and "stem.0" in groups
    _train_then_slim_exactly(m, opt, x, y)
    if coupled:
        # the second stage's residual group lost channels: its convs, shortcut, the next
        # block's input and the classifier's input all shrank together
        stage = m.layers[1]
        c = stage[0].conv3.out_channels
        assert c < 128
        assert stage[0].downsample[0].out_channels == stage[1].conv1.in_channels == stage[1].conv3.out_channels == c
        assert m.fc.in_features == c


def test_efficientnet_shape_and_cost():
    m = T.efficientnet()
    x = torch.randn(3, 1, 28, 28)
    assert m(x).shape == (3, 10)
    # about the demo ResNet's cost (4.3 M MACs, 53 k weights)
    assert count_macs(m, x[:1])["macs"] == 4_353_920
    assert sum(p.numel() for p in m.parameters()) == 45_688
    small = T.efficientnet(((1, 8, 1, 1), (2, 12, 1, 2)), stem=8, head=16, in_ch=3, num_classes=5)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert [b.residual for b in m.features[1:-1]] == [True, False, True, False, True]


@pytest.mark.parametrize("kw", [dict(stages=()), dict(stages=((4, 16, 0, 1),)), dict(stages=((4, 16, 1),)),
                                dict(stem=0), dict(head=0)])
def test_efficientnet_rejects_bad_shapes(kw):
    with pytest.raises(ValueError, match="efficientnet: stages must be"):
        T.efficientnet(**kw)


@pytest.mark.parametrize("gated", [False, True])
def test_efficientnet_gated_groups_and_exact_slim(gated):
    """Under SPEC the expand convs (their maps are scaled by a squeeze-and-excitation gate)
    keep every channel; gated_channels=True prunes each with its gate's layer; slimming
    after channel removal changes no output either way."""
    torch.manual_seed(0)
    m = T.efficientnet()
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), m, density=0.2,
                             channel_sparsity=0.5, total_steps=40, example_inputs=x[:2], gated_channels=gated,
                             update_interval=4, channel_interval=4, channel_end=0.5, seed=0)
    low = [str(i.message) for i in w if "channel pruning reaches" in str(i.message)]
    groups = [r["group"] for r in opt.channel_report()]
    gated_groups = [g for g in groups if "+" in g]
    if gated:
        assert not low
        assert gated_groups == [f"features.{i}.block.0+features.{i}.block.6.fc2" for i in (2, 3, 4, 5)]
        # the stem's channels reach the first block's gate, and its residual add: coupled_channels too
        assert not any("features.0.0" in g or "features.1.block.3.fc2" in g for g in groups)
    else:
        assert gated_groups == [] and len(low) == 1 and "gated_channels=True" in low[0]
    _train_then_slim_exactly(m, opt, x, y)
    if gated:
        live = {r["group"]: r["live"] for r in opt.channel_report()}
        assert any(live[g] < 96 for g in gated_groups[1:])
        for i in (2, 3, 4, 5):
            blk = m.features[i].block
            assert blk[0].out_channels == blk[3].in_channels == blk[3].groups == blk[6].fc2.out_channels \
                == blk[6].fc1.in_channels == blk[7].in_channels == live[f"features.{i}.block.0+features.{i}.block.6.fc2"]
