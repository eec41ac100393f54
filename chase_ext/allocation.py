"""Hardware-aware channel allocation (``channel_allocation="latency"``; not in SPEC).

The SPEC default removes, at each channel event, the channels with the lowest scores over
all groups. Where those sit decides little about speed: from a fresh init ResNet-50 loses
its 3x3 convs in layers 2-4, whose activations are small, and a GPU runs the result about
as fast as the dense model. This option splits the event's removal count between the
groups by *time* instead, and still picks the channels inside each group by score:

1. **The latency table** (:func:`measure_latency_table`, once per model and device, cached
   in a JSON file): for each channel group, the time of its layers as a function of the
   group's width, measured on the user's device at ``batch`` samples: every producer
   (output channels = width), every BatchNorm/depthwise follower and every consumer (input
   channels = width x repeat), each alone on an input shaped as in the model, at
   ``points`` widths from the group's floor to its full width (multiples of ``step``,
   the full width included), other groups at full width, channels_last (the layout of
   the deploy path, ``chase_ext.deploy``). CUDA: float16, cuDNN as configured; CPU:
   float32. Between two widths time is interpolated linearly.
2. **Allocation** (:func:`allocate`): starting from the live widths, repeatedly take the
   move that saves the most time per channel removed: one group down to its next lower
   table width (or its floor), never below the floor, never more than the channels still
   to remove (the last move is cut to what is left; with ``round_to`` a move that does
   not fit is not taken, so an event may remove fewer, as with the SPEC rounding). Ties go
   to the lower group index. Deterministic for a given table.
3. Within a group the channels with the lowest scores go (:func:`pick_in_groups`).

The table is not part of the optimizer's ``state_dict``: a run resumed inside its channel
phase should pass the same cache path (or table), so that later events split the same way.

The separable table (one group varied at a time) ignores that a conv's time depends on
both its input and output widths; it ranks where removal buys time, which is what the
allocation needs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .channels import pick_in_blocks
from .groups import ChannelGroup

__all__ = ["LatencyTable", "measure_latency_table", "resolve_latency_table", "allocate", "pick_in_groups"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class LatencyTable:
    """Per group (by name): candidate widths (ascending, the full width last) and the
    measured seconds of the group's layers at each. ``meta`` says where it was measured
    and the ``signature`` of the model and groups it belongs to."""

    widths: dict[str, list[int]]
    seconds: dict[str, list[float]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.widths) != set(self.seconds):
            raise ValueError("LatencyTable: widths and seconds must name the same groups")
        for g, w in self.widths.items():
            s = self.seconds[g]
            if not w or len(w) != len(s) or any(b <= a for a, b in zip(w, w[1:])) or w[0] < 1:
                raise ValueError(f"LatencyTable: group {g!r} needs ascending widths >= 1 with one time each")
            if not all(math.isfinite(x) and x >= 0 for x in s):
                raise ValueError(f"LatencyTable: group {g!r} has a negative or non-finite time")

    def time(self, group: str, width: float) -> float:
        """Seconds at ``width`` (linear between table widths, clamped at both ends)."""
        w, s = self.widths[group], self.seconds[group]
        if width <= w[0]:
            return s[0]
        for i in range(1, len(w)):
            if width <= w[i]:
                f = (width - w[i - 1]) / (w[i] - w[i - 1])
                return s[i - 1] + f * (s[i] - s[i - 1])
        return s[-1]

    def to_dict(self) -> dict:
        return {"widths": self.widths, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        try:
            return cls({k: [int(x) for x in v] for k, v in d["widths"].items()},
                       {k: [float(x) for x in v] for k, v in d["seconds"].items()}, dict(d.get("meta", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"LatencyTable: not a table ({e})") from e


# --------------------------------------------------------------------------- measuring
def _resized(m: nn.Module, cin: int | None = None, cout: int | None = None) -> nn.Module:
    """A fresh layer like ``m`` with other input/output channel counts (depthwise: both)."""
    if isinstance(m, nn.Linear):
        return nn.Linear(cin or m.in_features, cout or m.out_features, bias=m.bias is not None)
    if isinstance(m, _CONVS):
        dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        ci, co = cin or m.in_channels, cout or m.out_channels
        if dw:
            ci = co = cout or cin or m.out_channels
        return type(m)(ci, co, m.kernel_size, m.stride, m.padding, m.dilation, ci if dw else m.groups,
                       m.bias is not None, m.padding_mode)
    if isinstance(m, _BNS):
        return nn.BatchNorm2d(cout) if m.__class__ in (nn.BatchNorm2d, nn.SyncBatchNorm) else type(m)(cout)
    raise TypeError(f"no latency model for {type(m).__name__}")


def _input_shapes(model: nn.Module, names: set[str], example_inputs: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    mods = dict(model.named_modules())

    def hook(n):
        def fn(m, i, o):  # returns None: the output stays as it is
            shapes.setdefault(n, tuple(i[0].shape))
        return fn

    hooks = [mods[n].register_forward_hook(hook(n)) for n in names if n in mods]
    flags = {m: m.training for m in model.modules()}
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
        for m, f in flags.items():
            m.train(f)
    return shapes


def default_timer(layer: nn.Module, x: torch.Tensor) -> float:
    """Median seconds of ``layer(x)``: 3 calls on CUDA (steady), 5 on the CPU, after two
    warm-up calls (cuDNN autotuning when benchmark mode is on)."""
    cuda = x.is_cuda
    reps = 3 if cuda else 5
    ts = []
    with torch.inference_mode():
        for i in range(reps + 2):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            layer(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _grid(full: int, floor: int, points: int, step: int) -> list[int]:
    lo = max(1, floor)
    ws = {full, lo}
    for i in range(1, points - 1):
        w = lo + (full - lo) * i / (points - 1)
        w = max(lo, int(round(w / step)) * step) if step > 1 else int(round(w))
        if lo <= w <= full:
            ws.add(w)
    return sorted(ws)


def _weight_shape(m: nn.Module | None) -> tuple:
    w = getattr(m, "weight", None)  # None too for a norm without affine parameters
    return tuple(w.shape) if isinstance(w, torch.Tensor) else (0,)


def signature(model: nn.Module, groups: Sequence[ChannelGroup]) -> str:
    """What a cached table must match: every group's layers and the shapes of their weights."""
    mods = dict(model.named_modules())
    parts = []
    for g in groups:
        names = [*g.producers, *g.followers, *(c.module for c in g.consumers)]
        parts.append((g.name, g.channels, [(n, _weight_shape(mods.get(n))) for n in names]))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _seen(mods, g: ChannelGroup, name: str, w: int, repeat: int = 1) -> int:
    """The input width of reader ``name`` when the group keeps ``w`` channels: inside a
    concatenation (``ChannelGroup.offsets``) the other tensors' columns stay."""
    if name not in g.offsets:
        return w * repeat
    m = mods[name]
    full = m.in_features if isinstance(m, nn.Linear) else getattr(m, "num_features", None) or m.in_channels
    return full - (g.channels - w) * repeat


