"""channel_allocation="latency" (chase_ext.allocation): tables, allocation, the option."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chase_ext import ChaseConfig, ChaseOptimizer
from chase_ext.allocation import (LatencyTable, allocate, measure_latency_table, pick_in_groups,
                                  resolve_latency_table, signature)
from chase_ext.graph import find_channel_groups

from models import example_input, resnet_bottleneck, vgg_small


def test_table_interpolates_and_validates():
    t = LatencyTable({"a": [2, 4, 8]}, {"a": [1.0, 2.0, 6.0]})
    assert t.time("a", 4) == 2.0 and t.time("a", 6) == 4.0 and t.time("a", 1) == 1.0 and t.time("a", 9) == 6.0
    assert LatencyTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="ascending"):
        LatencyTable({"a": [4, 2]}, {"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="non-finite"):
        LatencyTable({"a": [2, 4]}, {"a": [1.0, math.nan]})
    with pytest.raises(ValueError, match="same groups"):
        LatencyTable({"a": [2]}, {"b": [1.0]})


def test_allocate_by_hand():
    # a: 16 wide, saves 1.0 s per 4 channels; b: 16 wide, saves 0.2 s per 4 (per channel: 0.25 vs 0.05)
    t = LatencyTable({"a": [4, 8, 12, 16], "b": [4, 8, 12, 16]},
                     {"a": [1.0, 2.0, 3.0, 4.0], "b": [3.4, 3.6, 3.8, 4.0]})
    # a goes to its floor (4) first, then b
    assert allocate(["a", "b"], [16, 16], [4, 4], 6, t) == [6, 0]  # the 2nd move cut to what is left
    assert allocate(["a", "b"], [16, 16], [4, 4], 14, t) == [12, 2]
    assert allocate(["a", "b"], [16, 16], [8, 4], 14, t) == [8, 6]  # a's floor stops it at 8
    assert allocate(["a", "b"], [16, 16], [4, 4], 100, t) == [12, 12]  # floors bound the total
    assert allocate(["a", "b"], [16, 16], [4, 4], 0, t) == [0, 0]
    # the order of the groups does not change what each gets
    assert allocate(["b", "a"], [16, 16], [4, 4], 14, t) == [2, 12]
    # equal gains: the lower group index first
    same = LatencyTable({"a": [8, 16], "b": [8, 16]}, {"a": [1.0, 2.0], "b": [1.0, 2.0]})
    assert allocate(["a", "b"], [16, 16], [8, 8], 8, same) == [8, 0]


def test_allocate_round_to():
    t = LatencyTable({"a": [4, 10, 16], "b": [4, 10, 16]}, {"a": [1.0, 2.5, 4.0], "b": [3.0, 3.5, 4.0]})
    # table width 10 rounds up to 12: moves of 4, widths stay multiples of 4
    out = allocate(["a", "b"], [16, 16], [4, 4], 10, t, round_to=4)
    assert out == [8, 0]  # 16 -> 12 -> 8; a third move of 4 would exceed what is left (2)
    for live, n in zip([16, 16], out):
        assert (live - n) % 4 == 0


def test_pick_in_groups():
    sc = [[(0.5, 0), (0.1, 3), (0.1, 1), (0.9, 7)], [(0.2, 2), (0.3, 5)]]
    assert pick_in_groups(sc, [2, 0]) == [[1, 3], []]
    assert pick_in_groups(sc, [3, 2]) == [[0, 1, 3], [2, 5]]
    with pytest.raises(ValueError, match="cannot remove"):
        pick_in_groups(sc, [5, 0])


def _mac_timer(layer, x):
    """Deterministic 'time': the layer's multiply-accumulates on x (no clock involved)."""
    with torch.no_grad():
        y = layer(x)
    if isinstance(layer, nn.Linear):
        return float(y.numel() * layer.in_features) * 1e-9
    if isinstance(layer, nn.Conv2d):
        return float(y.numel() * layer.in_channels // layer.groups * math.prod(layer.kernel_size)) * 1e-9
    return float(y.numel()) * 1e-9


def test_measure_with_injected_timer():
    model = resnet_bottleneck()
    x = example_input("resnet_bottleneck")
    groups = find_channel_groups(model, x)
    floors = [1] * len(groups)
    t = measure_latency_table(model, groups, x, floors, batch=4, points=4, step=2, timer=_mac_timer)
    assert set(t.widths) == {g.name for g in groups}
    for g in groups:
        w, s = t.widths[g.name], t.seconds[g.name]
        assert w[-1] == g.channels and w[0] == 1 and len(w) <= 4
        assert all(b > a for a, b in zip(s, s[1:]))  # MACs grow with the width
    again = measure_latency_table(model, groups, x, floors, batch=4, points=4, step=2, timer=_mac_timer)
    assert again.seconds == t.seconds and again.meta["signature"] == t.meta["signature"]


def test_cache_is_used_and_checked(tmp_path):
    model = vgg_small()
    x = example_input("vgg_small")
    groups = find_channel_groups(model, x)
    floors = [1] * len(groups)
    path = tmp_path / "lat.json"
    t1 = resolve_latency_table(str(path), model, groups, x, floors, batch=2, step=4)
    assert path.exists()
    d = json.loads(path.read_text())
    marked = {k: [123.0] * len(v) for k, v in d["seconds"].items()}
    path.write_text(json.dumps({**d, "seconds": marked}))
    t2 = resolve_latency_table(str(path), model, groups, x, floors, batch=2, step=4)
    assert t2.seconds == marked  # loaded, not measured again
    t3 = resolve_latency_table(str(path), model, groups, x, floors, batch=4, step=4)  # another batch
    assert t3.seconds != marked and t3.meta["batch"] == 4 and set(t3.widths) == set(t1.widths)
    # a table measured for higher floors does not reach the lower ones: measured again
    high = [g.channels // 2 for g in groups]
    path2 = tmp_path / "lat2.json"
    t4 = resolve_latency_table(str(path2), model, groups, x, high, batch=4, step=4)
    assert all(t4.widths[g.name][0] == h for g, h in zip(groups, high))
    t5 = resolve_latency_table(str(path2), model, groups, x, floors, batch=4, step=4)
    assert all(t5.widths[g.name][0] == 1 for g in groups)
    # and the lower-floor table serves the higher floors as it is
    d5 = json.loads(path2.read_text())
    sevens = {k: [7.0] * len(v) for k, v in d5["seconds"].items()}
    path2.write_text(json.dumps({**d5, "seconds": sevens}))
    assert resolve_latency_table(str(path2), model, groups, x, high, batch=4, step=4).seconds == sevens


def _run(model, x, y, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    chase = ChaseOptimizer(opt, model, density=0.3, total_steps=4, channel_sparsity=0.4, example_inputs=x,
                           update_interval=2, channel_interval=1, channel_end=1, backend="reference", **kw)
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        chase.zero_grad()
        loss.backward()
        chase.step()
    return chase


def test_optimizer_follows_the_table():
    x = example_input("vgg_small", batch=4)
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(0))
    groups = find_channel_groups(vgg_small(), x)
    names = [g.name for g in groups]
    # only the last group saves time when it shrinks: removal goes there first, down to its
    # floor; the rest (no time saved anywhere) goes to the lowest group index first
    table = LatencyTable({n: [1, g.channels] for n, g in zip(names, groups)},
                         {n: [0.0 if n == names[-1] else 1.0, 1.0] for n in names})
    torch.manual_seed(0)
    ref = _run(vgg_small(), x, y)  # the SPEC default from the same start
    torch.manual_seed(0)
    chase = _run(vgg_small(), x, y, channel_allocation="latency", latency_table=table)
    rep = {r["group"]: (r["channels"], r["live"]) for r in chase.channel_report()}
    full = [rep[n][0] for n in names]
    removed = sum(full) - sum(rep[n][1] for n in names)
    assert removed > 0 and removed == sum(r["channels"] - r["live"] for r in ref.channel_report())
    expected = allocate(names, full, chase._floors, removed, table)
    assert [rep[n][1] for n in names] == [c - e for c, e in zip(full, expected)]
    assert rep[names[-1]][1] == max(chase._floors[-1], full[-1] - removed)
    assert [r["live"] for r in ref.channel_report()] != [rep[n][1] for n in names]


def test_config_knobs():
    assert ChaseConfig(density=0.5, total_steps=10).channel_allocation == "umm"
    with pytest.raises(ValueError, match="channel_allocation"):
        ChaseConfig(density=0.5, total_steps=10, channel_allocation="fast")
    with pytest.raises(ValueError, match="only used with"):
        ChaseConfig(density=0.5, total_steps=10, latency_table="x.json")
    with pytest.raises(ValueError, match="latency_batch"):
        ChaseConfig(density=0.5, total_steps=10, latency_batch=0)
    with pytest.raises(TypeError, match="latency_table"):
        ChaseConfig(density=0.5, total_steps=10, channel_allocation="latency", latency_table=3)
    with pytest.raises(ValueError, match="example_inputs"):
        ChaseConfig(density=0.5, total_steps=10, channel_sparsity=0.5, channel_allocation="latency",
                    channel_groups=[{"producers": ["a"], "consumers": []}])


def test_signature_takes_norms_without_affine_weights():
    """A BatchNorm(affine=False) follower has weight None: the signature still forms, and
    still tells the widths apart."""
    def net(c):
        return nn.Sequential(nn.Conv2d(3, c, 3), nn.BatchNorm2d(c, affine=False), nn.ReLU(), nn.Conv2d(c, 4, 3))

    x = torch.randn(2, 3, 8, 8)
    a, b = net(8), net(6)
    ga, gb = find_channel_groups(a, x), find_channel_groups(b, x)
    assert ga[0].followers == ["1"]
    assert signature(a, ga) == signature(net(8), ga) != signature(b, gb)
