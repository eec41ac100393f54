"""Data types for channel groups (shared by graph.py, tracing.py, slim.py, optimizer.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

# Layer kinds a group is made of: producers/consumers (conv with groups=1, or Linear;
# grouped convs too with ``grouped_channels``), depthwise followers (conv), and the
# channel-wise norms (SPEC §4).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@dataclass(frozen=True)
class Consumer:
    """A Conv or Linear that reads the group's channels on its input (dim 1).

    Channel ``c`` occupies input columns ``[c * repeat, (c + 1) * repeat)``; ``repeat`` is 1
    for a conv and H*W for a Linear after ``flatten`` of a C x H x W map.
    ``groups`` > 1: a grouped conv (``grouped_channels``): conv group ``j`` reads channels
    ``[j * C/groups, (j + 1) * C/groups)`` as the columns of its own rows, so channel ``c``
    is column ``c % (C/groups)`` of the rows of conv group ``c // (C/groups)``.
    """

    module: str
    repeat: int = 1
    groups: int = 1


@dataclass
class ChannelGroup:
    """Channels that live or die together.

    producers: Conv(groups=1)/Linear module names whose weight dim 0 are the channels
        (several for groups joined by residual adds, ``coupled_channels``, or by gates,
        ``gated_channels``); a channel's score is the sum over them.
    followers: channel-wise modules between producers and consumers whose per-channel
        tensors and width go with the channel (BatchNorm/InstanceNorm, also one without
        tensors, whose ``num_features`` follows; depthwise convs), in model order.
    consumers: modules whose input slice of each channel goes with it.
    channels: original channel count C_l.
    blocks: the channels form this many equal consecutive blocks that must stay equally
        wide (1, or the lcm of the ``groups`` of the grouped convs producing or reading
        them, ``grouped_channels``): a grouped conv needs every conv group as wide.
    offsets: readers (followers and consumers) that see the channels inside a
        concatenation (``concat_channels``), mapped to where the group's first channel
        sits on their channel dim (dim 0 of a follower's tensors, dim 1 of a consumer's
        weight, in columns: channel ``c`` of the group is column ``offset + c * repeat``).
        The other columns belong to other tensors of the concatenation (other groups, or
        fixed ones). A group's offsets are those of its widths as given: tracing gives
        them at full width; :func:`chase_ext.slim.slim_` takes them as they are now.
    """

    producers: list[str]
    consumers: list[Consumer]
    followers: list[str] = field(default_factory=list)
    channels: int = 0
    blocks: int = 1
    offsets: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "+".join(self.producers)


def at_widths(groups: Sequence[ChannelGroup], widths: Sequence[int]) -> list[ChannelGroup]:
    """``groups`` (offsets at full width) with the offsets of their concatenation readers
    where they are when group ``i`` has ``widths[i]`` channels: each span moves left by
    what the spans before it in the same reader lost."""
    if not any(g.offsets for g in groups):
        return list(groups)
    rep = {(i, c.module): c.repeat for i, g in enumerate(groups) for c in g.consumers}
    spans: dict[str, list[tuple[int, int]]] = {}  # reader -> [(offset at full width, group)]
    for i, g in enumerate(groups):
        for m, off in g.offsets.items():
            spans.setdefault(m, []).append((off, i))
    now: dict[tuple[int, str], int] = {}
    for m, ss in spans.items():
        lost = 0
        for off, i in sorted(ss):
            now[(i, m)] = off - lost
            lost += (groups[i].channels - widths[i]) * rep.get((i, m), 1)
    return [dataclasses.replace(g, offsets={m: now[(i, m)] for m in g.offsets}) if g.offsets else g
            for i, g in enumerate(groups)]
