"""Channel groups found by tracing (chase_ext.graph)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chase_ext.graph import channel_coverage, explicit_groups, find_channel_groups, group_from_dict, group_to_dict
from chase_ext.groups import ChannelGroup, Consumer

from models import (JOINS, MODELS, GatedMLP, efficientnet_small, example_input, mlp, mobilenet_v2_small, perturb_bn,
                    mask_channels_, resnet_basic, resnet_bottleneck, TinyResNeXt, vgg_small, zero_inputs_)


def stochastic_depth(x, p, mode, training=True):
    """Stands in for torchvision.ops.stochastic_depth (same name, module and fx wrapping):
    whole samples are dropped and the rest scaled."""
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


def stochastic_depth_lookalike(x, p, mode, training=True):  # another module's function of that name
    return x * (1 - p)


stochastic_depth_lookalike.__name__ = "stochastic_depth"
torch.fx.wrap("stochastic_depth_lookalike")


def _by_producer(groups):
    return {"+".join(g.producers): g for g in groups}


def _find(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of the test models should warn
        return find_channel_groups(model, x, **kw)


# --------------------------------------------------------------------------- test models
def test_vgg_every_conv_prunable():
    m = vgg_small()
    gs = _find(m, example_input("vgg_small"))
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert [g.producers for g in gs] == [[c] for c in convs] + [["classifier.0"]]
    last = gs[len(convs) - 1]
    assert last.consumers == [Consumer("classifier.0", m.final_hw)]
    assert last.followers == [convs[-1].replace(".11", ".12")]
    assert gs[0] == ChannelGroup(["features.0"], [Consumer("features.4")], ["features.1"], 8)
    assert gs[-1].consumers == [Consumer("classifier.3")]
    assert all(g.channels == m.get_submodule(g.producers[0]).weight.shape[0] for g in gs)


def test_vgg_other_input_size():
    m = vgg_small(in_ch=1, size=16)
    gs = _find(m, torch.randn(1, 1, 16, 16))
    assert _by_producer(gs)["features.11"].consumers == [Consumer("classifier.0", 4)]


def test_resnet_basic_default_and_coupled():
    m = resnet_basic()
    x = example_input("resnet_basic")
    gs = _find(m, x)
    assert [g.producers for g in gs] == [["layer1.0.conv1"], ["layer2.0.conv1"], ["layer2.1.conv1"]]
    assert gs[0].consumers == [Consumer("layer1.0.conv2")] and gs[0].followers == ["layer1.0.bn1"]
    cg = _by_producer(_find(m, x, coupled=True))
    stem = cg["conv1+layer1.0.conv2"]
    assert stem.followers == ["bn1", "layer1.0.bn2"]
    assert [c.module for c in stem.consumers] == ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    l2 = cg["layer2.0.conv2+layer2.0.downsample.0+layer2.1.conv2"]
    assert [c.module for c in l2.consumers] == ["layer2.1.conv1", "fc"]
    assert set(l2.followers) == {"layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"}
    assert len(cg) == 5


def test_resnet_bottleneck_reused_relu():
    m = resnet_bottleneck()
    x = example_input("resnet_bottleneck")
    gs = _find(m, x)
    names = [g.producers[0] for g in gs]
    expect = ["conv1"] + [f"layer{a}.{b}.conv{c}" for a in (1, 2) for b in (0, 1) for c in (1, 2)]
    assert names == expect
    stem = gs[0]
    assert stem.consumers == [Consumer("layer1.0.conv1"), Consumer("layer1.0.downsample.0")]
    assert all(len(g.producers) == 1 for g in gs)
    cg = _find(m, x, coupled=True)
    coupled = [g for g in cg if len(g.producers) > 1]
    assert [g.producers for g in coupled] == [
        ["layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3"],
        ["layer2.0.conv3", "layer2.0.downsample.0", "layer2.1.conv3"],
    ]
    # coupled groups come in producer order among the others
    firsts = [g.producers[0] for g in cg]
    order = [n for n, _ in m.named_parameters()]
    assert firsts == sorted(firsts, key=lambda n: order.index(n + ".weight"))


def test_mobilenet_through_depthwise():
    m = mobilenet_v2_small()
    gs = _by_producer(_find(m, example_input("mobilenet_v2_small")))
    assert set(gs) == {
        "features.0.0",
        "features.1.conv.1",
        "features.2.conv.0.0",
        "features.3.conv.0.0",
        "features.4.conv.0.0",
        "features.4.conv.2",
        "features.5.0",
    }
    stem = gs["features.0.0"]
    assert stem.followers == ["features.0.1", "features.1.conv.0.0", "features.1.conv.0.1"]
    assert stem.consumers == [Consumer("features.1.conv.1")]
    e = gs["features.3.conv.0.0"]
    assert e.followers == ["features.3.conv.0.1", "features.3.conv.1.0", "features.3.conv.1.1"]
    assert e.consumers == [Consumer("features.3.conv.2")]
    assert gs["features.5.0"].consumers == [Consumer("classifier.1")]


def test_mlp():
    gs = _find(mlp(), example_input("mlp"))
    assert gs == [
        ChannelGroup(["0"], [Consumer("3")], ["1"], 32),
        ChannelGroup(["3"], [Consumer("5")], [], 32),
    ]


@pytest.mark.parametrize("name", [*sorted(MODELS), "gated_mlp"])
@pytest.mark.parametrize("joins", list(JOINS))
def test_groups_are_complete(name, joins):
    """With the consumer columns of some channels zeroed, the output does not depend on
    anything else of those channels (producer rows, biases, follower entries)."""
    torch.manual_seed(0)
    m = {**MODELS, "gated_mlp": GatedMLP}[name]().eval()
    x = example_input(name)
    if name == "efficientnet_small" and joins in ("plain", "grouped", "concat"):  # most of its weights make gated or coupled channels
        with pytest.warns(UserWarning, match="gated_channels=True prunes such layers together"):
            gs = find_channel_groups(m, x, **JOINS[joins])
    elif name == "resnext_small" and joins in ("plain", "gated", "concat"):  # its convs feed grouped convs or residual adds
        with pytest.warns(UserWarning, match="grouped_channels=True prunes through grouped convs"):
            gs = find_channel_groups(m, x, **JOINS[joins])
    elif name in ("densenet_small", "inception_small", "unet_small") and "concat" not in JOINS[joins]:
        # most of their channels are read inside concatenations
        with pytest.warns(UserWarning, match="concat_channels=True prunes through concatenations"):
            gs = find_channel_groups(m, x, **JOINS[joins])
        if name == "unet_small":
            assert gs == []
            return
    else:
        gs = _find(m, x, **JOINS[joins])
    assert gs
    mods = dict(m.named_modules())
    with torch.no_grad():
        for g in gs:
            drop = torch.arange(0, g.channels, 2)
            for c in g.consumers:
                zero_inputs_(mods[c.module].weight, c, drop, g.channels, g.offsets.get(c.module, 0))
        ref = m(x)
        for g in gs:
            for n in g.producers + g.followers:
                drop = torch.arange(0, g.channels, 2) + g.offsets.get(n, 0)  # inside a concatenation: its span
                mod = mods[n]
                for t in (mod.weight, getattr(mod, "bias", None)):
                    if t is not None:
                        t[drop] = torch.randn_like(t[drop]) * 3
                if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.running_mean is not None:
                    mod.running_mean[drop] += 5
        torch.testing.assert_close(m(x), ref)


def test_training_flags_and_running_stats_untouched():
    m = mlp()
    m.train()
    m[1].eval()  # mixed flags must come back as they were
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [mod.training for mod in m.modules()]
    gs = _find(m, torch.randn(1, 20))  # batch of one: BatchNorm1d only works in eval mode
    assert len(gs) == 2
    assert [mod.training for mod in m.modules()] == flags
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_exclude_and_exclude_channels():
    m = vgg_small()
    x = example_input("vgg_small")
    full = [g.producers[0] for g in _find(m, x)]
    # consumer excluded -> its producer's group is blocked; producer excluded -> blocked
    gs = [g.producers[0] for g in _find(m, x, exclude=["classifier.3.weight", "features.0.weight"])]
    assert gs == [p for p in full if p not in ("classifier.0", "features.0")]
    gs = [g.producers[0] for g in _find(m, x, exclude="features.4.*")]
    assert "features.0" not in gs and "features.4" not in gs
    gs = [g.producers[0] for g in _find(m, x, exclude_channels=["features.*"])]
    assert gs == ["classifier.0"]
    gs = [g.producers[0] for g in _find(m, x, exclude_channels=["classifier.0.weight"])]
    assert gs == full[:-1]
    # coupled: one excluded producer removes the whole coupled group
    r = resnet_basic()
    cg = _find(r, example_input("resnet_basic"), coupled=True, exclude_channels=["layer2.1.conv2"])
    assert not any("layer2.0.conv2" in g.producers for g in cg)


# --------------------------------------------------------------------------- functional styles
class FunctionalNet(nn.Module):
    def __init__(self, view_batch=True):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.fc2 = nn.Linear(8, 5)
        self.view_batch = view_batch

    def forward(self, x):
        a = F.relu(self.c1(x))
        a = a * torch.sigmoid(a)  # SiLU by hand: same channel space
        a = F.max_pool2d(a, 2)
        b = self.c2(a).relu()
        y2 = self.fc2(b.mean((2, 3)))
        c = F.adaptive_avg_pool2d(self.c3(b), 4)
        if self.view_batch:
            c = c.view(c.size(0), -1)
        else:
            c = c.view(-1, 64)
        return self.fc(F.dropout(c, 0.1, self.training)) + y2


def test_functional_ops():
    x = torch.randn(2, 3, 8, 8)
    gs = _by_producer(_find(FunctionalNet(), x))
    assert set(gs) == {"c1", "c2", "c3"}
    assert gs["c2"].consumers == [Consumer("fc2"), Consumer("c3")]  # graph order
    assert gs["c3"].consumers == [Consumer("fc", 16)]
    gs = _by_producer(_find(FunctionalNet(view_batch=False), x))
    assert set(gs) == {"c1", "c2"}  # view(-1, 64) hard-codes the width


class Blockers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.ln = nn.GroupNorm(2, 4)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.d = nn.Conv2d(8, 4, 3, groups=2)  # grouped, not depthwise
        self.e = nn.Conv2d(4, 6, 1)
        self.f = nn.Conv2d(6, 2, 1)
        self.shared = nn.Conv2d(2, 2, 1)
        self.g = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a = self.b(self.ln(self.a(x)))  # GroupNorm blocks a
        c = torch.cat([a, self.c(x)], 1)  # cat blocks b and c
        d = self.d(c)
        e = self.e(d)
        f = self.f(e * d.mean(1, keepdim=True))  # mul with another tensor blocks e
        h = self.shared(self.shared(f))  # a conv with parameters called twice
        return self.g(h) + d.sum()


def test_blockers_and_reuse_warning():
    m = Blockers()
    with pytest.warns(UserWarning, match="shared"):
        gs = find_channel_groups(m, torch.randn(1, 3, 6, 6))
    assert gs == []  # f feeds a reused conv; g feeds the output; d feeds .sum()


def test_low_coverage_warns_with_the_reasons():
    # no candidate layer is prunable under SPEC's rule: a user should hear why
    m = TinyResNeXt()
    with pytest.warns(UserWarning, match=r"reaches 0 of 5 candidate layers of TinyResNeXt, 0% of their weights") as w:
        assert find_channel_groups(m, torch.randn(1, 3, 8, 8)) == []
    msg = next(str(x.message) for x in w if "candidate layers" in str(x.message))
    assert msg.endswith("3 layers (c.0, c.1, stem): added to another layer's output (residual-coupled; "
                        "coupled_channels=True prunes such layers together); 2 layers (a.0, a.1): e.g. grouped conv "
                        "b.0 (not depthwise; grouped_channels=True prunes through grouped convs)")  # fc, whose outputs are the classes, is no candidate
    # coupled, the block outputs and the stem are one group: 59% of the candidates' weights
    gs = _find(m, torch.randn(1, 3, 8, 8), coupled=True)
    assert [g.producers for g in gs] == [["stem", "c.0", "c.1"]]
    cov = channel_coverage(m, torch.randn(1, 3, 8, 8), coupled=True)
    assert (cov["groups"], cov["reached_layers"], cov["candidate_layers"]) == (1, 3, 5)
    assert cov["weight_share"] == pytest.approx((1728 + 2 * 2048) / (1728 + 4 * 2048))
    assert cov["left_out"] == {f"a.{i}": {"why": f"grouped conv b.{i} (not depthwise; grouped_channels=True prunes through "
                                                  "grouped convs)", "weights": 2048}
                               for i in (0, 1)}
    # without grouped convs the bottlenecks' inner convs are prunable: 79%
    gs = _find(TinyResNeXt(groups=1), torch.randn(1, 3, 8, 8))
    assert [g.producers for g in gs] == [["a.0"], ["a.1"], ["b.0"], ["b.1"]]
    # what the user excluded is no candidate: the residual-coupled rest is all that is left
    with pytest.warns(UserWarning, match=r"reaches 0 of 3 candidate layers"):
        find_channel_groups(TinyResNeXt(groups=1), torch.randn(1, 3, 8, 8), exclude_channels=["a.*", "b.*"])


class DropPathBlock(nn.Module):
    """A residual block whose branch goes through stochastic depth (EfficientNet, Swin,
    ConvNeXt)."""

    def __init__(self, lookalike=False):
        super().__init__()
        self.lookalike = lookalike
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, 1)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.c2(F.relu(self.c1(x)))
        drop = stochastic_depth_lookalike if self.lookalike else stochastic_depth  # by global name: fx.wrap
        x = F.relu(x + drop(y, 0.25, "row", self.training))
        return self.fc(x.mean((2, 3)))


def test_stochastic_depth_passes_channels_through():
    from chase_ext.slim import slim_
    from test_slim import _random_keep

    x = torch.randn(4, 3, 8, 8)
    m = perturb_bn(DropPathBlock())
    with pytest.warns(UserWarning, match="2 layers .c2, stem.: added to another layer's output"):
        assert [g.producers for g in find_channel_groups(m, x)] == [["c1"]]  # SPEC: the block output stays
    gs = _find(m, x, coupled=True)
    assert [g.producers for g in gs] == [["stem", "c2"], ["c1"]]
    # slim == masked, in eval mode and (same dropped samples) in train mode
    keep = _random_keep(gs, torch.Generator().manual_seed(0))
    mask_channels_(m, gs, keep)
    slim = copy.deepcopy(m)
    slim_(slim, gs, keep)
    assert slim.c2.weight.shape[0] == len(keep[0])
    for train in (False, True):
        m.train(train)
        slim.train(train)
        with torch.no_grad():
            torch.manual_seed(1)
            want = m(x)
            torch.manual_seed(1)
            torch.testing.assert_close(slim(x), want)
    # a function of that name from elsewhere is not taken on trust
    with pytest.warns(UserWarning, match="function stochastic_depth"):
        gs = find_channel_groups(DropPathBlock(lookalike=True), x, coupled=True)
    assert [g.producers for g in gs] == [["c1"]]


def test_output_layer_behind_a_softmax_is_no_candidate():
    # as PyTorch's MNIST example: a large classifier behind log_softmax, not a layer left out
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
            self.fc = nn.Linear(16 * 12 * 12, 10)

        def forward(self, x):
            x = F.relu(self.conv2(F.relu(self.conv1(x))))
            return F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)

    assert [g.producers for g in _find(Net(), torch.randn(2, 1, 16, 16))] == [["conv1"], ["conv2"]]


def test_trace_failure_warns():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return self.b(h)

    with pytest.warns(UserWarning, match="could not trace"):
        assert find_channel_groups(Dyn(), torch.randn(2, 3)) == []


def test_bad_example_inputs_raise():
    with pytest.raises(ValueError, match="example_inputs"):
        find_channel_groups(mlp(), torch.randn(2, 7))


def test_linear_on_sequence_and_tuple_inputs():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 6)
            self.bn = nn.BatchNorm1d(7)  # normalises dim 1 (time), not the features
            self.b = nn.Linear(6, 3)
            self.c = nn.Linear(5, 6)
            self.d = nn.Linear(6, 3)

        def forward(self, x, y):
            return self.b(self.bn(self.a(x))), self.d(F.gelu(self.c(y)))

    gs = _find(Seq(), (torch.randn(2, 7, 5), torch.randn(2, 7, 5)))
    assert [g.producers for g in gs] == [["c"]]


# --------------------------------------------------------------------------- explicit groups
def test_explicit_groups():
    m = vgg_small()
    spec = [
        {"producers": ["features.11"], "followers": ["features.12"], "consumers": [("classifier.0", 16)]},
        {"producers": "features.0", "followers": ["features.1"], "consumers": ["features.4"], "channels": 8},
    ]
    gs = explicit_groups(m, spec)
    auto = _by_producer(_find(m, example_input("vgg_small")))
    assert gs == [auto["features.0"], auto["features.11"]]
    assert explicit_groups(m, gs) == gs
    assert [group_from_dict(group_to_dict(g)) for g in gs] == gs
    # a chain: every inner conv consumes one group and produces the next
    traced = _find(m, example_input("vgg_small"))
    assert explicit_groups(m, traced) == traced
    assert explicit_groups(m, [group_to_dict(g) for g in reversed(traced)]) == traced


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"producers": ["nope"], "consumers": ["features.4"]}, "no module 'nope'"),
        ({"producers": ["features.1"], "consumers": ["features.4"]}, "BatchNorm2d"),
        ({"producers": ["features.0"], "consumers": ["features.8"]}, "in_channels=16, expected 8"),
        ({"producers": ["features.11"], "consumers": [("classifier.0", 3)]}, "in_features=512"),
        ({"producers": ["features.11"], "consumers": [("classifier.0", 0)]}, "positive int"),
        ({"producers": ["features.0"], "followers": ["features.5"], "consumers": ["features.4"]}, "num_features=16"),
        ({"producers": ["features.0"], "consumers": ["features.4"], "channels": 9}, "channels=9"),
        ({"producers": ["features.0"], "consumers": []}, "at least one"),
        ({"producers": ["features.0"], "consumers": ["features.4"], "extra": 1}, "unknown keys"),
        ({"producers": ["features.0", "features.4"], "consumers": ["features.8"]}, "different output widths"),
    ],
)
def test_explicit_groups_errors(entry, match):
    with pytest.raises((ValueError, TypeError), match=match):
        explicit_groups(vgg_small(), [entry])


def test_explicit_groups_duplicate():
    spec = [
        {"producers": ["features.0"], "consumers": ["features.4"]},
        {"producers": ["features.0"], "consumers": ["features.4"]},
    ]
    with pytest.raises(ValueError, match="already appears"):
        explicit_groups(vgg_small(), spec)
    with pytest.raises(ValueError, match=r"already appears in channel_groups\[0\].consumers"):
        explicit_groups(vgg_small(), [{"producers": ["features.0"], "consumers": ["features.4"]},
                                      {"producers": ["features.8"], "consumers": ["features.4"]}])
    with pytest.raises(ValueError, match="of the same group"):
        explicit_groups(vgg_small(), [{"producers": ["features.4"], "consumers": ["features.4"]}])


# --------------------------------------------------------------------------- torchvision
def _tv():
    return pytest.importorskip("torchvision")


def test_torchvision_resnet50():
    tv = _tv()
    m = tv.models.resnet50(weights=None)
    gs = _find(m, torch.randn(1, 3, 64, 64))
    names = [g.producers[0] for g in gs]
    blocks = [f"layer{i}.{j}" for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for j in range(n)]
    assert names == ["conv1"] + [f"{b}.conv{c}" for b in blocks for c in (1, 2)]
    assert gs[0].consumers == [Consumer("layer1.0.conv1"), Consumer("layer1.0.downsample.0")]
    assert explicit_groups(m, gs) == gs
    cg = _find(m, torch.randn(1, 3, 64, 64), coupled=True)
    assert sum(len(g.producers) > 1 for g in cg) == 4  # one coupled group per stage
    assert len(cg) == len(gs) + 4


def test_torchvision_vgg16_bn():
    tv = _tv()
    m = tv.models.vgg16_bn(weights=None)
    gs = _find(m, torch.randn(1, 3, 32, 32))
    assert len(gs) == 15
    assert gs[12].producers == ["features.40"] and gs[12].consumers == [Consumer("classifier.0", 49)]
    assert [g.producers[0] for g in gs[13:]] == ["classifier.0", "classifier.3"]


def test_torchvision_mobilenet_v2():
    tv = _tv()
    m = tv.models.mobilenet_v2(weights=None)
    gs = _by_producer(_find(m, torch.randn(1, 3, 32, 32)))
    expand = {f"features.{i}.conv.0.0" for i in range(2, 18)}
    assert expand <= set(gs)
    assert "features.0.0" in gs and "features.18.0" in gs
    assert gs["features.2.conv.0.0"].followers == [
        "features.2.conv.0.1",
        "features.2.conv.1.0",
        "features.2.conv.1.1",
    ]


def test_unbatched_layouts_block():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.inorm = nn.InstanceNorm1d(2)  # 2-D input = unbatched (C, L): mixes our channels
            self.b = nn.Linear(6, 3)
            self.c = nn.Conv1d(3, 5, 1)
            self.pool = nn.MaxPool2d(1)  # 3-D input = unbatched (C, H, W)
            self.d = nn.Conv1d(5, 2, 1)

        def forward(self, x, s):
            return self.b(self.inorm(self.a(x))), self.d(self.pool(self.c(s)))

    with pytest.warns(UserWarning, match="reaches 0 of 2 candidate layers of Odd"):  # a and c (b, d: outputs)
        assert find_channel_groups(Odd(), (torch.randn(2, 4), torch.randn(2, 3, 7))) == []


def test_unbatched_conv_producer_blocks():
    # an unbatched (C, L) / (C, H, W) conv output has its channels at dim 0; with the
    # spatial size equal to a width the sizes alone would accept a wrong group
    class Conv1dHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(4, 8, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c(x)))

    class Conv2dFlat(nn.Module):
        def __init__(self, fc_in):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(fc_in, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.c(x), 1))

    for m, x in ((Conv1dHead(), torch.randn(4, 8)), (Conv2dFlat(16), torch.randn(3, 4, 4))):
        with pytest.warns(UserWarning, match="reaches 0 of 1 candidate layers.*runs on an unbatched input"):
            assert find_channel_groups(m, (x,)) == []
    (g,) = _find(Conv2dFlat(64), (torch.randn(2, 3, 4, 4),))  # batched: the group is real
    assert g.producers == ["c"]


# --------------------------------------------------------------------------- computed weights
def chain_model():
    """0 -> bn 1 -> relu -> 3 -> depthwise 4 -> bn 5 -> relu -> 7 -> pool -> flatten -> 10."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


