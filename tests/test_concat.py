"""Channel pruning through concatenations (``concat_channels``, not in SPEC): groups with
offsets, slimming spans of shared readers, whole runs, checkpoints."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from chase_ext import ChaseOptimizer
from chase_ext.allocation import measure_latency_table
from chase_ext.graph import channel_coverage, explicit_groups, find_channel_groups, group_from_dict, group_to_dict
from chase_ext.slim import replay_, slim_

from models import TinyDenseNet, TinyInception, TinyUNet, example_input, mask_channels_, perturb_bn
from test_optimizer import check_masked, ema_follows_slims, make, resume_is_exact, run, slim_keeps_function


def _find(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_channel_groups(model, x, **kw)


def _by_name(groups):
    return {g.name: g for g in groups}


KW = dict(total_steps=48, update_interval=8, channel_sparsity=0.5, channel_end=0.5, concat_channels=True)


# --------------------------------------------------------------------------- groups
def test_densenet_groups_read_inside_concatenations():
    m, x = TinyDenseNet(), example_input("densenet_small")
    assert channel_coverage(m, x)["weight_share"] < 0.3  # SPEC: only each layer's inner conv
    cov = channel_coverage(m, x, concat=True)
    assert cov["weight_share"] == 1.0 and cov["left_out"] == {}
    gs = _by_name(_find(m, x, concat=True))
    # the stem's 8 channels open every concatenation of block 1 and its transition
    stem = gs["stem"]
    assert stem.followers == ["norm0", "block1.0.norm1", "block1.1.norm1", "block1.2.norm1", "tnorm"]
    assert [c.module for c in stem.consumers] == ["block1.0.conv1", "block1.1.conv1", "block1.2.conv1", "tconv"]
    assert stem.offsets == {n: 0 for n in stem.followers[1:] + [c.module for c in stem.consumers]}
    # layer 2's 6 channels come after the stem's 8 and layer 1's 6
    g = gs["block1.1.conv2"]
    assert g.offsets == {"block1.2.norm1": 14, "tnorm": 14, "block1.2.conv1": 14, "tconv": 14}
    assert gs["block2.1.conv2"].offsets == {"norm5": 16, "fc": 16}
    assert gs["block1.0.conv1"].offsets == {}  # the inner conv reads no concatenation


def test_inception_offsets_in_columns_of_flattened_maps():
    m, x = TinyInception(), example_input("inception_small")
    gs = _by_name(_find(m, x, concat=True))
    assert gs["b1"].offsets == {"bn": 0, "squeeze": 0, "side": 0}
    assert gs["b2b"].offsets == {"bn": 8, "squeeze": 8, "side": 8}
    assert gs["b3"].offsets == {"bn": 18, "squeeze": 18, "side": 18}
    # fc reads [flatten(2x2 map of e1 | e3) | side]: 4 columns per channel, then 1
    assert [(c.module, c.repeat) for c in gs["e1"].consumers] == [("fc", 4)]
    assert (gs["e1"].offsets, gs["e3"].offsets, gs["side"].offsets) == ({"fc": 0}, {"fc": 32}, {"fc": 64})
    assert gs["side"].consumers[0].repeat == 1
    assert gs["stem"].offsets == {} and gs["squeeze"].offsets == {}


def test_unet_skip_and_coupled_sum_are_concatenated():
    m, x = TinyUNet(), example_input("unet_small")
    with pytest.warns(UserWarning, match="concat_channels=True prunes through concatenations"):
        assert find_channel_groups(m, x) == []
    gs = _by_name(_find(m, x, concat=True, coupled=True))
    assert gs["enc1"].offsets == {"dec": 12}  # read directly by enc2a/enc2b, and as the skip
    assert gs["enc2a+enc2b"].offsets == {"dec": 0, "head": 10}
    assert gs["dec"].offsets == {"head": 0}
    assert "enc2a" in channel_coverage(m, x, concat=True)["left_out"]  # the add blocks without coupling


class _Cat(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.c = nn.Conv2d(8, 5, 1)
        self.d = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.kind == "twice":
            y = torch.cat([a, a], 1)
        elif self.kind == "spatial":
            return self.d(torch.cat([a, b], 2)).mean((2, 3))
        elif self.kind == "grouped":
            y = self.g(torch.cat([a, b], 1))
        elif self.kind == "stack":
            return self.d(torch.stack([a, b], 1).sum(1)).mean((2, 3))
        else:  # a slice of the concatenation
            return self.c(torch.cat([a, b], 1)[:, :8]).mean((2, 3))
        return self.c(y).mean((2, 3))


@pytest.mark.parametrize("kind, why", [
    ("twice", "each once"), ("spatial", "along another dim"),
    ("grouped", "grouped conv g reads a concatenation"), ("stack", "function stack"),
    ("sliced", "getitem")])
def test_concatenations_that_block(kind, why):
    cov = channel_coverage(_Cat(kind), torch.randn(2, 3, 4, 4), concat=True, grouped=True)
    assert "a" in cov["left_out"] and why in cov["left_out"]["a"]["why"], cov["left_out"]


def test_fixed_spans_and_other_groups_share_a_reader():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(3 + 4 + 6 + 1, 5, 1)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            y = torch.cat([x, self.a(x), torch.relu(self.b(x)), x[:, :1]], 1)
            return self.head(torch.relu(self.c(y)).mean((2, 3)))

    gs = _by_name(_find(Net(), torch.randn(2, 3, 4, 4), concat=True))
    assert gs["a"].offsets == {"c": 3} and gs["b"].offsets == {"c": 7}


class _CatAdd(nn.Module):
    """Residual add of two concatenations of equal-width parts; with ``twice`` one coupled
    pair also read side by side in a concatenation."""

    def __init__(self, twice=False):
        super().__init__()
        self.twice = twice
        self.a, self.b, self.c, self.d = (nn.Conv2d(3, 4, 1) for _ in range(4))
        self.e = nn.Conv2d(8, 5, 1)
        self.n = nn.Conv2d(4, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        a, c = self.a(x), self.c(x)
        if self.twice:  # a + c couple them; the cat reads them at offsets 0 and 4
            y = self.n(a + c) + self.e(torch.cat([a, c], 1))
        else:
            y = self.e(torch.cat([a, self.b(x)], 1) + torch.cat([c, self.d(x)], 1))
        return self.head(torch.relu(y).mean((2, 3)))


def test_an_add_of_concatenations_couples_span_with_span():
    m, x = _CatAdd(), torch.randn(4, 3, 4, 4)
    gs = _by_name(_find(m, x, concat=True, coupled=True))
    assert sorted(gs) == ["a+c", "b+d", "e"]  # not one group a+b+c+d
    assert gs["a+c"].offsets == {"e": 0} and gs["b+d"].offsets == {"e": 4}
    o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    chase = ChaseOptimizer(o, m, density=0.5, example_inputs=x, coupled_channels=True, **KW)
    y = torch.randint(0, 2, (4,))
    for _ in range(48):
        chase.zero_grad()
        F.cross_entropy(m(x), y).backward()
        chase.step()
    assert chase.slim_count > 0 and m.e.in_channels < 8
    slim_keeps_function(m, chase, x)


def test_a_coupled_group_read_at_two_places_of_a_concatenation_is_left_out():
    m, x = _CatAdd(twice=True), torch.randn(4, 3, 4, 4)
    cov = channel_coverage(m, x, concat=True, coupled=True)
    assert "two places of what e reads" in cov["left_out"]["a"]["why"]

    class GLU(nn.Module):  # a SwiGLU whose halves are also read side by side
        def __init__(self):
            super().__init__()
            self.w1, self.w3 = nn.Linear(6, 8), nn.Linear(6, 8)
            self.w2, self.side, self.head = nn.Linear(8, 4), nn.Linear(16, 4), nn.Linear(4, 2)

        def forward(self, x):
            a, b = self.w1(x), self.w3(x)
            return self.head(torch.relu(self.w2(F.silu(a) * b) + self.side(torch.cat([a, b], 1))))

    cov = channel_coverage(GLU(), torch.randn(8, 6), concat=True, gated=True, coupled=True)
    assert "two places of what side reads" in cov["left_out"]["w1"]["why"]


def test_explicit_groups_with_offsets():
    m, x = TinyDenseNet(), example_input("densenet_small")
    gs = find_channel_groups(m, x, concat=True)
    g = _by_name(gs)["block1.1.conv2"]
    d = group_to_dict(g)
    assert d["offsets"]["tconv"] == 14 and group_from_dict(d) == g
    assert "offsets" not in group_to_dict(_by_name(gs)["block1.0.conv1"])
    assert explicit_groups(m, gs) == gs and explicit_groups(m, [group_to_dict(h) for h in gs]) == gs
    # checked against the trace: the offsets, and the readers inside concatenations
    chase = ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), m, channel_groups=gs, example_inputs=x,
                           density=0.5, **KW)
    assert [h.offsets for h in chase.groups] == [h.offsets for h in gs]
    wrong = [dict(d, offsets={**g.offsets, "tconv": 15})]  # fits its width, but not where the trace puts it
    with pytest.raises(ValueError, match=r"other offsets: 'tconv' at 14, given 15"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), m, channel_groups=wrong, example_inputs=x,
                       density=0.5, **KW)
    stem = group_to_dict(_by_name(gs)["stem"])  # block1.0 reads cat([stem]): width 8 either way
    no_off = dict(stem, offsets={k: v for k, v in stem["offsets"].items() if k != "block1.0.norm1"})
    with pytest.raises(ValueError, match=r"'block1.0.norm1' at 0, given none"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), m, example_inputs=x, density=0.5,
                       channel_groups=[no_off], **KW)
    short = dict(d, followers=[f for f in d["followers"] if f != "tnorm"],
                 offsets={k: v for k, v in d["offsets"].items() if k != "tnorm"})
    with pytest.raises(ValueError, match=r"follower 'tnorm'"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), m, example_inputs=x, density=0.5,
                       channel_groups=[short], **KW)
    # widths and spans are checked without a trace too
    for offsets, match in [({**g.offsets, "tconv": 21}, "in_channels=26, expected 6 from offset 21"),
                           ({**g.offsets, "tconv": -1}, "int >= 0"), ({**g.offsets, "fc": 0}, "not a follower or consumer"),
                           ({**g.offsets, "tconv": True}, "int >= 0")]:
        with pytest.raises(ValueError, match=match):
            explicit_groups(m, [dict(d, offsets=offsets)])
    other = _by_name(gs)["block1.0.conv2"]  # its span [8, 14) meets [13, 19) below
    with pytest.raises(ValueError, match=r"'tconv' reads columns \[13, 19\) here and \[8, 14\)"):
        explicit_groups(m, [other, dict(d, offsets={**g.offsets, "tconv": 13})])
    with pytest.raises(ValueError, match=r"already appears in .* \(with an offset\)"):
        explicit_groups(m, [other, dict(d, offsets={k: v for k, v in g.offsets.items() if k != "tnorm"})])
    with pytest.raises(TypeError, match="offsets must be a dict"):
        explicit_groups(m, [dict(d, offsets=[14])])


# --------------------------------------------------------------------------- slim_
def _keep(groups, fracs):
    return [torch.arange(g.channels)[torch.linspace(0, g.channels - 1, max(1, int(g.channels * f))).long()].unique()
            for g, f in zip(groups, fracs)]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_slim_in_steps_equals_masked(data):
    """Groups sharing concatenation readers slimmed together or one after another (with
    the offsets as the model is then): the slim model computes the masked one."""
    name = data.draw(st.sampled_from(["densenet_small", "inception_small", "unet_small"]))
    torch.manual_seed(0)
    model = perturb_bn({"densenet_small": TinyDenseNet, "inception_small": TinyInception, "unet_small": TinyUNet}[name]())
    x = example_input(name)
    groups = find_channel_groups(model, x, concat=True, coupled=True)
    keep = [torch.tensor(sorted(data.draw(st.sets(st.integers(0, g.channels - 1), min_size=1))), dtype=torch.int64)
            for g in groups]
    mask_channels_(model, groups, keep)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    order = data.draw(st.permutations(range(len(groups))))
    cut = data.draw(st.integers(0, len(groups)))
    slim, records, present = copy.deepcopy(model), [], [torch.arange(g.channels) for g in groups]
    for part in (order[:cut], order[cut:]):
        # offsets as the model is now: less what the spans before lost
        now = []
        for g in groups:
            offs = {}
            for m, off in g.offsets.items():
                lost = 0
                for h, p in zip(groups, present):
                    if m in h.offsets and h.offsets[m] < off:
                        rep = next((c.repeat for c in h.consumers if c.module == m), 1)
                        lost += (h.channels - len(p)) * rep
                offs[m] = off - lost
            now.append(dataclasses.replace(g, offsets=offs))
        k_now = [torch.searchsorted(present[i], keep[i]) if i in part else None for i in range(len(groups))]
        records.append(slim_(slim, now, k_now))
        for i in part:
            present[i] = keep[i]
    slim.eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), ref, rtol=1e-5, atol=1e-5)
    fresh = perturb_bn(type(model)())
    replay_(fresh, records)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in slim.parameters()]
    fresh.load_state_dict(slim.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=1e-5, atol=1e-5)


def test_slim_refuses_overlapping_spans_and_changes_nothing():
    model, x = TinyInception(), example_input("inception_small")
    gs = find_channel_groups(model, x, concat=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [g.name for g in gs]
    bad = list(gs)
    j = names.index("b2b")
    bad[j] = copy.deepcopy(gs[j])
    bad[j].offsets["squeeze"] = 4  # overlaps b1's [0, 8)
    keep = [torch.arange(g.channels - 1) if n in ("b1", "b2b") else None for g, n in zip(gs, names)]
    with pytest.raises(ValueError, match="'squeeze' dim 1 appears in group"):
        slim_(model, bad, keep)
    bad[j] = copy.deepcopy(gs[j])
    bad[j].offsets["bn"] = 20  # 20 + 10 > 22
    with pytest.raises(ValueError, match="follower 'bn' of group .* from offset 20"):
        slim_(model, bad, keep)
    bad[j].offsets["bn"] = -1
    with pytest.raises(ValueError, match="offset of 'bn' must be an int >= 0"):
        slim_(model, bad, keep)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["densenet_small", "inception_small", "unet_small"])
def test_run_through_concatenations_keeps_every_invariant(name, opt):
    model, o, chase = make(name, opt=opt, coupled_channels=name == "unet_small", **KW)
    assert any(g.offsets for g in chase.groups)
    _, w = run(name, model, chase, 48)  # the Watcher checks the slims at removal and the readers' widths
    assert w.events and chase.slim_count > 0
    shrunk = [r for r in chase.channel_report() if r["live"] < r["channels"]]
    assert any(chase.groups[[g.name for g in chase.groups].index(r["group"])].offsets for r in shrunk)
    slim_keeps_function(model, chase, example_input(name))
    check_masked(chase)
    model.train()
    F.cross_entropy(model(example_input(name, batch=4)), torch.zeros(4, dtype=torch.long)).backward()


def test_concat_checkpoint_resumes_exactly():
    """A checkpoint taken after slims at removal loads into a fresh full-width model and
    the run goes on as the uninterrupted one does."""
    resume_is_exact("densenet_small", KW)


def test_layer_scope_round_to_and_slim_every_event():
    model, o, chase = make("densenet_small", scope="layer", round_to=2, slim_during_training=True, **KW)
    _, w = run("densenet_small", model, chase, 48)
    assert chase.slim_count > 0
    for r in chase.channel_report():
        assert r["live"] % 2 == 0 or r["live"] == r["channels"] or r["live"] == 1, r
    slim_keeps_function(model, chase, example_input("densenet_small"))


def test_native_equals_reference_concat_run():
    pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")
    from test_devices import _assert_same_run, _exact_run

    kw = dict(concat_channels=True, coupled_channels=True)
    _assert_same_run(_exact_run("unet_small", "cpu", 48, **kw),
                     _exact_run("unet_small", "cpu", 48, backend="reference", **kw))
    _assert_same_run(_exact_run("densenet_small", "cpu", 48, concat_channels=True),
                     _exact_run("densenet_small", "cpu", 48, backend="reference", concat_channels=True))


def test_ema_copy_follows_the_slims_at_removal():
    ema_follows_slims("inception_small", KW)


def test_latency_table_times_readers_at_their_concatenated_width():
    model, x = TinyInception(), example_input("inception_small")
    gs = find_channel_groups(model, x, concat=True)
    seen = []

    def timer(layer, inp):
        seen.append((type(layer).__name__, tuple(inp.shape)))
        return 1e-3

    measure_latency_table(model, [g for g in gs if g.name == "b2b"], x, [1], batch=2, points=2, step=1, timer=timer)
    # b2b at 10 and at its floor 1: bn and squeeze see the other 12 channels of the concatenation too
    assert ("BatchNorm2d", (2, 22, 32, 32)) in seen and ("BatchNorm2d", (2, 13, 32, 32)) in seen
    assert ("Conv2d", (2, 13, 32, 32)) in seen
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, density=0.5, example_inputs=x,
                           channel_allocation="latency", **KW)
    run("inception_small", model, chase, 48)
    slim_keeps_function(model, chase, x)