def measure_latency_table(model: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any,
                          floors: Sequence[int], *, batch: int = 64, points: int = 6, step: int = 8,
                          timer: Callable[[nn.Module, torch.Tensor], float] | None = None) -> LatencyTable:
    """Time every group's layers at ``points`` widths (module docstring). ``timer(layer,
    x)`` returns seconds (default: :func:`default_timer`); tests pass a deterministic one."""
    if batch < 1 or points < 2 or step < 1:
        raise ValueError(f"measure_latency_table: batch >= 1, points >= 2, step >= 1 needed, "
                         f"got {batch}, {points}, {step}")
    timer = timer or default_timer
    p0 = next(model.parameters())
    device = p0.device
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    mods = dict(model.named_modules())
    names = {n for g in groups for n in (*g.producers, *g.followers, *(c.module for c in g.consumers))}
    shapes = _input_shapes(model, names, example_inputs)
    widths, seconds = {}, {}
    for g, fl in zip(groups, floors):
        ws = _grid(g.channels, fl, points, math.lcm(step, g.blocks))  # a grouped conv's widths: whole blocks
        times = []
        for w in ws:
            total = 0.0
            layers = [(n, None, w) for n in g.producers] + [(n, _seen(mods, g, n, w), _seen(mods, g, n, w))
                                                            for n in g.followers
                                                            if isinstance(mods[n], (*_BNS, *_CONVS))]
            layers += [(c.module, _seen(mods, g, c.module, w, c.repeat), None) for c in g.consumers]
            for n, cin, cout in layers:
                if n not in shapes:
                    continue  # not reached by example_inputs: it costs nothing measurable here
                layer = _resized(mods[n], cin, cout).to(device=device, dtype=dtype).eval()
                shp = list(shapes[n])
                shp[0] = batch
                if cin is not None:
                    shp[1 if not isinstance(mods[n], nn.Linear) else -1] = cin
                x = torch.randn(shp, device=device, dtype=dtype)
                if x.dim() == 4:  # the deploy path's layout on either device
                    layer = layer.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                total += float(timer(layer, x))
            times.append(total)
        widths[g.name], seconds[g.name] = ws, times
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype), "batch": batch,
            "memory_format": "channels_last",
            "points": points, "step": step, "torch": torch.__version__, "signature": signature(model, groups),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return LatencyTable(widths, seconds, meta)