_P = torch.nn.utils.parametrizations
_COMPUTE = {
    "weight_norm": lambda m: _P.weight_norm(m),
    "spectral_norm": lambda m: _P.spectral_norm(m),
    "orthogonal": lambda m: _P.orthogonal(m),
    "hook_weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "hook_spectral_norm": lambda m: torch.nn.utils.spectral_norm(m),
    "bias_parametrized": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "bias", nn.Tanh()),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("how", sorted(_COMPUTE))
@pytest.mark.parametrize(
    "layer, left",
    [
        ("0", [["3"], ["7"]]),  # producer: its own group goes
        ("3", [["7"]]),  # producer of one group, consumer of the other
        ("4", [["0"], ["7"]]),  # depthwise follower
        ("1", [["3"], ["7"]]),  # norm follower
        ("10", [["0"], ["3"]]),  # consumer
    ],
)
def test_computed_weight_blocks_its_groups(layer, how, left):
    """A layer whose weight is computed (parametrize, weight_norm hooks) cannot be slimmed:
    the groups it touches are blocked with one warning naming it, the others stay."""
    if how == "orthogonal" and layer in ("1", "4"):
        pytest.skip("orthogonal needs a matrix weight")
    m = chain_model()
    _COMPUTE[how](m.get_submodule(layer))
    with pytest.warns(UserWarning, match=rf"cannot be handled .*: {layer} \(its (weight|bias) is computed") as rec:
        gs = find_channel_groups(m, torch.randn(2, 3, 8, 8))
    assert len([w for w in rec if "cannot be handled" in str(w.message)]) == 1
    assert [g.producers for g in gs] == left
    entry = {"producers": ["0"], "followers": ["1"], "consumers": ["3"]}
    if layer in ("0", "1", "3"):
        with pytest.raises(ValueError, match=rf"'{layer}' is computed"):
            explicit_groups(m, [entry])
    else:
        assert explicit_groups(m, [entry])[0].producers == ["0"]


