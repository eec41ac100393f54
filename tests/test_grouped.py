"""Channel pruning through grouped convs (``grouped_channels``, not in SPEC): groups,
selection by blocks, slimming, whole runs, checkpoints."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from chase_ext import ChaseOptimizer
from chase_ext.allocation import LatencyTable, allocate, pick_in_groups
from chase_ext.channels import channel_floor, group_step, select_channels
from chase_ext.graph import (channel_coverage, check_against_trace, explicit_groups, find_channel_groups,
                             group_from_dict, group_to_dict)
from chase_ext.groups import ChannelGroup, Consumer
from chase_ext.slim import replay_, slim_

from models import TinyResNeXt, example_input, keep_per_block, mask_channels_, perturb_bn
from test_optimizer import check_masked, ema_follows_slims, make, resume_is_exact, run, slim_keeps_function


def _find(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_channel_groups(model, x, **kw)


class RegNetYBlock(nn.Module):
    """RegNetY's X block with squeeze-and-excitation on the grouped conv's output, and a
    grouped conv whose conv groups differ from the next one's (8 and 4 groups)."""

    def __init__(self, c=16, w=32):
        super().__init__()
        self.a = nn.Conv2d(c, w, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(w)
        self.b = nn.Conv2d(w, w, 3, padding=1, groups=8, bias=False)
        self.bn_b = nn.BatchNorm2d(w)
        self.se1 = nn.Conv2d(w, 8, 1)
        self.se2 = nn.Conv2d(8, w, 1)
        self.d = nn.Conv2d(w, w, 3, padding=1, groups=4)
        self.c = nn.Conv2d(w, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        y = F.relu(self.bn_a(self.a(x)))
        y = F.relu(self.bn_b(self.b(y)))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = self.c(F.relu(self.d(y)))
        return self.head(F.relu(x + y).mean((2, 3)))


def _train(model, chase, x, y, steps):
    for _ in range(steps):
        chase.zero_grad()
        F.cross_entropy(model(x), y).backward()
        chase.step()


# --------------------------------------------------------------------------- groups
def test_grouped_groups_and_coverage():
    m, x = TinyResNeXt(), torch.randn(1, 3, 8, 8)
    gs = _find(m, x, grouped=True)
    assert gs == [
        ChannelGroup(["a.0"], [Consumer("b.0", 1, 4)], [], 32, 4),
        ChannelGroup(["a.1"], [Consumer("b.1", 1, 4)], [], 32, 4),
        ChannelGroup(["b.0"], [Consumer("c.0")], [], 32, 4),
        ChannelGroup(["b.1"], [Consumer("c.1")], [], 32, 4),
    ]
    cov = channel_coverage(m, x, grouped=True)
    # candidates: stem, a, b, c; the grouped convs b now count too
    assert (cov["reached_layers"], cov["candidate_layers"]) == (4, 7)
    assert cov["weight_share"] == pytest.approx((2 * 2048 + 2 * 2304) / (1728 + 4 * 2048 + 2 * 2304))
    both = _find(m, x, grouped=True, coupled=True)
    assert [g.producers for g in both] == [["stem", "c.0", "c.1"], ["a.0"], ["a.1"], ["b.0"], ["b.1"]]
    assert channel_coverage(m, x, grouped=True, coupled=True)["weight_share"] == 1.0
    # a round trip through the plain description keeps the conv groups and blocks
    assert [group_from_dict(group_to_dict(g)) for g in gs] == gs


def test_blocks_are_the_lcm_of_the_conv_groups():
    m, x = RegNetYBlock(), torch.randn(2, 16, 6, 6)
    gs = {g.name: g for g in _find(m, x, grouped=True, gated=True)}
    assert gs["a"] == ChannelGroup(["a"], [Consumer("b", 1, 8)], ["bn_a"], 32, 8)
    # b's output (8 conv groups) is gated by se2 and read by d (4 conv groups): blocks 8
    assert gs["b+se2"] == ChannelGroup(["b", "se2"], [Consumer("se1"), Consumer("d", 1, 4)], ["bn_b"], 32, 8)
    assert gs["d"] == ChannelGroup(["d"], [Consumer("c")], [], 32, 4)
    assert "se1" in gs and "c" not in gs  # c is added to the block's input
    # without grouped convs only the squeeze is left
    with pytest.warns(UserWarning, match="grouped_channels=True prunes through grouped convs"):
        assert [g.name for g in find_channel_groups(m, x, gated=True)] == ["se1"]


def test_one_channel_per_conv_group_is_left_out():
    class M(nn.Module):  # a conv with a channel multiplier reads one channel per conv group
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 16, 3, padding=1, groups=8)
            self.c = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3))

    m, x = M(), torch.randn(1, 3, 5, 5)
    cov = channel_coverage(m, x, grouped=True)
    assert cov["left_out"]["a"]["why"].startswith("each conv group of the grouped conv it meets has one channel")
    # its output has two channels per conv group: those can go, as many from each
    gs = find_channel_groups(m, x, grouped=True)
    assert gs == [ChannelGroup(["b"], [Consumer("c")], [], 16, 8)]


