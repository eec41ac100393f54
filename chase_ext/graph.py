"""Channel groups of a model: found by tracing (SPEC §4) or given explicitly.

``find_channel_groups(model, example_inputs)`` traces the model with ``torch.fx``
(``symbolic_trace``) and runs shape propagation on ``example_inputs``. Then, for every
producer (``nn.Conv1d/2d/3d`` with ``groups == 1``, or ``nn.Linear``), it follows the
producer's output forward through channel-wise ops until it meets consumers:

* **channel-wise ops** (pass the channel through): BatchNorm1d/2d/3d, SyncBatchNorm,
  InstanceNorm1d/2d/3d (followers: their per-channel tensors go with the channel, and
  their ``num_features``; a norm without tensors is a follower when it is called once
  and its ``num_features`` is the channel count);
  depthwise convs (``groups == in_channels == out_channels``; followers too);
  activations (modules, ``torch.*``/``F.*`` functions and tensor methods), dropout,
  max/avg/adaptive/LP pooling and ``interpolate``/``Upsample`` (channel at dim 1 of a
  map with spatial dims), ``nn.Identity``, ``flatten`` (start at the channel dim; after
  ``flatten(x, 1)`` of a C x H x W map each channel spans H*W columns),
  ``x.view(x.size(0), -1)`` / ``reshape(N, -1)`` (same as ``flatten(x, 1)``), spatial
  ``mean`` over dims that are neither the batch nor the channel dim, elementwise
  arithmetic with a Python number (``x * 0.5``; ``x / 2`` but not ``2 / x``: a removed channel
  is a constant, 0 or its norm's shift, and must not be a divisor), ``x.size(0)``/``x.shape[0]``, and
  ``contiguous``/``clone``.
* **consumers** (end of the path): ``nn.Conv*`` with ``groups == 1`` reading the channel
  at dim 1, ``nn.Linear`` reading it on its last dim (``Consumer.repeat`` = columns per
  channel). Several consumers are fine.
* anything else **blocks** the producer: the model output, ``cat`` unless ``concat=True``,
  LayerNorm/GroupNorm,
  a grouped (non-depthwise) conv unless ``grouped=True``, other reshapes, an attribute use (``x.size(1)``,
  ``x.shape``...), softmax, an unknown module or function, and an elementwise op between
  two tensors unless every tensor operand is in the *same* producer's channel space
  (``x * torch.sigmoid(x)`` is fine; a residual ``a + b`` of two producers is not). An
  operand may broadcast over the dims other than the channel dim (an ``(N, C, 1, 1)``
  tensor times an ``(N, C, H, W)`` map scales each channel by its own value, so
  ``x * torch.sigmoid(x.mean((2, 3), keepdim=True))`` is channel-wise), not over the
  channel dim (an ``(N, 1, H, W)`` spatial attention map blocks).

``coupled=True`` (SPEC "coupled_channels"): producers whose channel spaces meet in an
elementwise ``add``/``sub`` (residual adds) become *one* group (several producers, the
union of their followers and consumers). Such a group is still blocked when any member is
blocked, or when an operand of one of its adds comes from outside the group (e.g. the
model input).

``grouped=True`` ("grouped_channels", not in SPEC, opt-in): grouped convs that are not
depthwise (ResNeXt, RegNet) are producers and consumers too. A conv with ``g`` groups
needs every conv group equally wide, so its channels form ``g`` equal blocks
(``ChannelGroup.blocks``, the lcm over the group's grouped convs) and every event removes
the same number from each block (:mod:`chase_ext.channels`). A group whose grouped conv
has one channel per conv group is left out.

``concat=True`` ("concat_channels", not in SPEC, opt-in): ``torch.cat`` /
``torch.concat`` / ``torch.concatenate`` along the channel dim passes the channels on,
shifted by the widths of the tensors before them (DenseNet, Inception, GoogLeNet,
SqueezeNet, U-Net skips). The layers reached through it read the group inside a
concatenation: ``ChannelGroup.offsets`` maps each to where the group's first channel
sits on its channel dim (in columns, ``repeat`` per channel after a flatten); the rest of
that dim belongs to other tensors (other groups, or fixed ones). A tensor concatenated
twice into one cat, a cat along another dim, a grouped conv reading a concatenation and
``torch.stack`` still block.

``gated=True`` ("gated_channels", not in SPEC, opt-in like ``coupled``): the same for
producers whose channel spaces meet in an elementwise ``mul``: squeeze-and-excitation
(``x * sigmoid(fc2(relu(fc1(pool(x)))))``: the layer making ``x`` and ``fc2`` lose the same
channels, and ``fc1`` their input slice) and GLU-style gates (``silu(w1(x)) * w3(x)``).
The channel's score is the sum of the producers' scores, as for coupled groups.

Rules that keep groups correct rather than maximal (documented choices):

* A module **with parameters or buffers** called more than once (a shared conv/BN), or a
  parameter shared by several modules, cannot be a producer, follower or consumer: any
  path reaching it blocks. Parameter-free modules (torchvision's one ``relu`` per block)
  may be called any number of times. The same holds for a conv, linear or norm whose
  weight, bias or statistics are computed rather than registered tensors
  (``torch.nn.utils.parametrize`` parametrizations such as ``weight_norm``,
  ``spectral_norm`` or ``orthogonal``; the hook-based ``torch.nn.utils.weight_norm``):
  slimming cannot narrow them. Such layers, and conv/linear weights used functionally
  (``F.conv2d(x, self.weight)``, seen as ``get_attr``), are named in one warning.
* ``exclude``: weights (names or ``fnmatch`` globs, e.g. ``"fc.weight"``) kept dense. A
  producer or consumer whose weight is excluded blocks its group (followers don't).
* ``exclude_channels``: globs matched against a producer's module name or weight name;
  a matching producer (and, with ``coupled=True``, its whole coupled group) is skipped.
  A pattern that matches no producer layer of the model (a typo) gets a ``UserWarning``
  naming it.
* Ops named ``...1d/2d/3d`` (pooling, InstanceNorm, Dropout2d...) must see a batched
  input of their rank: on an unbatched input PyTorch moves the channel dim.
* If tracing fails the function warns and returns no groups (use ``explicit_groups``).
  If ``example_inputs`` (a tensor, or a tuple/list of positional inputs, on the model's
  device) do not run through the traced model, ``ValueError`` is raised; its message
  starts with the model's own error (e.g. a conv's channel mismatch) and names the layer.
* The model is traced in train mode, whatever its mode: groups serve training, so a
  branch under ``if self.training`` (an auxiliary head) counts. Shape propagation runs
  the layers in eval mode under ``torch.no_grad`` (a batch of one passes a BatchNorm).
  Every module's training flag and every buffer (BatchNorm statistics included) are
  put back exactly as they were, even on error.
* Groups are ordered by their first producer's position in ``model.named_parameters()``;
  followers and consumers are in graph (execution) order.

``explicit_groups(model, spec)`` validates a user-given list of groups (for models that
do not trace).

The walk itself (op tables, one producer's closure, shape propagation) is in
:mod:`chase_ext.tracing`; this module builds the groups from the closures (coupling,
joins, size checks, order) and holds the explicit groups.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

from torch import fx, nn

from .groups import CONV_TYPES as _CONV, NORM_TYPES as _NORM, ChannelGroup, Consumer
from .tracing import (_Closure, _closure, _computed_tensor, _has_state, _is_depthwise, _is_grouped,
                      _is_producer_module, _match, _nodes_in, _norm_patterns, _shape_prop, _Trace, _train_mode)

__all__ = ["find_channel_groups", "channel_coverage", "explicit_groups", "check_against_trace", "group_to_dict", "group_from_dict"]


# --------------------------------------------------------------------------- found by tracing
class _DSU:
    def __init__(self, items):
        self.p = {i: i for i in items}

    def find(self, x):
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.p[b] = a


def find_channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Sequence[str] | str = (),
    exclude_channels: Sequence[str] | str = (),
    coupled: bool = False,
    gated: bool = False,
    grouped: bool = False,
    concat: bool = False,
) -> list[ChannelGroup]:
    """Prunable channel groups of ``model`` by the SPEC §4 rule (see the module doc).

    ``example_inputs``: a tensor or a tuple/list of positional inputs the model accepts
    (a batch of one or two is enough). Returns ``[]`` with a warning when the model does
    not trace. Warns when the groups reach less than a third of the candidate layers'
    weights (``channel_coverage`` tells the share and why each layer is left out).
    """
    groups, cov = _find(model, example_inputs, exclude, exclude_channels, coupled, gated, grouped, concat)
    if cov is not None and cov["left_out"] and 3 * cov["weight_share"] < 1:
        _warn_low_coverage(model, cov)
    return groups


def channel_coverage(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Sequence[str] | str = (),
    exclude_channels: Sequence[str] | str = (),
    coupled: bool = False,
    gated: bool = False,
    grouped: bool = False,
    concat: bool = False,
) -> dict[str, Any] | None:
    """What channel pruning reaches in ``model`` (arguments as ``find_channel_groups``):
    ``groups``, ``reached_layers`` of ``candidate_layers`` (producers not excluded by the
    user whose channels are not the model's outputs; with ``grouped=True`` the grouped convs
    are producers too), ``weight_share`` (their weights in
    groups, 0..1), and ``left_out``: for each candidate left out, ``why`` (what its
    channels run into) and its ``weights``. None when the model does not trace."""
    return _find(model, example_inputs, exclude, exclude_channels, coupled, gated, grouped, concat)[1]


def _find(model, example_inputs, exclude, exclude_channels, coupled, gated, grouped, concat=False):
    """(groups, coverage record, or None when the model does not trace)."""
    excl = _norm_patterns(exclude)
    excl_ch = _norm_patterns(exclude_channels)
    _warn_unmatched_channels(model, excl_ch, grouped)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with _train_mode(model):
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure
            warnings.warn(
                f"chase_ext: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
                "no channel groups found, channel pruning is off. Pass explicit channel groups "
                "(chase_ext.graph.explicit_groups / channel_groups=...) to enable it.",
                stacklevel=3,
            )
            return [], None
        _shape_prop(model, gm, args)
    tr = _Trace(model, gm, grouped, concat)

    closures: list[_Closure] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        m = tr.modules.get(name)
        if m is None or not _is_producer_module(m, grouped) or name in tr.bad:
            continue
        cl = _closure(tr, name, node, excl)
        if _match(f"{name}.weight", excl):
            cl.block("producer weight is excluded", by_user=True)
        closures.append(cl)

    # joins: every tensor operand must be in the component's channel space
    dsu = _DSU([c.producer for c in closures])
    by_join: dict[fx.Node, list[_Closure]] = {}
    for c in closures:
        for j in c.joins:
            by_join.setdefault(j, []).append(c)

    def couples(j: fx.Node, c: _Closure) -> bool:  # the join may make one group of several producers
        return (coupled and j in c.add_joins) or (gated and j in c.mul_joins)

    for j, cs in by_join.items():
        if couples(j, cs[0]):
            # couple only the spaces the join meets at the same place: the add of two
            # concatenations couples each span with the one at its offset in the other
            first: dict = {}
            for c in cs:
                k = c.state.get(j)
                if k in first:
                    dsu.union(first[k], c.producer)
                else:
                    first[k] = c.producer
    comps: dict[str, list[_Closure]] = {}
    for c in closures:
        comps.setdefault(dsu.find(c.producer), []).append(c)

    groups: list[tuple[int, ChannelGroup]] = []
    left_out: dict[str, str] = {}  # producer -> why its component is not a group (the user's exclusions apart)

    def leave_out(members: list[_Closure], why: str) -> None:
        if any(_reaches_output(tr, c.node) for c in members):
            return  # its channels are the model's outputs (the classes): no candidate
        for c in members:
            left_out[c.producer] = why

    for members in comps.values():
        if any(_match(c.producer, excl_ch) or _match(f"{c.producer}.weight", excl_ch) for c in members):
            continue
        blocked = [c for c in members if c.blocked]
        if blocked:
            if not any(c.blocked_by_user for c in blocked):  # the user's choice is no finding
                leave_out(members, blocked[0].blocked)
            continue
        state: dict[fx.Node, tuple] = {}
        for c in members:
            state.update(c.state)
        ok = True
        for c in members:
            for j in c.joins:
                ops = _nodes_in((j.args, j.kwargs))
                if any(o not in state for o in ops) or len({state[o] for o in ops}) != 1:
                    ok = False
                    why = (_RESIDUAL if j in c.add_joins and not coupled
                           else _GATED if j in c.mul_joins and not gated and len(by_join[j]) > 1
                           else f"an op ({j.op} {getattr(j.target, '__name__', j.target)}) joins its channels with "
                                "another tensor's")
                    break
                # a join of two different producers is only allowed when it couples them
                owners = {c2.producer for c2 in members for o in ops if o in c2.state}
                if len(owners) > 1 and not couples(j, c):
                    ok = False
                    why = (_RESIDUAL if j in c.add_joins else _GATED if j in c.mul_joins
                           else "joined with another layer's output")
                    break
            if not ok:
                break
        if not ok:
            leave_out(members, why)
            continue
        chans = {tr.modules[c.producer].weight.shape[0] for c in members}
        if len(chans) != 1:
            leave_out(members, "coupled with layers of other widths")
            continue
        cons: dict[str, tuple[fx.Node, int]] = {}
        fol: dict[str, fx.Node] = {}
        offs: dict[str, int] = {}
        clash = None
        for c in members:
            cons.update(c.consumers)
            fol.update(c.followers)
            for n, o in c.offsets.items():
                if offs.setdefault(n, o) != o:
                    clash = n
        if clash is not None:
            leave_out(members, f"its channels sit at two places of what {clash} reads")
            continue
        if not cons:
            leave_out(members, "no layer reads its channels")
            continue
        (C,) = chans
        # shapes double check: every follower/consumer sees C channels
        if not _check_sizes(tr, C, fol, cons, offs):
            leave_out(members, "a layer it feeds sees another number of channels")
            continue
        names = [*(c.producer for c in members), *cons]
        blocks = _blocks(tr.modules, names)
        if blocks > 1 and blocks >= C:
            many = sum(_is_grouped(tr.modules[n]) for n in names) > 1
            leave_out(members, f"each conv group of the grouped conv{'s' * many} it meets has one channel: none can go")
            continue
        prods = sorted((c.producer for c in members), key=lambda p: tr.param_pos.get(f"{p}.weight", 1 << 60))
        g = ChannelGroup(
            producers=prods,
            consumers=[Consumer(n, r, tr.modules[n].groups if _is_grouped(tr.modules[n]) else 1)
                       for n, (nd, r) in sorted(cons.items(), key=lambda kv: tr.order[kv[1][0]])],
            followers=[n for n, nd in sorted(fol.items(), key=lambda kv: tr.order[kv[1]])],
            channels=int(C),
            blocks=blocks,
            offsets={n: int(offs[n]) for n in (*fol, *cons) if n in offs},
        )
        groups.append((tr.param_pos.get(f"{prods[0]}.weight", 1 << 60), g))

    unhandled = sorted(
        {n for n in tr.bad if "outside its call" not in tr.bad[n]} | {t.rpartition(".")[0] for t in tr.functional}
    )
    if unhandled:
        details = ", ".join(
            f"{n} ({tr.bad.get(n, 'weight used functionally')})" for n in unhandled
        )
        warnings.warn(
            f"chase_ext: these layers cannot be handled by channel pruning and block any "
            f"channel group they touch: {details}",
            stacklevel=3,
        )
    groups.sort(key=lambda t: t[0])
    found = [g for _, g in groups]
    size = {p: tr.modules[p].weight.numel() for g in found for p in g.producers}
    out = {p: {"why": why, "weights": tr.modules[p].weight.numel()} for p, why in left_out.items()}
    total = sum(size.values()) + sum(o["weights"] for o in out.values())
    cov = {"groups": len(found), "reached_layers": len(size), "candidate_layers": len(size) + len(out),
           "weight_share": sum(size.values()) / total if total else 1.0, "left_out": out}
    return found, cov


_RESIDUAL = "added to another layer's output (residual-coupled; coupled_channels=True prunes such layers together)"
_GATED = ("multiplied with another layer's output (a gate, e.g. squeeze-and-excitation; gated_channels=True prunes "
          "such layers together)")


def _reaches_output(tr: _Trace, node: fx.Node) -> bool:
    """The producer's output reaches the model's output through no other conv or linear
    (a classifier, also behind a softmax or a reshape): its channels are the model's."""
    seen: set[fx.Node] = set()
    todo = list(node.users)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        m = tr.module(n)
        if m is not None and (_is_producer_module(m) or (isinstance(m, _CONV) and not _is_depthwise(m))):
            continue  # another channel space from here on
        todo.extend(n.users)
    return False


