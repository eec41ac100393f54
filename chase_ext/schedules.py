"""Schedules of the method as pure functions of the step ``t`` (SPEC §3, §4).

``t`` is always the number of optimizer steps actually taken, the current one included.
Everything here is plain Python float arithmetic, so every rank and every backend gets
the same numbers.
"""
from __future__ import annotations

import math

__all__ = [
    "cosine",
    "soft_bound",
    "swap_fraction",
    "cubic",
    "is_update_step",
    "is_channel_event",
    "channel_event_offset",
]


def cosine(t: int, horizon: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * t / horizon)) / 2``; ``end`` once t >= horizon."""
    if horizon <= 0 or t >= horizon:
        return float(end)
    return end + (start - end) * (1.0 + math.cos(math.pi * t / horizon)) / 2.0


def soft_bound(t: int, t_explore_end: int, delta0: float, delta_end: float) -> float:
    """δ(t) of phase A (MEST soft memory bound), cosine over [0, T_m)."""
    return cosine(t, t_explore_end, delta0, delta_end)


def swap_fraction(t: int, t_end: int, r0: float, r_end: float) -> float:
    """r(t) of phase B: share of the budget swapped per update, cosine over [0, t_end)."""
    return cosine(t, t_end, r0, r_end)


def cubic(t: int, horizon: int, final: float) -> float:
    """Channel sparsity s(t) = S_c * (1 - (1 - t/T_ch)^3) for t < T_ch, S_c after."""
    if horizon <= 0 or t >= horizon:
        return float(final)
    return final * (1.0 - (1.0 - t / horizon) ** 3)


def is_update_step(t: int, update_interval: int, t_end: int) -> bool:
    """A parameter update runs after step ``t`` (SPEC §3.0)."""
    return t % update_interval == 0 and t < t_end


def channel_event_offset(channel_interval: int, update_interval: int) -> int:
    """Events fire where ``t % channel_interval == (update_interval // 2) % channel_interval``."""
    return (update_interval // 2) % channel_interval


def is_channel_event(t: int, channel_interval: int, update_interval: int) -> bool:
    """A channel event may fire after step ``t`` (the caller stops after the last one)."""
    return t >= 1 and t % channel_interval == channel_event_offset(channel_interval, update_interval)