def test_computed_weight_model_trains():
    """The optimizer takes a weight-normed model (the other groups are pruned)."""
    import chase_ext

    torch.manual_seed(0)
    m = chain_model()
    _P.weight_norm(m[0])
    x = torch.randn(2, 3, 8, 8)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="0 .its weight is computed"):
        chase = chase_ext.ChaseOptimizer(opt, m, density=0.5, channel_sparsity=0.5, total_steps=20,
                                         update_interval=2, channel_end=0.5, example_inputs=x,
                                         slim_during_training=True)
    assert [g.producers for g in chase.groups] == [["3"], ["7"]]
    for _ in range(12):
        loss = m(x).pow(2).mean()
        chase.zero_grad()
        loss.backward()
        chase.step()
    assert m[3].out_channels < 6 and m[0].out_channels == 8


# --------------------------------------------------------------------------- train-mode tracing
class AuxHead(nn.Module):
    """An extra head in the training forward only; a functional BatchNorm whose
    ``training`` flag is baked into the trace."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.aux = nn.Linear(8, 2)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)

    def forward(self, x):
        f = F.relu(self.bn(self.a(x)))
        h = F.batch_norm(self.b(f), self.rm, self.rv, training=self.training)
        out = self.fc(h.mean((2, 3)))
        if self.training:
            return out + self.aux(f.mean((2, 3)))
        return out


def test_traced_in_train_mode_and_state_restored():
    torch.manual_seed(0)
    m = AuxHead()
    perturb_bn(m)
    m.eval()
    m.bn.train()  # mixed flags come back as they were
    flags = [(n, mod.training) for n, mod in m.named_modules()]
    before = {k: v.clone() for k, v in m.state_dict(keep_vars=True).items()}
    objs = {k: v for k, v in m.named_buffers()}
    (g,) = _find(m, torch.randn(2, 3, 8, 8))
    assert g.producers == ["a"] and g.consumers == [Consumer("b"), Consumer("aux")]
    assert [(n, mod.training) for n, mod in m.named_modules()] == flags
    for k, v in m.state_dict(keep_vars=True).items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k
    assert all(b is objs[k] for k, b in m.named_buffers())
    # on error too
    with pytest.raises(ValueError, match="example_inputs"):
        find_channel_groups(m, torch.randn(2, 5, 8, 8))
    assert [(n, mod.training) for n, mod in m.named_modules()] == flags
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- norms without tensors
class BareNorms(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(width)  # affine=False, no running stats
        self.b = nn.Conv2d(8, 6, 1)
        self.bn = nn.BatchNorm2d(6, affine=False, track_running_stats=False)
        self.c = nn.Conv2d(6, 6, 1)
        self.shared = nn.InstanceNorm2d(6)
        self.d = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.b(F.relu(self.inorm(self.a(x))))
        x = self.d(self.shared(self.c(F.relu(self.bn(x)))))
        x = self.shared(x)  # called twice (groups c and d): cannot follow one group
        return self.fc(x.mean((2, 3)))


def test_norm_without_tensors_follows():
    m = BareNorms()
    x = torch.randn(2, 3, 8, 8)
    gs = _find(m, x)
    assert gs == [
        ChannelGroup(["a"], [Consumer("b")], ["inorm"], 8),
        ChannelGroup(["b"], [Consumer("c")], ["bn"], 6),
        ChannelGroup(["c"], [Consumer("d")], [], 6),
        ChannelGroup(["d"], [Consumer("fc")], [], 6),
    ]
    assert [group_from_dict(group_to_dict(g)) for g in gs] == gs
    assert explicit_groups(m, [group_to_dict(g) for g in gs]) == gs
    # a num_features that is not the width means nothing here: not a follower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InstanceNorm warns about it at every forward
        gs = find_channel_groups(BareNorms(width=3), x)
    assert gs[0] == ChannelGroup(["a"], [Consumer("b")], [], 8)


# --------------------------------------------------------------------------- round trip
class PreAct(nn.Module):
    """Pre-activation residual: with coupled=True, ``c1`` produces and consumes one group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.sq = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c1(F.relu(self.bn(x)))
        return self.fc(self.sq(x).mean((2, 3)))