def test_explicit_groups_with_grouped_convs():
    m, x = TinyResNeXt(), torch.randn(1, 3, 8, 8)
    gs = explicit_groups(m, [{"producers": ["a.0"], "consumers": ["b.0"]}, {"producers": "b.0", "consumers": "c.0"}])
    assert gs == [ChannelGroup(["a.0"], [Consumer("b.0", 1, 4)], [], 32, 4),
                  ChannelGroup(["b.0"], [Consumer("c.0")], [], 32, 4)]
    check_against_trace(m, gs, x)
    with pytest.raises(ValueError, match="blocks=2 but its grouped convs make 4"):
        explicit_groups(m, [{"producers": ["a.0"], "consumers": ["b.0"], "blocks": 2}])
    # a grouped conv reading the channels must be listed, or its input would stay wide
    with pytest.raises(ValueError, match="consumer 'b.0'"):
        check_against_trace(m, explicit_groups(m, [{"producers": ["a.0"], "consumers": ["c.0"]}]), x)


# --------------------------------------------------------------------------- selection
def test_selection_takes_evenly_from_blocks():
    # 8 channels in 2 blocks: the 3 lowest are all in block 0, yet each block loses as many
    sc = [[(0.1, 0), (0.2, 1), (0.3, 2), (5.0, 3), (1.0, 4), (2.0, 5), (3.0, 6), (4.0, 7)]]
    assert select_channels(sc, [8], [2], [8], 4, blocks=[2]) == [[0, 1, 4, 5]]
    # 3 to remove: rounded to 2 (one per block), the target undershot
    assert select_channels(sc, [8], [2], [8], 3, blocks=[2]) == [[0, 4]]
    # round_to 2 with 2 blocks: each block's live count a multiple of 2, so the count steps by 4
    assert select_channels(sc, [8], [4], [8], 3, round_to=2, blocks=[2]) == [[]]
    assert select_channels(sc, [8], [4], [8], 4, round_to=2, blocks=[2]) == [[0, 1, 4, 5]]
    assert select_channels(sc, [8], [4], [8], 4, round_to=4, blocks=[2]) == [[]]  # 4 per block: full only
    assert group_step(None, 1) is None and group_step(8, 1) == 8 and group_step(6, 4) == 24
    assert channel_floor(32, 0.5, 0.2, group_step(None, 8)) == 8  # floor 3 rounded up to whole blocks


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_selection_blocks_property(data):
    layers = data.draw(st.integers(1, 4))
    scores, live, floors, full, blocks, alive = [], [], [], [], [], []
    for _ in range(layers):
        b = data.draw(st.sampled_from([1, 2, 4]))
        width = data.draw(st.integers(1, 4))
        C = b * width
        per = data.draw(st.integers(1, width))  # live per block now
        keep = torch.cat([torch.randperm(width)[:per] + j * width for j in range(b)]).tolist()
        vals = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=C, max_size=C))  # ties
        scores.append([(vals[c], c) for c in sorted(keep)])
        live.append(len(keep))
        floors.append(channel_floor(C, 0.5, 0.5, group_step(None, b)))
        full.append(C)
        blocks.append(b)
        alive.append(set(keep))
    remove = data.draw(st.integers(0, sum(live)))
    out = select_channels(scores, live, floors, full, remove, blocks=blocks)
    assert sum(map(len, out)) <= remove
    for l in range(layers):
        gone = out[l]
        assert set(gone) <= alive[l] and len(set(gone)) == len(gone)
        left = alive[l] - set(gone)
        assert len(left) >= min(floors[l], live[l])
        width = full[l] // blocks[l]
        per = [sum(1 for c in left if c // width == j) for j in range(blocks[l])]
        assert len(set(per)) == 1  # every block as wide
        for j in range(blocks[l]):  # and each block lost its lowest-ranked
            kept = [(s, c) for s, c in scores[l] if c in left and c // width == j]
            lost = [(s, c) for s, c in scores[l] if c in gone and c // width == j]
            assert not kept or not lost or max(lost) < min(kept)
    if all(b == 1 for b in blocks):  # without blocks it is SPEC's rule
        assert out == select_channels(scores, live, floors, full, remove)


def test_latency_allocation_moves_whole_blocks():
    table = LatencyTable({"g": [8, 16, 24, 32], "h": [1, 2, 3]}, {"g": [1.0, 2.0, 3.0, 4.0], "h": [1.0, 1.1, 1.2]}, {})
    counts = allocate(["g", "h"], [32, 3], [8, 1], 5, table, [8, None])
    assert counts == [0, 2]  # g only moves by whole steps of 8: too many for what is left
    counts = allocate(["g", "h"], [32, 3], [8, 1], 12, table, [8, None])
    assert counts[0] % 8 == 0 and counts[0] > 0
    sc = [[(float(c % 3), c) for c in range(32)], [(0.0, 0), (1.0, 1), (2.0, 2)]]
    picked = pick_in_groups(sc, [8, 1], [4, 1], [32, 3])
    assert [sum(1 for c in picked[0] if c // 8 == j) for j in range(4)] == [2, 2, 2, 2]
    assert picked[1] == [0]


# --------------------------------------------------------------------------- slimming
@pytest.mark.parametrize("bias", [True, False])
def test_slim_grouped_equals_masked_with_state(bias):
    torch.manual_seed(0)
    m, x = TinyResNeXt(bias=bias).eval(), torch.randn(2, 3, 8, 8)
    gs = _find(m, x, grouped=True)
    g = torch.Generator().manual_seed(1)
    keep = [keep_per_block(gr.channels, gr.blocks, 3, g) for gr in gs]
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(x).sum().backward()
    opt.step()
    mods = dict(m.named_modules())
    mask_channels_(m, gs, keep)
    with torch.no_grad():
        y = m(x)
    b0 = mods["b.0"].weight.detach().clone()
    avg = opt.state[mods["b.0"].weight]["exp_avg"].clone()
    masks = {"b.0.weight": torch.rand(b0.shape) > 0.5}
    mask0 = masks["b.0.weight"].clone()
    rec = slim_(m, gs, keep, optimizer=opt, masks=masks)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    b = mods["b.0"]
    assert (b.in_channels, b.out_channels, b.groups, tuple(b.weight.shape)) == (12, 12, 4, (12, 3, 3, 3))
    # rows: b.0's own kept outputs; columns: in conv group j, block j's kept inputs of a.0
    rows, cols = keep[2], keep[0].view(4, 3) - torch.arange(4).view(4, 1) * 8
    want = torch.stack([b0[r, cols[r // 8]] for r in rows.tolist()])
    assert torch.equal(b.weight.detach(), want)
    assert torch.equal(opt.state[b.weight]["exp_avg"], torch.stack([avg[r, cols[r // 8]] for r in rows.tolist()]))
    assert torch.equal(masks["b.0.weight"], torch.stack([mask0[r, cols[r // 8]] for r in rows.tolist()]))
    m(x).sum().backward()
    opt.step()  # Adam goes on at the new widths
    # replayed on a fresh model, the record gives the same shapes
    fresh = replay_(TinyResNeXt(bias=bias), rec)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in m.parameters()]


def test_slim_refuses_uneven_blocks_and_changes_nothing():
    m, x = TinyResNeXt(), torch.randn(1, 3, 8, 8)
    gs = _find(m, x, grouped=True)
    before = copy.deepcopy(m.state_dict())
    keep = [torch.tensor([0, 1, 8, 16, 24]), None, None, None]
    with pytest.raises(ValueError, match=r"keeps \[2, 1, 1, 1\] channels of its 4 blocks"):
        slim_(m, gs, keep)
    bad = [None, None, None, None]
    bad[0] = torch.arange(32)[::2]
    wrong = [ChannelGroup(["a.0"], [Consumer("b.0", 1, 2)], [], 32, 2)]
    with pytest.raises(ValueError, match="has 4 conv groups, the group says 2"):
        slim_(m, wrong, [bad[0]])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- whole runs
KW = dict(total_steps=48, update_interval=8, channel_sparsity=0.5, channel_end=0.5, grouped_channels=True)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_run_slims_what_grouped_convs_read_and_keeps_the_function(opt):
    model, o, chase = make("resnext_small", opt=opt, **KW)
    assert [g.blocks for g in chase.groups] == [1] + [4] * 8  # the stem, then conv1 and conv2 of 4 blocks
    _, w = run("resnext_small", model, chase, 48)  # the Watcher checks blocks and the slims at removal
    assert w.events and chase.slim_count > 0
    mods = dict(model.named_modules())
    conv1 = [r for r in chase.channel_report() if r["producers"][0].endswith(".conv1")]
    assert any(r["live"] < r["channels"] for r in conv1)
    for r in conv1:  # read by the grouped conv2: already narrow
        assert mods[r["producers"][0]].out_channels == r["live"]
    slim_keeps_function(model, chase, example_input("resnext_small"))
    for name, mod in mods.items():
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            assert mod.groups == 4 and mod.in_channels % 4 == 0 and mod.out_channels % 4 == 0, name
    check_masked(chase)


def test_grouped_checkpoint_resumes_exactly():
    """A checkpoint taken after a slim at removal loads into a fresh full-width model
    and the run goes on as the uninterrupted one does."""
    resume_is_exact("resnext_small", KW)


def test_grouped_and_gated_run_on_a_regnety_block():
    torch.manual_seed(0)
    m = perturb_bn(RegNetYBlock())
    x = torch.randn(4, 16, 6, 6)
    y = torch.randint(0, 5, (4,))
    o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    chase = ChaseOptimizer(o, m, density=0.4, example_inputs=x, grouped_channels=True, gated_channels=True, **{
        k: v for k, v in KW.items() if k != "grouped_channels"})
    _train(m, chase, x, y, 48)
    rep = {r["group"]: r for r in chase.channel_report()}
    assert rep["b+se2"]["live"] % 8 == 0 and rep["d"]["live"] % 4 == 0
    assert any(r["live"] < r["channels"] for r in rep.values())
    slim_keeps_function(m, chase, x)
    assert m.b.out_channels == m.se2.out_channels == m.se1.in_channels == m.d.in_channels == rep["b+se2"]["live"]
    check_masked(chase)


def test_native_equals_reference_grouped_run():
    pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")
    from test_devices import _assert_same_run, _exact_run

    kw = dict(grouped_channels=True, coupled_channels=True)
    _assert_same_run(_exact_run("resnext_small", "cpu", 48, **kw),
                     _exact_run("resnext_small", "cpu", 48, backend="reference", **kw))


def test_ema_copy_follows_the_slims_at_removal():
    ema_follows_slims("resnext_small", KW)


def test_multiplier_conv_slimmed_to_one_channel_per_conv_group_slims_again():
    """A conv with a channel multiplier (8 -> 16, 8 conv groups), slimmed at removal to one
    channel per conv group, has in == out == groups: it looks depthwise but stays its
    group's producer, and later slims (here the final one) accept it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 16, 3, padding=1, groups=8)
            self.bn = nn.BatchNorm2d(16)
            self.d = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.c = nn.Conv2d(16, 8, 1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = F.relu(self.d(F.relu(self.bn(self.b(F.relu(self.a(x)))))))
            return self.fc(F.relu(self.c(y)).mean((2, 3)))

    torch.manual_seed(0)
    m, x, y = M(), torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    chase = ChaseOptimizer(o, m, density=0.4, example_inputs=x, **{**KW, "channel_sparsity": 0.8},
                           min_channel_ratio=0.0)
    assert chase.groups[0] == ChannelGroup(["b"], [Consumer("d", 1, 4)], ["bn"], 16, 8)
    _train(m, chase, x, y, 48)
    assert (m.b.in_channels, m.b.out_channels, m.b.groups) == (8, 8, 8)
    y0 = slim_keeps_function(m, chase, x)
    # a checkpoint replays both slims on a fresh model
    m2 = M()
    c2 = ChaseOptimizer(torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9), m2, density=0.4, example_inputs=x,
                        **{**KW, "channel_sparsity": 0.8}, min_channel_ratio=0.0)
    c2.load_state_dict(chase.state_dict())
    m2.load_state_dict(m.state_dict())
    m2.eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(x), y0, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_gather_blocks_is_the_per_conv_group_column_select(data):
    """``_gather_blocks`` against a plain loop: the rows of conv group j keep block j's kept
    input channels, in order; channels_last stays channels_last."""
    from chase_ext.slim import _gather_blocks

    blocks = data.draw(st.sampled_from([1, 2, 3, 4]))
    a = data.draw(st.integers(1, 5))  # input channels per conv group
    b = data.draw(st.integers(1, 3))  # output channels per conv group
    keep_per = data.draw(st.integers(1, a))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    w = torch.randn(blocks * b, a, 3, 2, generator=gen)
    if data.draw(st.booleans()):
        w = w.contiguous(memory_format=torch.channels_last)
    idx = keep_per_block(blocks * a, blocks, keep_per, gen)
    out = _gather_blocks(w.clone(), idx, blocks)
    want = torch.stack([w[r, [c - (r // b) * a for c in idx.tolist() if c // a == r // b]]
                        for r in range(blocks * b)])
    assert torch.equal(out, want)
    cl = torch.channels_last  # the layout goes with it (where it is not ambiguous)
    assert out.is_contiguous(memory_format=cl if w.is_contiguous(memory_format=cl) else torch.contiguous_format)
