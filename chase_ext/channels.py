"""Channel scores, the cubic channel schedule, floors and global selection (SPEC §4).

Pure functions on Python numbers plus :class:`ChannelState`, the bookkeeping of which
original channels of each group are alive and which are still physically present.

Choices where SPEC is vague:

* **Score arithmetic**: per-row Σ|w| comes from the ``channel_stats`` op in float32; the
  division by the original fan-in and the sum over a coupled group's producers are done
  in Python floats (float64). Native and reference sums may differ by float rounding,
  so an exact score tie broken differently is the only way their channel choices could
  differ.
* **Floors with round_to** (SPEC §4 "floors round up to a multiple"): floor_l is rounded
  up to a multiple of ``round_to`` and capped at C_l.
* **round_to selection**: first the plain greedy (lowest scores first, skipping layers at
  their floor) decides how many channels each layer would lose; then each layer's new live
  count is rounded *up* to the nearest allowed count (a multiple of ``round_to`` not above
  C_l, or C_l itself), so it removes fewer rather than more. The shortfall is not passed
  on to other layers (SPEC: "the target may be undershot"). A layer whose current live
  count is not allowed (cannot happen unless round_to changed) is treated the same way.
  The channels a layer removes are its lowest-ranked ones in the global order.
* **Blocks** (``grouped_channels``, not in SPEC): a group whose channels a grouped conv
  produces or reads (``ChannelGroup.blocks`` = B > 1) keeps its B blocks of consecutive
  original channels equally wide. Its live count must be a multiple of B, and with
  ``round_to`` each block's live count a multiple of it (what a conv group computes on is
  the block: oneDNN ran a grouped 3x3 conv 1.5x slower in absolute time at 12 channels per
  conv group than at 16, benchmarks/NOTES.md), so the step is B * round_to (floors and
  the rounding above use it), and the n channels it loses at an event are the n/B
  lowest-ranked of each block, not its n lowest overall.
* **Event bookkeeping**: an event whose target needs no removal still counts as an event
  (for ``slim_during_training=k``).
* **Depthwise followers and biases**: a removed channel's producer bias entries and the
  bias entries of depthwise followers are zeroed and kept zero (masked every step); norm
  parameters are left alone until slimming.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .schedules import cubic

__all__ = [
    "group_step",
    "channel_floor",
    "target_live",
    "select_channels",
    "group_scores",
    "ChannelState",
]


def group_step(round_to: int | None, blocks: int = 1) -> int | None:
    """The multiple a group's live count keeps (or its full width): ``round_to`` per block,
    so that each conv group of a grouped conv sees a multiple of it (``blocks * round_to``)."""
    s = (round_to or 1) * blocks
    return s if s > 1 else None


def channel_floor(channels: int, final_sparsity: float, beta: float, round_to: int | None = None) -> int:
    """floor_l = max(1, floor(C_l * (1 - S_c) * β)), left to right; rounded up to round_to."""
    f = max(1, math.floor(channels * (1 - final_sparsity) * beta))
    if round_to:
        f = -(-f // round_to) * round_to
    return min(f, channels)


def target_live(t: int, channel_end: int, final_sparsity: float, total_channels: int) -> int:
    """round((1 - s(t)) · C0) with the cubic s(t) (SPEC §4)."""
    return round((1.0 - cubic(t, channel_end, final_sparsity)) * total_channels)


def _allowed_up(n: int, full: int, round_to: int | None) -> int:
    """Smallest allowed live count >= n (multiple of round_to, or the full width)."""
    if not round_to:
        return n
    m = -(-n // round_to) * round_to
    return m if m < full else full


def select_channels(
    scores: Sequence[Sequence[tuple[float, int]]],
    live: Sequence[int],
    floors: Sequence[int],
    full: Sequence[int],
    remove: int,
    round_to: int | None = None,
    blocks: Sequence[int] | None = None,
) -> list[list[int]]:
    """Which channels each layer loses at an event.

    scores[l]: (score, channel index) of every live channel of layer l.
    Removes ``remove`` channels with the lowest scores globally, ties by (layer, index),
    never taking a layer below its floor. ``blocks[l]`` > 1: layer l's count is a
    multiple of it, taken evenly from its blocks (module doc). Returns the removed channel
    indices per layer, sorted.
    """
    blocks = list(blocks) if blocks is not None else [1] * len(scores)
    cand = sorted((s, l, c) for l, sc in enumerate(scores) for s, c in sc)
    cur = list(live)
    taken: list[list[int]] = [[] for _ in scores]
    left = max(int(remove), 0)
    if left:
        for s, l, c in cand:
            if cur[l] > floors[l]:
                taken[l].append(c)
                cur[l] -= 1
                left -= 1
                if left == 0:
                    break
    for l in range(len(scores)):
        step = group_step(round_to, blocks[l])
        if not taken[l] or not step:
            continue
        new_live = _allowed_up(live[l] - len(taken[l]), full[l], step)
        keep_n = max(live[l] - new_live, 0)
        if blocks[l] > 1:
            taken[l] = pick_in_blocks(scores[l], keep_n, full[l], blocks[l])
        else:
            taken[l] = taken[l][:keep_n]  # in rank order: the lowest-ranked go first
    return [sorted(x) for x in taken]


def pick_in_blocks(scores: Sequence[tuple[float, int]], n: int, full: int, blocks: int) -> list[int]:
    """The n/blocks lowest-ranked (score, index) channels of each of ``blocks`` equal
    blocks of original channels ``[0, full)``; n must be a multiple of ``blocks``."""
    if n % blocks:
        raise ValueError(f"cannot take {n} channels evenly from {blocks} blocks")
    width = full // blocks
    per: list[list[tuple[float, int]]] = [[] for _ in range(blocks)]
    for s, c in scores:
        per[c // width].append((s, c))
    out = []
    for b in per:
        if n // blocks > len(b):
            raise ValueError(f"cannot remove {n // blocks} channels from a block with {len(b)} alive")
        out += [c for _, c in sorted(b)[: n // blocks]]
    return out


def group_scores(kind: str, counts: Sequence[int], sums: Sequence[float], fan_in: int) -> list[float]:
    """One producer's per-channel score (SPEC §4)."""
    if kind == "umm":
        return [float(s) / fan_in for s in sums]
    if kind == "active_mean":
        return [float(s) / c if c > 0 else 0.0 for c, s in zip(counts, sums)]
    if kind == "active_fraction":
        return [float(c) / fan_in for c in counts]
    raise ValueError(f"channel_score must be 'umm', 'active_mean' or 'active_fraction', got {kind!r}")