def test_explicit_round_trip_of_traced_groups():
    m = PreAct()
    gs = _find(m, torch.randn(2, 3, 8, 8), coupled=True)
    g = gs[0]
    assert g.producers == ["stem", "c1"] and [c.module for c in g.consumers] == ["c1", "sq"]
    assert explicit_groups(m, gs) == gs
    assert explicit_groups(m, [group_to_dict(g) for g in gs]) == gs
    # real duplicates are still refused
    bad = [
        ({"producers": ["stem", "c1"], "consumers": ["c1", "c1", "sq"]}, r"already appears in channel_groups\[0\]"),
        ({"producers": ["stem", "stem"], "consumers": ["sq"]}, r"already appears in channel_groups\[0\]"),
        ({"producers": ["sq"], "consumers": ["sq"]}, "of the same group"),  # a lone producer
        ({"producers": ["stem", "c1"], "consumers": ["sq"], "followers": ["c1"]}, "already appears"),
    ]
    for entry, match in bad:
        with pytest.raises(ValueError, match=match):
            explicit_groups(m, [entry])


def test_explicit_groups_are_checked_against_the_trace_when_inputs_are_given():
    """An explicit group that leaves out a norm or a consumer reading its producer's channels
    would slim into a broken model; with example_inputs ChaseOptimizer refuses it, naming them.
    Without example_inputs (a model that does not trace) only widths are checked."""
    from chase_ext import ChaseOptimizer

    def build(**kw):
        torch.manual_seed(0)
        model = vgg_small()
        return ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, density=0.5, total_steps=40,
                              update_interval=4, channel_sparsity=0.5, **kw)

    x = example_input("vgg_small")
    traced = find_channel_groups(vgg_small(), x)
    g0 = traced[0]
    assert g0.followers == ["features.1"] and [c.module for c in g0.consumers] == ["features.4"]
    no_bn = {"producers": g0.producers, "consumers": ["features.4"]}
    with pytest.raises(ValueError, match=r"channel_groups\[0\].*follower 'features.1'.*list it in the group"):
        build(channel_groups=[no_bn], example_inputs=x)
    build(channel_groups=[no_bn])  # not checked without inputs
    no_consumer = {"producers": g0.producers, "followers": ["features.1"], "consumers": []}
    with pytest.raises(ValueError, match=r"consumer 'features.4'"):
        from chase_ext.graph import check_against_trace

        check_against_trace(vgg_small(), [group_from_dict({**no_consumer, "name": "g", "channels": 8})], x)
    chase = build(channel_groups=traced, example_inputs=x)  # what tracing returns passes
    assert [r["group"] for r in chase.channel_report()] == [g.name for g in traced]