def resolve_latency_table(spec: Any, model: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any,
                          floors: Sequence[int], *, batch: int, step: int) -> LatencyTable:
    """``spec``: a :class:`LatencyTable` (used as given), a path to a JSON cache (loaded when
    it matches this model, device, dtype and batch and reaches down to every group's floor,
    else measured and written), or None (measured, not cached)."""
    if isinstance(spec, LatencyTable):
        table = spec
    else:
        table = None
        if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec):
            with open(spec) as f:
                cached = LatencyTable.from_dict(json.load(f))
            dev = next(model.parameters()).device
            want = {"signature": signature(model, groups), "batch": batch, "step": step,
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "memory_format": "channels_last"}
            # a table measured for higher floors has no times below them: measure again
            covers = all(g.name in cached.widths and cached.widths[g.name][0] <= max(1, fl)
                         for g, fl in zip(groups, floors))
            if covers and all(cached.meta.get(k) == v for k, v in want.items()):
                table = cached
        if table is None:
            table = measure_latency_table(model, groups, example_inputs, floors, batch=batch, step=step)
            if isinstance(spec, (str, os.PathLike)):
                os.makedirs(os.path.dirname(os.path.abspath(spec)), exist_ok=True)
                with open(spec, "w") as f:
                    json.dump(table.to_dict(), f, indent=1)
    missing = [g.name for g in groups if g.name not in table.widths]
    if missing:
        raise ValueError(f"latency table has no entry for channel group(s) {missing}")
    return table


# --------------------------------------------------------------------------- deciding
def _next_width(cur: int, lo: int, grid: Sequence[int], round_to: int | None) -> int | None:
    """The width a group moves to from ``cur``: the next lower table width (or the floor),
    with ``round_to`` rounded up to a multiple (the next multiple below ``cur`` when that
    reaches ``cur``); None when the group cannot shrink."""
    below = [w for w in grid if lo <= w < cur]
    t = max(below) if below else lo
    if round_to:
        t = -(-t // round_to) * round_to
        if t >= cur:
            t = (cur - 1) // round_to * round_to
    return t if lo <= t < cur else None


def allocate(names: Sequence[str], live: Sequence[int], floors: Sequence[int], remove: int, table: LatencyTable,
             round_to: int | None | Sequence[int | None] = None) -> list[int]:
    """How many channels each group gives up at an event (module docstring, step 2).
    ``round_to`` may be given per group (``chase_ext.channels.group_step``: a grouped
    conv's blocks join it)."""
    steps = list(round_to) if isinstance(round_to, (list, tuple)) else [round_to] * len(live)
    cur = list(live)
    left = max(int(remove), 0)
    out = [0] * len(cur)
    while left > 0:
        best = None
        for g, name in enumerate(names):
            target = _next_width(cur[g], floors[g], table.widths[name], steps[g])
            if target is None:
                continue
            n = cur[g] - target
            if n > left:
                if steps[g]:
                    continue  # a cut move would leave a width off the multiple
                n, target = left, cur[g] - left
            gain = (table.time(name, cur[g]) - table.time(name, target)) / n
            if best is None or gain > best[0]:
                best = (gain, g, n)
        if best is None:
            break
        _, g, n = best
        cur[g] -= n
        out[g] += n
        left -= n
    return out


def pick_in_groups(scores: Sequence[Sequence[tuple[float, int]]], counts: Sequence[int],
                   blocks: Sequence[int] | None = None, full: Sequence[int] | None = None) -> list[list[int]]:
    """The ``counts[g]`` lowest-scoring channels of each group (ties: lower index), sorted;
    a group with ``blocks[g]`` > 1 (of ``full[g]`` original channels) loses the same number
    from each block (``chase_ext.channels.pick_in_blocks``)."""
    out = []
    for g, (sc, n) in enumerate(zip(scores, counts)):
        if n > len(sc):
            raise ValueError(f"cannot remove {n} channels from a group with {len(sc)} alive")
        if blocks is not None and blocks[g] > 1:
            out.append(sorted(pick_in_blocks(sc, n, full[g], blocks[g])))
        else:
            out.append(sorted(c for _, c in sorted(sc)[:n]))
    return out
