"""SPEC rules pinned by hand-worked numbers and edge cases (SPEC §2-§5, §8): counts at
phase boundaries, init masks from the seeded generator, the channel schedule and
floors, score kinds, the last channel event, slim cadence, bias zeroing, checkpoint
refusals. Each was found unguarded by mutation testing: changing the rule in the code
left every other test passing."""
from __future__ import annotations

import math

import pytest
import torch

import chase_ext
from chase_ext.sparsity import global_counts

KW = dict(t_explore_end=80, t_end=100, soft_bound0=0.05, soft_bound_end=0.0, swap0=0.5, swap_end=0.005)


def test_phase_b_starts_exactly_at_t_explore_end():
    # SPEC §3: phase A is t < T_m; at t == T_m phase B prunes excess + round(r·B) and
    # targets exactly B (even with a non-zero δ_end)
    kw = dict(KW, soft_bound_end=0.01)
    p, g, tgt = global_counts(80, 110, 100, 1000, 1000, **kw)
    r = 0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * 80 / 100)) / 2
    assert (p, tgt) == (10 + round(r * 100), 100)
    p, g, tgt = global_counts(79, 110, 100, 1000, 1000, **kw)
    assert p == 10 and tgt > 100


def test_phase_b_prune_is_capped_at_the_active_count():
    # SPEC §3: prune among active slots: never more than nnz (e.g. after a large
    # channel removal leaves fewer active weights than round(r·B))
    p, g, tgt = global_counts(90, 1, 100, 1000, 1000, **dict(KW, swap0=1.0, swap_end=1.0))
    assert p == 1 and tgt == 100 and g == 100


def _r(t, t_end=100, r0=0.5, r_end=0.005):
    return r_end + (r0 - r_end) * (1 + math.cos(math.pi * t / t_end)) / 2


def test_layer_counts_prune_excess_plus_round_r_k():
    # SPEC §3.4: each tensor prunes round(r(t)·k_l) plus any excess over k_l, grows back to k_l
    from chase_ext.sparsity import layer_counts

    kw = dict(t_end=100, swap0=0.5, swap_end=0.005)
    for t in (10, 90):
        p, g = layer_counts(t, [50, 30], [40, 30], [100, 100], **kw)
        assert p == [round(_r(t) * 40) + 10, round(_r(t) * 30)]
        assert [n - a + b for n, a, b in zip([50, 30], p, g)] == [40, 30]