def test_the_trace_check_lets_groups_leave_out_norms_without_tensors():
    """An InstanceNorm2d(C) (no affine, no running stats) only warns at a width mismatch: an
    explicit group that leaves it out is not refused."""
    from chase_ext.graph import check_against_trace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1, self.c2 = nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.c2(torch.relu(self.n1(self.c1(x))))

    model, x = Net(), torch.randn(2, 3, 12, 12)
    assert find_channel_groups(model, x)[0].followers == ["n1"]
    check_against_trace(model, explicit_groups(model, [{"producers": ["c1"], "consumers": ["c2"]}]), x)


# --------------------------------------------------------------------------- gates (gated=True)
def test_squeeze_and_excitation_gated():
    """The gate's producer (fc2) and the map it scales make one group under gated=True; the
    squeeze (fc1) reads the map's channels; the residual block outputs stay with coupled."""
    m, x = efficientnet_small(), torch.randn(2, 3, 32, 32)
    gs = _by_producer(_find(m, x, gated=True))
    se = "features.2.block.6"
    g = gs[f"features.2.block.0+{se}.fc2"]
    assert g.consumers == [Consumer(f"{se}.fc1"), Consumer("features.2.block.7")]
    assert g.followers == ["features.2.block.1", "features.2.block.3", "features.2.block.4"] and g.channels == 32
    assert gs[f"{se}.fc1"].consumers == [Consumer(f"{se}.fc2")]
    # the stem's channels pass the first block's depthwise conv into its gate (no expand conv)
    assert gs["features.0.0+features.1.block.3.fc2"].followers == ["features.0.1", "features.1.block.0",
                                                                   "features.1.block.1"]
    assert "features.2.block.7" not in {p for k in gs for p in k.split("+")}  # residual: coupled only
    cov = channel_coverage(m, x)
    gated_out = [p for p, o in cov["left_out"].items() if "gated_channels=True" in o["why"]]
    assert sorted(gated_out) == sorted(p for k in gs if "+" in k for p in k.split("+"))
    assert channel_coverage(m, x, gated=True)["weight_share"] > 2 * cov["weight_share"]