def _warn_low_coverage(model: nn.Module, cov: dict[str, Any]) -> None:
    """The warning of ``find_channel_groups`` when its groups reach less than a third of the
    candidate layers' weights: channel pruning would then do little, and the user should
    know why (grouped convs, concatenations, ops the tracer does not follow), the layers
    left out grouped by what their channels run into, largest first. Residual-coupled block
    outputs alone (ResNets under SPEC) stay above the third."""
    out = cov["left_out"]
    names = set(dict(model.named_modules()))

    def kind(why: str) -> str:  # the reason without the layer it names, to count alike ones together
        return " ".join("<layer>" if w.strip("(),:'") in names else w for w in why.split())

    by_kind: dict[str, list[str]] = {}
    for p in sorted(out, key=lambda p: -out[p]["weights"]):
        by_kind.setdefault(kind(out[p]["why"]), []).append(p)
    top = sorted(by_kind.values(), key=lambda ps: -sum(out[p]["weights"] for p in ps))

    def line(ps: list[str]) -> str:
        why = out[ps[0]]["why"]
        e_g = "e.g. " if len(ps) > 1 and kind(why) != why else ""
        return f"{len(ps)} layer{'s' * (len(ps) > 1)} ({', '.join(ps[:3])}{', ...' * (len(ps) > 3)}): {e_g}{why}"

    more = f"; {len(top) - 4} more reasons" if len(top) > 4 else ""
    warnings.warn(
        f"chase_ext: channel pruning reaches {cov['reached_layers']} of {cov['candidate_layers']} candidate layers "
        f"of {type(model).__name__}, {100 * cov['weight_share']:.0f}% of their weights; the others keep every "
        f"channel. Left out, with what their channels run into, largest first: "
        f"{'; '.join(line(ps) for ps in top[:4])}{more}",
        UserWarning,
        stacklevel=3,
    )


