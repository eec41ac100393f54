"""ChaseConfig: SPEC §8 names, defaults, the fraction-or-steps rule, every error."""
import math

import pytest
import torch

from chase_ext.config import ChaseConfig, last_channel_event, resolve_steps


def test_defaults():
    c = ChaseConfig(density=0.1, total_steps=8000)
    assert c.channel_sparsity == 0.0 and c.init == "erk" and c.grow == "gradient" and c.scope == "global"
    assert c.update_steps == 100  # total_steps // 80
    assert c.t_end_steps == 8000
    assert c.t_explore_end_steps == 6400
    assert c.channel_interval_steps == 100
    assert c.channel_end_steps == 6400
    assert (c.soft_bound, c.soft_bound_end, c.swap_fraction, c.swap_fraction_end) == (0.05, 0.0, 0.5, 0.005)
    assert c.min_channel_ratio == 0.2 and c.channel_score == "umm" and c.round_to is None
    assert c.slim_during_training is False and c.exclude == () and c.exclude_channels == ()
    assert c.coupled_channels is False and c.gated_channels is False and c.channel_groups is None and c.dense_first_layer is False
    assert c.seed == 0 and c.example_inputs is None
    assert ChaseConfig(density=0.1, total_steps=10).update_steps == 1  # at least 1


def test_fraction_or_steps():
    c = ChaseConfig(density=0.5, total_steps=1000, update_interval=0.05, t_end=900, t_explore_end=1.0, channel_end=0.25)
    assert c.update_steps == 50 and c.t_end_steps == 900 and c.t_explore_end_steps == 1000
    assert c.channel_end_steps == 250 and c.channel_interval_steps == 50
    assert resolve_steps("x", 0.0125, 200) == 2  # round half to even: 2.5 -> 2
    assert resolve_steps("x", 0.0175, 200) == 4  # 3.5 -> 4
    assert resolve_steps("x", 1, 200) == 1  # an int is a step count, even 1
    assert resolve_steps("x", 1.0, 200) == 200  # a float 1.0 is the whole run


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(density=float("nan")), "density"),
        (dict(channel_sparsity=1.0), "channel_sparsity"),
        (dict(channel_sparsity=-0.1), "channel_sparsity"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10.0), "total_steps"),
        (dict(init="random"), "init"),
        (dict(grow="magnitude"), "grow"),
        (dict(scope="tensor"), "scope"),
        (dict(update_interval=1.5), "update_interval"),
        (dict(update_interval=0), "update_interval"),
        (dict(update_interval=0.0004), "update_interval"),  # rounds to 0 steps
        (dict(update_interval=-3), "update_interval"),
        (dict(update_interval=True), "update_interval"),
        (dict(update_interval="10"), "update_interval"),
        (dict(t_end=2.0), "t_end"),
        (dict(t_end=0.0), "t_end"),
        (dict(t_explore_end=-1), "t_explore_end"),
        (dict(channel_interval=0), "channel_interval"),
        (dict(channel_end=1.01), "channel_end"),
        (dict(soft_bound=-0.1), "soft_bound"),
        (dict(soft_bound_end=1.1), "soft_bound_end"),
        (dict(swap_fraction=2), "swap_fraction"),
        (dict(swap_fraction_end=-1), "swap_fraction_end"),
        (dict(min_channel_ratio=1.5), "min_channel_ratio"),
        (dict(channel_score="l1"), "channel_score"),
        (dict(round_to=0), "round_to"),
        (dict(round_to=8.0), "round_to"),
        (dict(slim_during_training=0), "slim_during_training"),
        (dict(slim_during_training="yes"), "slim_during_training"),
        (dict(exclude=[1]), "exclude"),
        (dict(exclude_channels=[None]), "exclude_channels"),
        (dict(coupled_channels=1), "coupled_channels"),
        (dict(gated_channels="yes"), "gated_channels"),
        (dict(dense_first_layer=True), "dense_first_layer"),  # needs init="uniform"
        (dict(seed=1.0), "seed"),
        (dict(channel_sparsity=0.5), "channel_sparsity"),  # needs example_inputs or groups
        (dict(channel_sparsity=0.5, example_inputs=torch.zeros(1), channel_end=1.0), "channel"),  # ends too late
    ],
)
def test_errors_name_the_field(kw, field):
    base = dict(density=0.1, total_steps=1000)
    base.update(kw)
    with pytest.raises((ValueError, TypeError), match=field):
        ChaseConfig(**base)


def test_string_exclude_is_one_name():
    assert ChaseConfig(density=0.1, total_steps=10, exclude="fc.weight").exclude == ("fc.weight",)


def test_last_event_and_regrow_rule():
    # events at t % 10 == 5 (ΔT=10, ΔT_ch=10); T_ch=80 -> last event 85, update at 90 < 100: ok
    assert last_channel_event(10, 10, 80) == 85
    assert last_channel_event(10, 11, 80) == 85
    assert last_channel_event(7, 10, 0) == 5
    assert last_channel_event(4, 8, 8) == 8  # offset 0: event exactly at T_ch
    ok = ChaseConfig(density=0.1, total_steps=100, channel_sparsity=0.3, example_inputs=torch.zeros(1),
                     update_interval=10, channel_end=80)
    assert ok.last_channel_event == 85
    # last event 95 (T_ch=90): the next update (100) is not < total_steps -> rejected
    with pytest.raises(ValueError, match="channel"):
        ChaseConfig(density=0.1, total_steps=100, channel_sparsity=0.3, example_inputs=torch.zeros(1),
                    update_interval=10, channel_end=90)
    # t_end bounds it too
    with pytest.raises(ValueError, match="t_end"):
        ChaseConfig(density=0.1, total_steps=100, channel_sparsity=0.3, example_inputs=torch.zeros(1),
                    update_interval=10, channel_end=50, t_end=60)


def test_slim_every_and_replace():
    c = ChaseConfig(density=0.1, total_steps=100)
    assert c.slim_every == 0
    assert c.replace(slim_during_training=True).slim_every == 1
    assert c.replace(slim_during_training=3).slim_every == 3
    with pytest.raises(TypeError, match="nope"):
        c.replace(nope=1)
    with pytest.raises(ValueError, match="density"):
        c.replace(density=2.0)



def test_final_soft_bound_when_updates_end_in_phase_a():
    """t_end before t_explore_end leaves the soft bound of the last update (SPEC allows it);
    ending in phase B, with no soft bound left, or in layer scope: None."""
    last, delta = ChaseConfig(density=0.1, total_steps=1000, t_end=0.5).final_soft_bound()
    assert last == 492 and delta == pytest.approx(0.025 * (1 + math.cos(math.pi * 492 / 800)))
    assert ChaseConfig(density=0.1, total_steps=1000).final_soft_bound() is None
    assert ChaseConfig(density=0.1, total_steps=1000, t_end=0.5, t_explore_end=0.4).final_soft_bound() is None
    assert ChaseConfig(density=0.1, total_steps=1000, t_end=0.5, soft_bound=0.0).final_soft_bound() is None
    assert ChaseConfig(density=0.1, total_steps=1000, t_end=0.5, scope="layer").final_soft_bound() is None