class TimmSE(nn.Module):
    """timm's SqueezeExcite: a spatial mean with keepdim, conv_reduce/conv_expand, x * gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.conv_reduce, self.conv_expand = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(F.relu(self.conv_reduce(s)))
        return self.head(x * s.sigmoid()).flatten(1)


def test_timm_style_squeeze_and_excitation():
    gs = _by_producer(_find(TimmSE(), torch.randn(2, 3, 8, 8), gated=True))
    assert gs["conv+conv_expand"].consumers == [Consumer("conv_reduce"), Consumer("head")]
    assert gs["conv_reduce"].consumers == [Consumer("conv_expand")]


def test_gated_mlp():
    m, x = GatedMLP(), example_input("gated_mlp")
    assert [g.producers for g in _find(m, x)] == [["inp"], ["w2"]]
    assert _find(m, x, gated=True)[1] == ChannelGroup(["w1", "w3"], [Consumer("w2")], [], 32)
    why = channel_coverage(m, x)["left_out"]["w1"]["why"]
    assert why.startswith("multiplied with another layer's output")


class _Gate(nn.Module):
    """conv -> relu -> head, where the map is multiplied with ``kind``'s tensor."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv, self.att, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.kind == "self":  # a parameter-free channel attention: still channel-wise
            y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        elif self.kind == "spatial":  # (N, 1, H, W): one value for all channels of a pixel
            y = y * torch.sigmoid(self.att(x))
        elif self.kind == "input":  # with the model input: no layer's channels
            y = y * x.mean(1, keepdim=True).sigmoid()
        elif self.kind == "param":  # a registered per-channel scale
            y = y * self.scale
        elif self.kind == "add":  # a broadcast add of the channels' own means: channel-wise
            y = torch.add(y.mean((2, 3), keepdim=True), y)
        return self.head(y).flatten(1)