def _warn_unmatched_channels(model: nn.Module, patterns: Sequence[str], grouped: bool) -> None:
    """One warning per ``exclude_channels`` pattern that names no producer layer."""
    if not patterns:
        return
    names = [n for n, m in model.named_modules(remove_duplicate=False) if _is_producer_module(m, grouped)]
    for p in patterns:
        if not any(_match(n, (p,)) or _match(f"{n}.weight", (p,)) for n in names):
            warnings.warn(
                f"chase_ext: exclude_channels pattern {p!r} matches no producer layer "
                "(Conv with groups=1 or Linear, by module name or '<name>.weight'); it excludes nothing",
                UserWarning,
                stacklevel=4,
            )


def _blocks(mods: dict[str, nn.Module], names) -> int:
    """``ChannelGroup.blocks`` of a group with these producers and consumers: the lcm of
    their grouped convs' groups (1 without any), so that every conv group keeps the same width."""
    return math.lcm(1, *(mods[n].groups for n in names if _is_grouped(mods[n])))


def _check_sizes(tr: _Trace, C: int, fol, cons, offs) -> bool:
    """Every follower / consumer sees C channels (repeat columns each), or, inside a
    concatenation, C channels from its offset on."""
    def fits(n, width, r):
        return width == C * r if n not in offs else offs[n] + C * r <= width

    for n in fol:
        m = tr.modules[n]
        if isinstance(m, _NORM) and not fits(n, m.num_features, 1):
            return False
        if _is_depthwise(m) and not fits(n, m.in_channels, 1):
            return False
    for n, (_, r) in cons.items():
        m = tr.modules[n]
        if isinstance(m, nn.Linear) and not fits(n, m.in_features, r):
            return False
        if isinstance(m, _CONV) and (not fits(n, m.in_channels, 1) or r != 1):
            return False
    return True


