"""The validated configuration of :class:`chase_ext.ChaseOptimizer` (SPEC §8).

One name per knob, shared by this dataclass, the optimizer's keywords and the docs.
Every invalid value raises ``ValueError`` (``TypeError`` for a wrong type) at
construction, naming the field and the accepted range.

Schedule knobs (``update_interval``, ``t_end``, ``t_explore_end``, ``channel_interval``,
``channel_end``) follow the fraction-or-steps rule: a ``float`` in (0, 1] is a fraction of
``total_steps`` rounded to the nearest step (Python ``round``, half to even); an ``int``
is a step count; a float outside (0, 1] (including 0.0), a ``bool``, a negative int, or an
interval that resolves to 0 steps is an error. The resolved step counts are the
read-only properties ``update_steps``, ``t_end_steps``, ``t_explore_end_steps``,
``channel_interval_steps`` and ``channel_end_steps``.

Choices where SPEC is silent (documented here, enforced by validation):

* ``density`` must lie in (0, 1]; ``channel_sparsity`` in [0, 1).
* ``soft_bound``, ``soft_bound_end``, ``swap_fraction``, ``swap_fraction_end`` lie in [0, 1].
  (An end value above the start value is allowed: the cosine then rises.)
* ``min_channel_ratio`` (β) lies in [0, 1].
* ``round_to`` is ``None`` or an int >= 1; ``slim_during_training`` is ``False``, ``True``
  (every event) or an int k >= 1 (every k-th event, counting events from 1).
* ``dense_first_layer=True`` is only meaningful with ``init="uniform"``; with ``"erk"`` it
  is rejected rather than silently ignored.
* Numbers of other types (``numpy.int64``, ``numpy.float32``, any ``numbers.Integral`` /
  ``numbers.Real`` except ``bool``) are accepted and stored as Python ``int`` / ``float``;
  an integral value counts as an int (a step count), a real one as a float.
* ``seed`` is an int in [0, 2**64) (what ``torch.Generator.manual_seed`` takes without
  wrapping negative seeds around).
* A schedule step count larger than ``total_steps`` is accepted (e.g. ``t_end`` beyond
  the run simply never stops updates early).
* With ``channel_sparsity > 0`` either ``example_inputs`` or ``channel_groups`` is
  required, and the channel schedule must end at the budget (SPEC §4): some parameter
  update step ``u`` with ``u % update_interval == 0``, ``u >= last event step`` and
  ``u < min(t_end, total_steps)`` must exist.
* Updates that stop (``t_end``) while phase A's soft bound is still above 0 (global
  scope) are accepted, as SPEC allows (``final_soft_bound``); ChaseOptimizer warns when
  that leaves weights above the budget at the end of the run.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .schedules import soft_bound

__all__ = ["ChaseConfig", "resolve_steps", "last_channel_event"]

_SCHEDULE_FIELDS = ("update_interval", "t_end", "t_explore_end", "channel_interval", "channel_end")
_INTERVALS = ("update_interval", "channel_interval")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes [-2**63, 2**64); negatives wrap around


def _plain(v: Any) -> Any:
    """numpy (or other ``numbers``) scalars as Python int/float; anything else unchanged."""
    if isinstance(v, bool) or type(v) in (int, float):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def resolve_steps(name: str, value: Any, total_steps: int, *, interval: bool = False) -> int:
    """Apply the fraction-or-steps rule of SPEC §8 to one schedule knob."""
    value = _plain(value)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int step count or a float fraction in (0, 1], got bool {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be a step count >= {1 if interval else 0} or a fraction in (0, 1], got {value}")
        steps = value
    elif isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(
                f"{name}={value!r}: a float is a fraction of total_steps and must lie in (0, 1]; "
                f"give an int for a step count"
            )
        steps = round(value * total_steps)
    else:
        raise TypeError(f"{name} must be an int step count or a float fraction in (0, 1], got {type(value).__name__}")
    if interval and steps < 1:
        raise ValueError(f"{name}={value!r} resolves to {steps} steps; an interval must be at least 1 step")
    return int(steps)


def last_channel_event(channel_interval: int, update_interval: int, channel_end: int) -> int:
    """Step of the last channel event: the first event step >= max(T_ch, 1) (SPEC §4).

    Events fire at t >= 1 with ``t % channel_interval == (update_interval // 2) % channel_interval``.
    """
    off = (update_interval // 2) % channel_interval
    start = max(channel_end, 1)
    t = start + ((off - start) % channel_interval)
    return t


def _check_unit(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    v = _plain(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or math.isnan(v):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {rng}, got {v!r}")
    return v


def _check_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {v!r}")


def _check_names(name: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = (v,)
    try:
        out = tuple(v)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of names/globs, got {type(v).__name__}") from None
    for x in out:
        if not isinstance(x, str):
            raise TypeError(f"{name} must hold strings (names or globs), got {x!r}")
    return out


@dataclass
class ChaseConfig:
    """Every knob of the method (SPEC §8); the module docstring has the validation rules.

    * ``density`` (required): d = 1 - sparsity of the full model, in (0, 1].
    * ``total_steps`` (required): optimizer steps of the run.
    * ``channel_sparsity`` (0.0): S_c, the share of prunable channels removed; 0 = plain DST.
    * ``example_inputs`` (None): a batch for tracing the channel groups.
    * ``init`` ("erk" | "uniform"), ``grow`` ("gradient" | "random"), ``scope`` ("global" | "layer").
    * ``update_interval`` (total_steps // 80, at least 1), ``t_end`` (total_steps): when masks are updated.
    * ``soft_bound``, ``soft_bound_end`` (0.05, 0.0), ``t_explore_end`` (0.8): phase A.
    * ``swap_fraction``, ``swap_fraction_end`` (0.5, 0.005): phase B.
    * ``channel_interval`` (update_interval), ``channel_end`` (0.8), ``min_channel_ratio`` (0.2),
      ``channel_score`` ("umm" | "active_mean" | "active_fraction"), ``round_to`` (None),
      ``slim_during_training`` (False | True | k), ``coupled_channels`` (False),
      ``channel_groups`` (None = trace), ``exclude_channels`` (()): the channel part.
    * ``gated_channels`` (False): producers whose outputs meet in a multiply (a
      squeeze-and-excitation or GLU gate) lose the same channels, as ``coupled_channels``
      does for residual adds (not in SPEC; ``chase_ext.graph``).
    * ``grouped_channels`` (False): grouped convs that are not depthwise (ResNeXt, RegNet)
      produce and read prunable channels; every conv group keeps the same width, and a
      group read by a grouped conv is slimmed at each event that removes its channels
      (not in SPEC; ``chase_ext.graph``, ``chase_ext.channels``).
    * ``concat_channels`` (False): channels pass through concatenations along the channel dim
      (DenseNet, Inception, SqueezeNet, U-Net skips): the layers reading a concatenation
      lose the removed channels' span of it, and a group read through a concatenation is
      slimmed at each event that removes its channels (not in SPEC; ``chase_ext.graph``).
    * ``channel_allocation`` ("umm" = SPEC | "latency"), ``latency_table`` (None | cache path |
      ``LatencyTable``), ``latency_batch`` (64): how an event's removal is split between
      groups (``chase_ext.allocation``; "latency" is not in SPEC).
    * ``exclude`` (()): weights kept dense; ``dense_first_layer`` (False, uniform init);
      ``seed`` (0).

    Schedule knobs take a float in (0, 1] (a fraction of ``total_steps``) or an int (steps).
    """

    density: float
    total_steps: int
    channel_sparsity: float = 0.0
    example_inputs: Any = field(default=None, repr=False, compare=False)
    init: str = "erk"
    grow: str = "gradient"
    scope: str = "global"
    update_interval: int | float | None = None
    t_end: int | float | None = None
    soft_bound: float = 0.05
    soft_bound_end: float = 0.0
    t_explore_end: int | float = 0.8
    swap_fraction: float = 0.5
    swap_fraction_end: float = 0.005
    channel_interval: int | float | None = None
    channel_end: int | float = 0.8
    min_channel_ratio: float = 0.2
    channel_score: str = "umm"
    round_to: int | None = None
    slim_during_training: bool | int = False
    exclude: tuple[str, ...] = ()
    exclude_channels: tuple[str, ...] = ()
    coupled_channels: bool = False
    gated_channels: bool = False
    grouped_channels: bool = False
    concat_channels: bool = False
    channel_groups: Any = field(default=None, repr=False)
    dense_first_layer: bool = False
    seed: int = 0
    channel_allocation: str = "umm"
    latency_table: Any = field(default=None, repr=False, compare=False)
    latency_batch: int = 64

    def __post_init__(self) -> None:
        # numpy & co. scalars -> Python int/float (bools stay bools and are rejected below)
        for f in ("total_steps", "round_to", "slim_during_training", "seed", *_SCHEDULE_FIELDS):
            setattr(self, f, _plain(getattr(self, f)))
        # total_steps first: the schedule knobs are resolved against it
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int):
            raise TypeError(f"total_steps must be an int >= 1, got {self.total_steps!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {self.total_steps}")
        self.density = _check_unit("density", self.density, 0.0, 1.0, lo_open=True)
        self.channel_sparsity = _check_unit("channel_sparsity", self.channel_sparsity, 0.0, 1.0, hi_open=True)
        _check_choice("init", self.init, ("erk", "uniform"))
        _check_choice("grow", self.grow, ("gradient", "random"))
        _check_choice("scope", self.scope, ("global", "layer"))
        _check_choice("channel_score", self.channel_score, ("umm", "active_mean", "active_fraction"))
        for n in ("soft_bound", "soft_bound_end", "swap_fraction", "swap_fraction_end", "min_channel_ratio"):
            setattr(self, n, _check_unit(n, getattr(self, n), 0.0, 1.0))
        if self.round_to is not None:
            if isinstance(self.round_to, bool) or not isinstance(self.round_to, int):
                raise TypeError(f"round_to must be None or an int >= 1, got {self.round_to!r}")
            if self.round_to < 1:
                raise ValueError(f"round_to must be None or an int >= 1, got {self.round_to}")
        s = self.slim_during_training
        if not isinstance(s, bool):
            if not isinstance(s, int):
                raise TypeError(f"slim_during_training must be False, True or an int k >= 1, got {s!r}")
            if s < 1:
                raise ValueError(f"slim_during_training must be False, True or an int k >= 1, got {s}")
        self.exclude = _check_names("exclude", self.exclude)
        self.exclude_channels = _check_names("exclude_channels", self.exclude_channels)
        for n in ("coupled_channels", "gated_channels", "grouped_channels", "concat_channels", "dense_first_layer"):
            if not isinstance(getattr(self, n), bool):
                raise TypeError(f"{n} must be a bool, got {getattr(self, n)!r}")
        if self.dense_first_layer and self.init != "uniform":
            raise ValueError('dense_first_layer=True needs init="uniform" (ERK sets every layer\'s density itself)')
        _check_choice("channel_allocation", self.channel_allocation, ("umm", "latency"))
        self.latency_batch = _plain(self.latency_batch)
        if isinstance(self.latency_batch, bool) or not isinstance(self.latency_batch, int):
            raise TypeError(f"latency_batch must be an int >= 1, got {self.latency_batch!r}")
        if self.latency_batch < 1:
            raise ValueError(f"latency_batch must be an int >= 1, got {self.latency_batch}")
        if self.latency_table is not None:
            from .allocation import LatencyTable

            if not isinstance(self.latency_table, (str, os.PathLike, LatencyTable)):
                raise TypeError(f"latency_table must be None, a path or a LatencyTable, "
                                f"got {type(self.latency_table).__name__}")
            if self.channel_allocation != "latency":
                raise ValueError('latency_table is only used with channel_allocation="latency"')
        if self.channel_allocation == "latency" and self.channel_sparsity > 0 and self.example_inputs is None:
            from .allocation import LatencyTable

            if not isinstance(self.latency_table, LatencyTable):
                raise ValueError('channel_allocation="latency" measures its table (or checks a cached one) on '
                                 "example_inputs: give example_inputs or a LatencyTable")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed}")

        T = self.total_steps
        ui = max(1, T // 80) if self.update_interval is None else self.update_interval
        self._update_steps = resolve_steps("update_interval", ui, T, interval=True)
        self._t_end_steps = T if self.t_end is None else resolve_steps("t_end", self.t_end, T)
        self._t_explore_end_steps = resolve_steps("t_explore_end", self.t_explore_end, T)
        if self.channel_interval is None:
            self._channel_interval_steps = self._update_steps
        else:
            self._channel_interval_steps = resolve_steps("channel_interval", self.channel_interval, T, interval=True)
        self._channel_end_steps = resolve_steps("channel_end", self.channel_end, T)

        if self.channel_sparsity > 0:
            if self.example_inputs is None and self.channel_groups is None:
                raise ValueError(
                    "channel_sparsity > 0 needs example_inputs (to trace channel groups) or channel_groups"
                )
            last = last_channel_event(self._channel_interval_steps, self._update_steps, self._channel_end_steps)
            stop = min(self._t_end_steps, T)
            dt = self._update_steps
            u = -(-last // dt) * dt  # first update step >= last event
            if u < 1:
                u = dt
            if u >= stop:
                raise ValueError(
                    f"channel schedule ends too late: the last channel event is at step {last} "
                    f"(channel_end={self._channel_end_steps}, channel_interval={self._channel_interval_steps}), "
                    f"but no parameter update (every update_interval={dt} steps) falls at or after it and "
                    f"before min(t_end, total_steps)={stop}, so the freed weights would never be re-grown; "
                    f"lower channel_end or raise t_end"
                )

    def final_soft_bound(self) -> tuple[int, float] | None:
        """``(step, δ)`` when the last mask update falls in phase A with a soft bound δ > 0
        left (global scope): SPEC lets updates stop (``t_end``) before phase A ends
        (``t_explore_end``), and the run then ends with B + round(δ·N) weights active,
        above the budget. None otherwise. ChaseOptimizer warns when round(δ·N) > 0."""
        T, dt = self.total_steps, self._update_steps
        last = (min(self._t_end_steps, T) - 1) // dt * dt  # the last update step, if >= 1
        tm = self._t_explore_end_steps
        if self.scope != "global" or last < 1 or last >= tm:
            return None
        delta = soft_bound(last, tm, self.soft_bound, self.soft_bound_end)
        return (last, delta) if delta > 0 else None

    # resolved schedule, in steps
    @property
    def update_steps(self) -> int:
        return self._update_steps

    @property
    def t_end_steps(self) -> int:
        return self._t_end_steps

    @property
    def t_explore_end_steps(self) -> int:
        return self._t_explore_end_steps

    @property
    def channel_interval_steps(self) -> int:
        return self._channel_interval_steps

    @property
    def channel_end_steps(self) -> int:
        return self._channel_end_steps

    @property
    def last_channel_event(self) -> int | None:
        if self.channel_sparsity <= 0:
            return None
        return last_channel_event(self._channel_interval_steps, self._update_steps, self._channel_end_steps)

    @property
    def slim_every(self) -> int:
        """0 = never slim at events, else slim at every k-th event."""
        s = self.slim_during_training
        if isinstance(s, bool):
            return 1 if s else 0
        return int(s)

    def replace(self, **changes: Any) -> "ChaseConfig":
        """A validated copy with some fields changed."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(kw)
        if unknown:
            raise TypeError(f"unknown ChaseConfig field(s): {', '.join(sorted(unknown))}")
        kw.update(changes)
        return ChaseConfig(**kw)

    def fingerprint(self) -> dict:
        """The fields that decide masks; stored in checkpoints and compared on load."""
        return {
            "density": self.density,
            "total_steps": self.total_steps,
            "channel_sparsity": self.channel_sparsity,
            "init": self.init,
            "scope": self.scope,
            "seed": self.seed,
        }