@pytest.mark.parametrize("kind, groups", [("self", ["conv"]), ("spatial", []), ("input", []), ("param", []),
                                          ("add", ["conv"])])
def test_gate_shapes(kind, groups):
    m, x = _Gate(kind), torch.randn(2, 3, 6, 6)
    for gated in (False, True):
        gs = find_channel_groups(m, x, gated=gated)
        assert [p for g in gs for p in g.producers] == groups, gated


class LlamaMLPBlock(nn.Module):
    """A transformer block's SwiGLU MLP on (batch, tokens, features), with RMSNorm and a
    residual add: only the MLP's hidden features can be pruned, under gated=True."""

    def __init__(self, d=16, hidden=40):
        super().__init__()
        self.emb = nn.Linear(8, d)
        self.norm = nn.RMSNorm(d)
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.emb(x)
        h = self.norm(x)
        x = x + self.w2(F.silu(self.w1(h)) * self.w3(h))
        return self.head(x)


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm is new in torch 2.4")
def test_llama_mlp_gated_trains_and_slims():
    from chase_ext import ChaseOptimizer

    torch.manual_seed(0)
    m, x = LlamaMLPBlock(), torch.randn(4, 6, 8)
    assert channel_coverage(m, x)["reached_layers"] == 0
    assert _find(m, x, gated=True) == [ChannelGroup(["w1", "w3"], [Consumer("w2")], [], 40)]
    chase = ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), m, density=0.3,
                           channel_sparsity=0.5, total_steps=20, update_interval=4, channel_end=0.5,
                           example_inputs=x, gated_channels=True)
    y = torch.randn(4, 6, 4)
    for _ in range(20):
        chase.zero_grad()
        F.mse_loss(m(x), y).backward()
        chase.step()
    with torch.no_grad():
        before = m(x)
        chase.slim_()
        torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-6)
    assert m.w1.out_features == m.w3.out_features == m.w2.in_features == 20


class _Div(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.g, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        a = self.a(x)
        if self.kind == "number":
            y = a / 2.0
        elif self.kind == "reciprocal":  # a removed channel would divide by zero
            y = 1.0 / a
        elif self.kind == "by_itself":
            y = a / a.abs().mean((2, 3), keepdim=True)
        elif self.kind == "gate":
            y = a * (1.0 / self.g(x))
        else:  # by another layer's channels
            y = torch.div(a, self.g(x))
        return self.h(y).flatten(1)


@pytest.mark.parametrize("kind, groups", [("number", ["a"]), ("reciprocal", []), ("by_itself", []), ("gate", []),
                                          ("other", [])])
def test_division_only_by_a_number(kind, groups):
    m, x = _Div(kind), torch.randn(2, 3, 6, 6)
    for kw in JOINS.values():
        assert [p for g in find_channel_groups(m, x, **kw) for p in g.producers] == groups, kw