def _model_and_chase(**kw):
    from models import MODELS

    torch.manual_seed(0)
    model = MODELS["vgg_small"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw.setdefault("density", 0.3)
    kw.setdefault("total_steps", 100)
    kw.setdefault("update_interval", 10)
    return model, opt, chase_ext.ChaseOptimizer(opt, model, **kw)


@pytest.mark.parametrize("init", ["erk", "uniform"])
def test_init_masks_are_randperm_prefixes_in_global_order(init):
    # SPEC §2: one CPU generator seeded with `seed`; per sparse tensor in global order,
    # the active slots are randperm(n_l, generator=g)[:k_l]
    from chase_ext.density import erk_counts, uniform_counts

    model, opt, chase = _model_and_chase(init=init, seed=7)
    shapes = [tuple(p.shape) for p in chase._params]
    B = round(0.3 * sum(math.prod(s) for s in shapes))
    ks = erk_counts(shapes, B) if init == "erk" else uniform_counts(shapes, B, density=0.3)
    g = torch.Generator().manual_seed(7)
    for n, s, k in zip(chase.sparse_names(), shapes, ks):
        m = torch.zeros(math.prod(s), dtype=torch.bool)
        m[torch.randperm(math.prod(s), generator=g)[:k]] = True
        assert torch.equal(chase.masks[n].cpu().contiguous().view(-1), m), n


def test_cubic_channel_schedule_values():
    # SPEC §4: s(t) = S_c·(1 − (1 − t/T_ch)^3), checked against literal numbers (the
    # optimizer tests compare target_live with the same cubic, so they cannot see it)
    from chase_ext.schedules import cubic

    assert cubic(50, 100, 0.5) == pytest.approx(0.4375)
    assert cubic(25, 100, 0.8) == pytest.approx(0.8 * (1 - 0.75**3))
    assert cubic(100, 100, 0.5) == 0.5 and cubic(0, 100, 0.5) == 0.0


def test_target_live_rounds_half_to_even():
    # SPEC §4: target live = round((1 − s(t))·C0), Python round (half to even)
    from chase_ext.channels import target_live

    assert target_live(100, 80, 0.35, 10) == 6  # 6.5 -> 6
    assert target_live(100, 80, 0.25, 10) == 8  # 7.5 -> 8
    assert target_live(50, 100, 0.5, 64) == 36  # (1 - 0.4375)·64 = 36
    assert target_live(20, 100, 0.3, 10) == round((1 - 0.3 * (1 - 0.8**3)) * 10) == 9  # 8.536 -> 9


def test_channel_floor_is_floor_not_round():
    # SPEC §4: floor_l = max(1, math.floor(C_l·(1 − S_c)·β))
    from chase_ext.channels import channel_floor

    assert channel_floor(7, 0.0, 0.5) == 3  # 3.5 -> 3
    assert channel_floor(10, 0.5, 0.3) == 1  # 1.5 -> 1
    assert channel_floor(64, 0.5, 0.2) == 6  # 6.4 -> 6


def test_round_to_removes_the_lowest_ranked_of_the_greedy_choice():
    # round_to makes a layer remove fewer channels; the ones it still removes are the
    # lowest-scored (chase_ext.channels docstring, SPEC §4 "lowest scores")
    from chase_ext.channels import select_channels

    sc = [[(0.1, 0), (0.2, 1), (0.3, 2), (0.9, 3)]]
    assert select_channels(sc, [4], [1], [4], 3, round_to=2) == [[0, 1]]
    sc = [[(0.3, 0), (0.2, 1), (0.1, 2), (0.9, 3), (0.8, 4), (0.7, 5)]]
    assert select_channels(sc, [6], [1], [6], 3, round_to=2) == [[1, 2]]


def test_erk_resolves_epsilon_over_the_non_dense_layers_only():
    # SPEC §2: a layer with ε·raw_l >= 1 is dense and ε is solved again over the rest:
    # ε = (B − 12) / (Σdims of the others) = 988/202, shares 626.06 and 361.94
    from chase_ext.density import erk_counts

    assert erk_counts([(4, 3), (64, 64), (10, 64)], 1000) == [12, 626, 362]


def test_channel_scores_by_kind():
    # SPEC §4: umm = Σ|W[c]| / original fan-in; active_mean = Σ|w| over active / active
    # count (0 when none); active_fraction = active count / original fan-in
    from chase_ext.channels import group_scores

    counts, sums = [2, 0, 4], [1.0, 0.0, 2.0]
    assert group_scores("umm", counts, sums, 10) == pytest.approx([0.1, 0.0, 0.2])
    assert group_scores("active_mean", counts, sums, 10) == pytest.approx([0.5, 0.0, 0.5])
    assert group_scores("active_fraction", counts, sums, 10) == pytest.approx([0.2, 0.0, 0.4])


def test_resume_after_the_last_channel_event_fires_no_more_events():
    # SPEC §4: the first event at or after T_ch is the last one; a resumed run must not
    # start firing events again (the checkpoint's 'done' is restored)
    from test_optimizer import make, run

    kw = dict(total_steps=60, update_interval=10, channel_sparsity=0.5, channel_end=0.4)
    mA, _, cA = make("mlp", **kw)
    run("mlp", mA, cA, 60, watch=False)
    mB, _, cB = make("mlp", **kw)
    run("mlp", mB, cB, 40, watch=False)  # last event at 25: done
    sd = cB.state_dict()
    assert sd["chase"]["channels"]["done"] is True
    mC, _, cC = make("mlp", **kw)
    cC.load_state_dict(sd)
    mC.load_state_dict(mB.state_dict())
    assert cC.state_dict()["chase"]["channels"]["done"] is True
    run("mlp", mC, cC, 20, start=40, watch=False)
    a, c = cA.state_dict()["chase"]["channels"], cC.state_dict()["chase"]["channels"]
    assert (a["events"], a["done"]) == (c["events"], c["done"]) == (3, True)


def test_event_exactly_at_channel_end_is_the_last():
    # SPEC §4: "the first event at or after T_ch uses S_c and is the last one"; here
    # events fall at 4, 8, ..., and T_ch = 32 is one of them
    from test_optimizer import make, train_step

    kw = dict(total_steps=64, update_interval=8, channel_interval=4, channel_sparsity=0.5, channel_end=0.5)
    model, _, chase = make("mlp", **kw)
    assert chase.config.last_channel_event == 32
    for i in range(32):
        train_step("mlp", model, chase, i)
    ch = chase.state_dict()["chase"]["channels"]
    assert (ch["events"], ch["done"]) == (8, True)
    for i in range(32, 64):
        train_step("mlp", model, chase, i)
    assert chase.state_dict()["chase"]["channels"]["events"] == 8


def test_slim_during_training_k_slims_at_every_kth_event():
    # SPEC §8 / optimizer docstring: slim_during_training=k slims after the k-th, 2k-th, ... event
    from test_optimizer import make, train_step

    model, _, chase = make("mlp", total_steps=60, update_interval=10, channel_sparsity=0.5, channel_end=0.4,
                           slim_during_training=2)
    seen = {}
    for i in range(30):
        train_step("mlp", model, chase, i)
        if chase.t in (5, 15, 25):  # the three events
            seen[chase.t] = chase.slim_count
    assert seen == {5: 0, 15: 1, 25: 1}


def test_removed_channels_bias_entries_stay_zero():
    # SPEC §4: removing a channel zeroes its producer's bias entry, and it stays 0 (with
    # its optimizer state) from then on
    from test_optimizer import make, train_step

    model, opt, chase = make("mlp", opt="adam", total_steps=60, update_interval=10, channel_sparsity=0.5,
                             channel_end=0.4)
    for i in range(40):
        train_step("mlp", model, chase, i)
        dead = ~chase._ch.alive[0]
        if dead.any():
            b = dict(model.named_modules())[chase.groups[0].producers[0]].bias
            assert bool((b.detach()[dead] == 0).all()), chase.t
            for k, v in opt.state[b].items():
                if torch.is_tensor(v) and v.shape == b.shape:
                    assert bool((v[dead] == 0).all()), (chase.t, k)
    assert bool(dead.any())


def _slimmed_vgg_checkpoint():
    from test_optimizer import make, run

    kw = dict(total_steps=40, channel_sparsity=0.5, channel_end=0.5, slim_during_training=True)
    m1, _, c1 = make("vgg_small", **kw)
    run("vgg_small", m1, c1, 30, watch=False)
    assert c1.slim_count >= 1
    return kw, c1.state_dict()


def test_checkpoint_with_slimmed_away_channel_alive_is_refused():
    # SPEC §4/§5: a removed channel never comes back; a checkpoint whose 'alive' revives a
    # channel that is no longer physically present is inconsistent and must be refused
    from test_optimizer import make

    kw, sd = _slimmed_vgg_checkpoint()
    chs = sd["chase"]["channels"]
    g = next(i for i, p in enumerate(chs["present"]) if len(p) < chs["channels"][i])
    gone = sorted(set(range(chs["channels"][g])) - set(chs["present"][g].tolist()))[0]
    alive = [a.clone() for a in chs["alive"]]
    alive[g][gone] = True
    bad = dict(sd, chase=dict(sd["chase"], channels=dict(chs, alive=alive)))
    m2, _, c2 = make("vgg_small", **kw)
    with pytest.raises(ValueError, match="slimmed away"):
        c2.load_state_dict(bad)
    assert c2.t == 0 and c2.slim_count == 0


def test_checkpoint_older_than_the_model_slims_is_refused():
    # a model that was slimmed cannot load a checkpoint from before that slim
    from test_optimizer import make, run

    kw, sd = _slimmed_vgg_checkpoint()
    m0, _, c0 = make("vgg_small", **kw)
    early = c0.state_dict()  # t = 0, no slim records
    m2, _, c2 = make("vgg_small", **kw)
    c2.load_state_dict(sd)
    with pytest.raises(ValueError, match="un-slim"):
        c2.load_state_dict(early)


def test_resume_with_another_seed_or_min_channel_ratio_is_refused():
    # the seed decides init masks and random growth (SPEC §2, §3); β decides the floors
    # (SPEC §4): a checkpoint written with other values must not load
    from test_optimizer import make, run

    kw = dict(total_steps=60, update_interval=10, channel_sparsity=0.5, channel_end=0.4)
    m1, _, c1 = make("mlp", **kw)
    run("mlp", m1, c1, 12, watch=False)
    sd = c1.state_dict()
    from chase_ext import ChaseOptimizer
    from test_optimizer import BACKEND, example_input, mlp

    m2 = mlp()  # make()'s own `seed` is the torch seed, so build this one by hand
    c2 = ChaseOptimizer(torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9), m2, density=0.3, seed=1,
                        example_inputs=example_input("mlp"), backend=BACKEND, **kw)
    with pytest.raises(ValueError, match="seed"):
        c2.load_state_dict(sd)
    m3, _, c3 = make("mlp", min_channel_ratio=0.3, **kw)
    with pytest.raises(ValueError, match="min_channel_ratio"):
        c3.load_state_dict(sd)
    assert c2.t == c3.t == 0


def test_last_channel_event_is_at_least_step_one():
    # SPEC §4: events fire at t >= 1; with T_ch = 0 and offset 0 the only event is at ΔT_ch
    from chase_ext.config import ChaseConfig, last_channel_event

    assert last_channel_event(4, 8, 0) == 4
    assert last_channel_event(20, 1, 0) == 20
    # that event (step 20) is past total_steps: nothing would re-grow the freed weights
    with pytest.raises(ValueError, match="channel schedule ends too late"):
        ChaseConfig(density=0.5, total_steps=10, update_interval=1, channel_interval=20, channel_end=0,
                    channel_sparsity=0.5, example_inputs=torch.zeros(1))