class ChannelState:
    """Alive / physically present channels of every group, in original indices.

    ``alive[g]``: bool (CPU) over the C_g original channels; False = removed for good.
    ``present[g]``: int64 (CPU), sorted original indices still physically in the tensors
    (all of them until slimming). The physical row ``i`` of a producer is original
    channel ``present[g][i]``.
    """

    def __init__(self, channels: Sequence[int]):
        self.channels = [int(c) for c in channels]
        self.alive = [torch.ones(c, dtype=torch.bool) for c in self.channels]
        self.present = [torch.arange(c, dtype=torch.int64) for c in self.channels]
        self.events = 0
        self.done = False
        self.slim_records: list[list[list[int] | None]] = []

    @property
    def total(self) -> int:
        return sum(self.channels)

    def live_counts(self) -> list[int]:
        return [int(a.sum()) for a in self.alive]

    def physical_live(self, g: int) -> torch.Tensor:
        """bool over the present (physical) channels of group g: still alive?"""
        return self.alive[g][self.present[g]]

    def remove(self, g: int, original: Sequence[int]) -> None:
        if len(original):
            self.alive[g][torch.as_tensor(list(original), dtype=torch.int64)] = False

    def pending_keep(self) -> list[torch.Tensor | None]:
        """Physical indices to keep per group for a slim (None = nothing to drop)."""
        out: list[torch.Tensor | None] = []
        for g in range(len(self.channels)):
            pl = self.physical_live(g)
            out.append(None if bool(pl.all()) else torch.nonzero(pl).flatten().to(torch.int64))
        return out

    def commit_slim(self, keep: Sequence[torch.Tensor | None]) -> None:
        rec: list[list[int] | None] = []
        for g, k in enumerate(keep):
            if k is None:
                rec.append(None)
            else:
                self.present[g] = self.present[g][k]
                rec.append(k.tolist())
        self.slim_records.append(rec)

    def state_dict(self) -> dict:
        return {
            "channels": list(self.channels),
            "alive": [a.clone() for a in self.alive],
            "present": [p.clone() for p in self.present],
            "events": self.events,
            "done": self.done,
            "slim_records": [list(r) for r in self.slim_records],
        }

    def load_state_dict(self, sd: dict) -> None:
        self.channels = list(sd["channels"])
        # kept on the CPU whatever map_location the checkpoint was loaded with
        self.alive = [torch.as_tensor(a).detach().to("cpu", torch.bool).clone() for a in sd["alive"]]
        self.present = [torch.as_tensor(p).detach().to("cpu", torch.int64).clone() for p in sd["present"]]
        self.events = int(sd["events"])
        self.done = bool(sd["done"])
        self.slim_records = [list(r) for r in sd["slim_records"]]