# --------------------------------------------------------------------------- explicit
def check_against_trace(model: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any) -> None:
    """Explicit groups against the traced graph, where ``model`` traces with
    ``example_inputs``: every norm with tensors or depthwise conv that tracing finds in a
    producer's channel space must be among its group's followers, and every conv / linear reading that
    space among its consumers, also past concatenations, where ``offsets`` must say where
    (tracing's offsets); slimming would leave it at the old width or cut the wrong columns
    (the next forward fails, after the model changed). ``ValueError`` naming the layers otherwise. A model
    that does not trace is not checked (explicit groups are its way in)."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with _train_mode(model):
        try:
            gm = fx.symbolic_trace(model)
            _shape_prop(model, gm, args)
        except Exception:  # noqa: BLE001 - not traceable here: nothing to check against
            return
    # a grouped conv reading the channels, and a layer reading them inside a concatenation, must be listed too
    tr = _Trace(model, gm, grouped=True, concat=True)
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    for i, g in enumerate(groups):
        for p in g.producers:
            if p not in nodes or p in tr.bad:
                continue
            cl = _closure(tr, p, nodes[p], ())
            # a norm without tensors only warns at a width mismatch: groups may leave it out
            missing = [f"follower {f!r}" for f in cl.followers if f not in g.followers and _has_state(tr.modules[f])]
            missing += [f"consumer {c!r}" for c in cl.consumers if c not in {x.module for x in g.consumers}]
            if missing:
                it = "it" if len(missing) == 1 else "them"
                raise ValueError(
                    f"channel_groups[{i}] ({g.name}): the traced model shows {', '.join(missing)} reading the "
                    f"channels of producer {p!r}; list {it} in the group, or slimming would leave {it} at the "
                    "old width")
            listed = [*g.followers, *(x.module for x in g.consumers)]
            wrong = [f"{n!r} at {cl.offsets.get(n, 'no offset (not in a concatenation)')}, given "
                     f"{g.offsets.get(n, 'none')}" for n in listed
                     if (n in cl.followers or n in cl.consumers) and g.offsets.get(n) != cl.offsets.get(n)]
            if wrong:
                raise ValueError(f"channel_groups[{i}] ({g.name}): the traced model reads the channels of producer "
                                 f"{p!r} at other offsets: {', '.join(wrong)}")


def group_to_dict(g: ChannelGroup) -> dict:
    """A plain (picklable, JSON-able) description of a group."""
    return {
        "producers": list(g.producers),
        "consumers": [[c.module, int(c.repeat)] + ([int(c.groups)] if c.groups > 1 else []) for c in g.consumers],
        "followers": list(g.followers),
        "channels": int(g.channels),
        **({"blocks": int(g.blocks)} if g.blocks > 1 else {}),
        **({"offsets": {str(k): int(v) for k, v in g.offsets.items()}} if g.offsets else {}),
    }


def group_from_dict(d: dict) -> ChannelGroup:
    """Inverse of :func:`group_to_dict` (no validation against a model)."""
    cons = [Consumer(c) if isinstance(c, str) else Consumer(str(c[0]), *(int(x) for x in c[1:3]))
            for c in d.get("consumers", [])]
    return ChannelGroup(
        producers=list(d["producers"]),
        consumers=cons,
        followers=list(d.get("followers", [])),
        channels=int(d.get("channels", 0)),
        blocks=int(d.get("blocks", 1)),
        offsets={str(k): int(v) for k, v in (d.get("offsets") or {}).items()},
    )


def explicit_groups(model: nn.Module, spec: Sequence[dict | ChannelGroup]) -> list[ChannelGroup]:
    """Validate a user-given list of groups into ``ChannelGroup`` objects.

    Each entry is a ``ChannelGroup`` or a dict with keys ``"producers"`` (module names of
    Conv/Linear layers with equal output width; grouped convs keep every conv group
    equally wide, see ``ChannelGroup.blocks``), ``"consumers"`` (module names,
    or ``(name, repeat)`` for a Linear reading each channel as ``repeat`` consecutive
    input features), optional ``"followers"`` (BatchNorm/InstanceNorm or depthwise convs
    of that width) and optional ``"channels"`` (checked). Widths are checked against the
    model's current shapes. A module's output channels (as producer or follower) belong
    to at most one group, and so do its input channels (as consumer): a layer may consume
    one group and produce the next, as every inner layer of a chain does, but not both
    within one group, unless the group has several producers (a coupled group where a
    residual branch reads the sum it adds to, as ``find_channel_groups(coupled=True)``
    returns for a pre-activation ResNet). Optional ``"offsets"`` (``{module: offset}``,
    ``concat_channels``): followers and consumers that read the group inside a
    concatenation, at that offset of their channel dim (in columns, at the model's current
    widths); such a layer may read several groups, on spans that do not overlap, and only
    other groups' offset spans. A layer whose weight, bias or statistics are
    computed (``torch.nn.utils.parametrize``, the hook-based ``weight_norm``) is refused.
    Groups come back ordered by their first producer's position in
    ``model.named_parameters()``. Raises ``ValueError``/``TypeError`` naming the entry.
    """
    if isinstance(spec, (dict, ChannelGroup)):
        spec = [spec]
    mods = dict(model.named_modules())
    pos = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    used: dict[tuple[str, str], str] = {}  # (module, "out" | "in") -> where it appeared
    spans: dict[tuple[str, str], list[tuple[int, int, str]]] = {}  # the same, read inside a concatenation
    out: list[tuple[int, ChannelGroup]] = []

    def get(i, role, name, coupled=False, span=None):
        if not isinstance(name, str):
            raise TypeError(f"channel_groups[{i}].{role}: module names must be strings, got {name!r}")
        if name not in mods:
            raise ValueError(f"channel_groups[{i}].{role}: model has no module {name!r}")
        side = "in" if role == "consumers" else "out"
        key = used.get((name, side))
        if key is not None:
            raise ValueError(f"channel_groups[{i}].{role}: module {name!r} already appears in {key}")
        here = f"channel_groups[{i}].{role}"
        if span is None and (name, side) in spans:
            raise ValueError(f"{here}: module {name!r} already appears in {spans[(name, side)][0][2]} (with an offset)")
        for lo, hi, where in spans.get((name, side), []) if span is not None else []:
            if span[0] < hi and lo < span[1]:
                raise ValueError(f"{here}: module {name!r} reads columns [{span[0]}, {span[1]}) here and "
                                 f"[{lo}, {hi}) in {where}")
        other = used.get((name, "out" if side == "in" else "in"), "")
        # a residual block's conv may read a coupled group and add its output to it
        # (pre-activation ResNet: x + conv(relu(bn(x)))); a lone producer cannot
        own = coupled and role == "consumers" and other == f"channel_groups[{i}].producers"
        if other.startswith(f"channel_groups[{i}].") and not own:
            raise ValueError(f"channel_groups[{i}].{role}: module {name!r} already appears in {other} "
                             "of the same group")
        attr = _computed_tensor(mods[name])
        if attr is not None:
            raise ValueError(f"channel_groups[{i}].{role}: the {attr} of {name!r} is computed (a parametrization "
                             "such as weight_norm, or a weight_norm/spectral_norm hook); slimming cannot narrow it")
        if span is None:
            used[(name, side)] = here
        else:
            spans.setdefault((name, side), []).append((*span, here))
        return mods[name]

    for i, entry in enumerate(spec):
        if isinstance(entry, ChannelGroup):
            entry = group_to_dict(entry)
            if not entry["channels"]:
                entry.pop("channels")
        if not isinstance(entry, dict):
            raise TypeError(f"channel_groups[{i}] must be a dict or ChannelGroup, got {type(entry).__name__}")
        unknown = set(entry) - {"producers", "consumers", "followers", "channels", "blocks", "offsets"}
        if unknown:
            raise ValueError(f"channel_groups[{i}]: unknown keys {sorted(unknown)}")
        prods = entry.get("producers")
        if isinstance(prods, str):
            prods = [prods]
        if not prods:
            raise ValueError(f"channel_groups[{i}]: 'producers' must list at least one module")
        cons_raw = entry.get("consumers")
        if isinstance(cons_raw, str):
            cons_raw = [cons_raw]
        if not cons_raw:
            raise ValueError(f"channel_groups[{i}]: 'consumers' must list at least one module")
        fols = entry.get("followers", []) or []
        if isinstance(fols, str):
            fols = [fols]
        offs = entry.get("offsets") or {}
        if not isinstance(offs, dict):
            raise TypeError(f"channel_groups[{i}].offsets must be a dict {{module: offset}}, got {type(offs).__name__}")
        readers = {*fols, *((c if isinstance(c, str) else c.module if isinstance(c, Consumer) else c[0])
                            for c in cons_raw if isinstance(c, (str, Consumer, tuple, list)) and c)}
        for n, o in offs.items():
            if n not in readers:
                raise ValueError(f"channel_groups[{i}].offsets: {n!r} is not a follower or consumer of the group")
            if not isinstance(o, int) or isinstance(o, bool) or o < 0:
                raise ValueError(f"channel_groups[{i}].offsets: offset of {n!r} must be an int >= 0, got {o!r}")
        widths = set()
        for p in prods:
            m = get(i, "producers", p)
            if not _is_producer_module(m, grouped=True):
                raise ValueError(
                    f"channel_groups[{i}].producers: {p!r} is a {type(m).__name__}; producers must be "
                    "Conv1d/2d/3d (not depthwise) or Linear"
                )
            widths.add(int(m.weight.shape[0]))
        if len(widths) != 1:
            raise ValueError(f"channel_groups[{i}].producers have different output widths {sorted(widths)}")
        (C,) = widths
        if "channels" in entry and entry["channels"] is not None and int(entry["channels"]) != C:
            raise ValueError(f"channel_groups[{i}].channels={entry['channels']} but the producers have {C}")
        def fits(name, width, r=1):  # C channels (repeat columns each), or inside a concatenation from its offset
            return width == C * r if name not in offs else offs[name] + C * r <= width

        def at(name):
            return f" from offset {offs[name]}" if name in offs else ""

        for f in fols:
            m = get(i, "followers", f, span=(offs[f], offs[f] + C) if f in offs else None)
            if isinstance(m, _NORM):
                if not fits(f, m.num_features):
                    raise ValueError(f"channel_groups[{i}].followers: {f!r} has num_features={m.num_features}, "
                                     f"expected {C}{at(f)}")
            elif isinstance(m, _CONV) and m.groups > 1:
                if not _is_depthwise(m) or not fits(f, m.in_channels):
                    raise ValueError(
                        f"channel_groups[{i}].followers: conv {f!r} must be depthwise with "
                        f"groups == in_channels == out_channels == {C}{at(f)}"
                    )
            else:
                raise ValueError(
                    f"channel_groups[{i}].followers: {f!r} is a {type(m).__name__}; followers must be "
                    "BatchNorm/InstanceNorm or depthwise convs"
                )
        cons = []
        for c in cons_raw:
            if isinstance(c, Consumer):
                name, rep = c.module, c.repeat
            elif isinstance(c, str):
                name, rep = c, 1
            elif isinstance(c, (tuple, list)) and len(c) == 2:
                name, rep = c
            else:
                raise TypeError(f"channel_groups[{i}].consumers: expected a name or (name, repeat), got {c!r}")
            if not isinstance(rep, int) or isinstance(rep, bool) or rep < 1:
                raise ValueError(f"channel_groups[{i}].consumers: repeat of {name!r} must be a positive int, got {rep!r}")
            cg = 1
            m = get(i, "consumers", name, coupled=len(prods) > 1,
                    span=(offs[name], offs[name] + C * rep) if name in offs else None)
            if isinstance(m, nn.Linear):
                if not fits(name, m.in_features, rep):
                    raise ValueError(
                        f"channel_groups[{i}].consumers: linear {name!r} has in_features={m.in_features}, "
                        f"expected {C} channels x repeat {rep} = {C * rep}{at(name)}"
                    )
            elif isinstance(m, _CONV) and not _is_depthwise(m):
                if rep != 1 or not fits(name, m.in_channels):
                    raise ValueError(
                        f"channel_groups[{i}].consumers: conv {name!r} has in_channels={m.in_channels}, "
                        f"expected {C}{at(name)} (repeat must be 1 for a conv)"
                    )
                cg = m.groups
                if cg > 1 and name in offs:
                    raise ValueError(f"channel_groups[{i}].consumers: grouped conv {name!r} cannot read a "
                                     "concatenation (offsets)")
            else:
                raise ValueError(
                    f"channel_groups[{i}].consumers: {name!r} is a {type(m).__name__}; consumers must be "
                    "Conv1d/2d/3d (not depthwise) or Linear"
                )
            cons.append(Consumer(name, rep, cg))
        blocks = _blocks(mods, [*prods, *(c.module for c in cons)])
        if blocks > 1 and blocks >= C:
            raise ValueError(f"channel_groups[{i}]: each conv group of its grouped convs has one channel; "
                             "none could be removed")
        if entry.get("blocks") not in (None, blocks):
            raise ValueError(f"channel_groups[{i}].blocks={entry['blocks']} but its grouped convs make {blocks}")
        prods = sorted(prods, key=lambda p: pos.get(f"{p}.weight", 1 << 60))
        g = ChannelGroup(producers=list(prods), consumers=cons, followers=list(fols), channels=C, blocks=blocks,
                         offsets=dict(offs))
        out.append((pos.get(f"{prods[0]}.weight", 1 << 60), g))
    out.sort(key=lambda t: t[0])
    return [g for _, g in out]
