"""Physical channel removal ("slimming", SPEC §5), replay for checkpoints, dense export.

``slim_(model, groups, keep, optimizer=..., masks=..., gather=...)``
    For every group ``i`` with ``keep[i]`` not ``None`` (a sorted, strictly increasing
    int64 tensor of the *current* physical channel indices to keep), removes the other
    channels in place:

    * producers (Conv / Linear): weight rows (dim 0) and bias entries;
      ``out_channels`` / ``out_features`` (a grouped conv keeps its ``groups``: the group's
      ``blocks`` make every conv group keep as many rows);
    * followers: BatchNorm/InstanceNorm ``weight``, ``bias``, ``running_mean``,
      ``running_var`` and ``num_features``; depthwise convs: weight rows, bias,
      ``in_channels``, ``out_channels`` and ``groups``;
    * consumers: input columns (dim 1) of the weight, ``repeat`` consecutive columns per
      channel (a Linear after ``flatten`` of a C x H x W map has ``repeat = H*W``);
      ``in_channels`` / ``in_features``; a grouped conv (``Consumer.groups``) keeps, in the
      rows of conv group ``j``, the columns of block ``j``'s kept channels (a gather into a
      new tensor: its state follows when shaped like the weight, other state is warned
      about);
    * a follower or consumer in ``ChannelGroup.offsets`` reads the group inside a
      concatenation: only its span ``[offset, offset + C * repeat)`` (offsets as the model
      is now) loses the removed channels, the rest of the dim is kept, and its width
      shrinks by what the group removes. Several groups may share such a layer when their
      spans are disjoint; the spans are cut from the last to the first, so every offset
      given holds when its span is cut;
    * ``masks`` (dict: parameter name -> tensor shaped like the parameter): the entries
      of changed parameters are replaced by gathered tensors;
    * ``optimizer.state[p]``: every tensor whose shape equals ``p``'s old shape (momentum,
      ``exp_avg``, ``exp_avg_sq``, ...) is gathered the same way, and so is every tensor of
      ``p``'s rank that broadcasts to it and spans the gathered dim (Adafactor's factored
      ``row_var`` / ``col_var``); one of size 1 there (a mean over that dim) is left as it
      is, as are scalars (``step``) and other shapes. ``p.grad`` is gathered too.
      ``torch.optim.LBFGS`` keeps flat vectors over all its parameters: ``d`` and
      ``prev_flat_grad`` lose the entries of removed slots; its curvature pairs
      (``old_dirs``, ``old_stps``, ``ro``) are dropped, since their products were taken
      over the removed slots too, so it rebuilds them from the next step on.
      Any other state tensor that fits none of these is left as it is, with a warning
      naming it (the wrapped optimizer would likely fail at its next step).

    Parameter objects keep their identity: only ``p.data`` changes, so the optimizer's
    ``param_groups`` and any reference a user holds stay valid. Buffers keep identity
    too (``buf.data`` is replaced).

    Memory: each tensor is compacted in place by ``gather(tensor, keep_idx, dim)`` (the
    semantics of :func:`chase_ext.reference.gather_channels_`: the kept channels are
    written into the prefix of the tensor's memory), then the prefix is cloned into a
    tensor of the new size and the old storage is released. The peak extra memory is one
    (slimmed) tensor, not a second copy of the model. A non-contiguous tensor is first
    made contiguous (one extra copy of that tensor); the result keeps the tensor's dense
    memory layout (a channels_last weight stays channels_last), other layouts come out
    contiguous.

    Autograd trap: a parameter caches its ``AccumulateGrad`` node, which remembers the
    old shape; an autograd graph still alive during slimming (the user's last ``loss``)
    keeps that node alive and the next backward would fail with "invalid gradient ...
    expected shape". PyTorch drops the cache only when ``.data`` changes dtype or device,
    so ``slim_`` first sets ``p.data`` to an empty tensor of another floating dtype and
    then to the slim data. The old graph itself can no longer be back-propagated.

    Everything is validated (widths, indices, duplicate tensor/dim use) before anything
    is written. Returns a *record* ``{"groups": [dict...], "keep": [LongTensor...]}`` of
    the groups that changed (plain lists, strings, ints and CPU tensors: it can go into a
    state dict). ``ChannelGroup.channels`` (the original width) is not changed.

``replay_(model, records)``
    Applies a list of such records, in order, to a freshly built full-width model, so that
    a checkpoint of a slimmed model can be loaded with ``load_state_dict``.

``export_dense(model)``
    A deep copy that is an ordinary ``nn.Module``: hooks and attributes that belong to
    ``chase_ext`` (and parametrizations defined in ``chase_ext``) are removed, the
    parameters are plain tensors; it works with ``torch.export.export``. Masked weights
    are already exactly zero; they stay as dense zeros.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import reference
from .graph import group_from_dict, group_to_dict
from .layout import like
from .tracing import _is_depthwise
from .groups import CONV_TYPES as _CONV, NORM_TYPES as _NORM, ChannelGroup

__all__ = ["slim_", "replay_", "export_dense"]


Gather = Callable[[Tensor, Tensor, int], None]


# --------------------------------------------------------------------------- helpers
def _compact(t: Tensor, idx: Tensor, dim: int, gather: Gather) -> Tensor:
    """A new tensor holding ``t.index_select(dim, idx)``, laid out in memory like ``t``
    (channels_last stays channels_last); ``t`` is clobbered."""
    ref = t
    if not t.is_contiguous():
        t = t.contiguous()
    gather(t, idx, dim)  # idx stays on the CPU: the CUDA kernel validates it on the host
    shape = list(t.shape)
    shape[dim] = int(idx.numel())
    n = math.prod(shape)
    kept = t.reshape(-1)[:n].view(shape)
    out = like(kept, ref)
    return kept.clone() if out is kept else out


def _gather_blocks(t: Tensor, idx: Tensor, blocks: int) -> Tensor:
    """A grouped conv weight ``t`` (``[out, C/blocks, *kernel]``, conv group ``j`` owning rows
    ``[j*out/blocks, (j+1)*out/blocks)``) keeping input channels ``idx`` of ``[0, C)``: the
    rows of conv group ``j`` keep the columns of block ``j``'s kept channels. Every block
    keeps as many (checked by ``_plan``). A new tensor laid out like ``t``."""
    o, a = t.shape[0], t.shape[1]
    local = idx.view(blocks, -1) - (torch.arange(blocks, dtype=idx.dtype) * a).view(-1, 1)
    k = local.shape[1]
    tv = t.reshape(blocks, o // blocks, a, -1)
    index = local.to(t.device).view(blocks, 1, k, 1).expand(blocks, o // blocks, k, tv.shape[3])
    out = torch.gather(tv, 2, index).reshape(o, k, *t.shape[2:])
    return like(out, t)


def _set_param_data(p: Tensor, new: Tensor) -> None:
    """``p.data = new`` that also drops the cached AccumulateGrad node (see module doc)."""
    if p.is_floating_point() or p.is_complex():
        other = torch.float64 if p.dtype != torch.float64 else torch.float32
    else:
        other = torch.int64 if p.dtype != torch.int64 else torch.int32
    p.data = torch.empty(0, dtype=other, device=new.device)
    p.data = new


def _spans(shape, param_shape, dim: int) -> bool:
    """A state of this shape is per-slot along ``dim`` of the parameter: same rank, the
    full size at ``dim``, every other dim full or 1 (it broadcasts to the parameter)."""
    return (
        len(shape) == len(param_shape) > dim
        and shape[dim] == param_shape[dim]
        and all(a == b or a == 1 for a, b in zip(shape, param_shape))
    )


def _width(m: nn.Module) -> int:
    return int(m.num_features if isinstance(m, _NORM) else m.in_channels)


def _in_span(idx: Tensor, off: int, n: int, width: int) -> Tensor:
    """Indices into a dim of ``width`` that keep everything but the span ``[off, off + n)``,
    where they keep ``off + idx``."""
    return torch.cat([torch.arange(off, dtype=idx.dtype), idx + off,
                      torch.arange(off + n, width, dtype=idx.dtype)])


def _expand(idx: Tensor, repeat: int) -> Tensor:
    if repeat == 1:
        return idx
    return (idx.view(-1, 1) * repeat + torch.arange(repeat, dtype=idx.dtype, device=idx.device)).reshape(-1)


_LBFGS_FLAT = ("d", "prev_flat_grad")  # one flat vector over all parameters
_LBFGS_PAIRS = ("old_dirs", "old_stps", "ro")  # curvature pairs and their 1 / (y . s)


class _Slimmer:
    def __init__(self, model, optimizer, masks, gather):
        self.model = model
        self.optimizer = optimizer
        self.masks = masks
        self.gather = gather
        self.pname = {}
        for n, p in model.named_parameters():
            self.pname.setdefault(id(p), n)
        self.unfit: list[str] = []  # state tensors left as they are (warned about)
        # LBFGS: each parameter's slots numbered by their offset in its flat vectors, the
        # numbers gathered with the parameter; the survivors index the flat state after
        self.flat_pos: dict[int, Tensor] | None = None
        if isinstance(optimizer, torch.optim.LBFGS) and optimizer.param_groups:
            params = optimizer.param_groups[0]["params"]
            if params and optimizer.state.get(params[0]):
                self.flat_pos, off = {}, 0
                for q in params:
                    self.flat_pos[id(q)] = torch.arange(off, off + q.numel()).view(q.shape)
                    off += q.numel()

    def param(self, p: nn.Parameter, idx: Tensor, dim: int, blocks: int = 1) -> None:
        """Gather ``p`` (and its grad, state, mask) along ``dim``; ``blocks`` > 1: the input
        columns of a grouped conv (``_gather_blocks``), where only state of ``p``'s own shape
        can follow."""
        old_shape = p.shape

        def compact(t: Tensor) -> Tensor:
            return _compact(t, idx, dim, self.gather) if blocks == 1 else _gather_blocks(t, idx, blocks)

        def spans(shape) -> bool:
            return _spans(shape, old_shape, dim) if blocks == 1 else tuple(shape) == tuple(old_shape)

        grad = p.grad
        new = compact(p.data)
        new_grad = None
        if grad is not None and grad.shape == old_shape:
            new_grad = compact(grad) if not grad.is_sparse else None
        if self.optimizer is not None:
            st = self.optimizer.state.get(p)
            if st:
                for k, v in list(st.items()):
                    if isinstance(v, Tensor) and spans(v.shape):
                        st[k] = compact(v)
                    elif isinstance(v, Tensor) and v.numel() > 1 and not spans(v.shape) \
                            and not (self.flat_pos is not None and k in _LBFGS_FLAT) \
                            and (blocks > 1 or v.dim() != len(old_shape) or v.shape[dim] != 1):
                        self.unfit.append(f"{self.pname.get(id(p), '?')}[{k!r}] {tuple(v.shape)}")
            if self.flat_pos is not None and id(p) in self.flat_pos:
                fp = self.flat_pos[id(p)]
                self.flat_pos[id(p)] = fp.index_select(dim, idx) if blocks == 1 else _gather_blocks(fp, idx, blocks)
        name = self.pname.get(id(p))
        if self.masks is not None and name is not None and name in self.masks:
            m = self.masks[name]
            if m.shape != old_shape:
                raise ValueError(f"slim_: masks[{name!r}] has shape {tuple(m.shape)}, expected {tuple(old_shape)}")
            self.masks[name] = compact(m)
        p.grad = None
        _set_param_data(p, new)
        p.grad = new_grad

    def finish(self) -> None:
        """Narrow LBFGS's flat vectors to the surviving slots and drop its curvature pairs;
        warn about state left as is."""
        if isinstance(self.optimizer, torch.optim.LBFGS):
            self.optimizer._numel_cache = None  # its cached total size, asserted at every step
        if self.flat_pos is not None:
            params = self.optimizer.param_groups[0]["params"]
            st = self.optimizer.state[params[0]]
            kept = torch.cat([self.flat_pos[id(q)].reshape(-1) for q in params])
            for k in _LBFGS_FLAT:
                if isinstance(st.get(k), Tensor):
                    st[k] = st[k].index_select(0, kept.to(st[k].device))
            for k in _LBFGS_PAIRS:
                if isinstance(st.get(k), list):
                    st[k] = []
        if self.unfit:
            warnings.warn(
                f"slim_: optimizer state that fits neither its parameter's shape nor a known layout was left as it "
                f"is: {', '.join(self.unfit[:4])}{', ...' if len(self.unfit) > 4 else ''}; the wrapped "
                f"{type(self.optimizer).__name__} may fail at its next step", stacklevel=3)

    def buffer(self, b: Tensor, idx: Tensor, dim: int) -> None:
        b.data = _compact(b.data, idx, dim, self.gather)

    def tensor_attr(self, m: nn.Module, attr: str, idx: Tensor, dim: int, blocks: int = 1) -> None:
        t = getattr(m, attr, None)
        if t is None:
            return
        if isinstance(t, nn.Parameter):
            self.param(t, idx, dim, blocks)
        else:
            self.buffer(t, idx, dim)


def _as_keep(k, C: int, where: str) -> Tensor:
    if not isinstance(k, Tensor):
        k = torch.as_tensor(k, dtype=torch.int64)
    if k.dtype != torch.int64 or k.dim() != 1:
        raise ValueError(f"{where}: keep must be a 1-D int64 tensor, got {k.dtype} of shape {tuple(k.shape)}")
    k = k.detach().cpu()
    if k.numel() == 0:
        raise ValueError(f"{where}: keep is empty; a group must keep at least one channel")
    if int(k.min()) < 0 or int(k.max()) >= C:
        raise ValueError(f"{where}: keep indices must be in [0, {C}), got [{int(k.min())}, {int(k.max())}]")
    if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
        raise ValueError(f"{where}: keep must be sorted and strictly increasing")
    return k


def _plan(model: nn.Module, groups: Sequence[ChannelGroup], keep: Sequence[Any]):
    """Validate everything and return [(group, keep_idx, C_now)] for the groups that change."""
    if len(keep) != len(groups):
        raise ValueError(f"slim_: got {len(keep)} keep entries for {len(groups)} groups")
    mods = dict(model.named_modules())
    used: dict[tuple[str, int], list[tuple[float, float, int]]] = {}  # (module, dim) -> claimed spans

    def mod(i, name, role):
        m = mods.get(name)
        if m is None:
            raise ValueError(f"slim_: group {i} ({groups[i].name}): model has no module {name!r} ({role})")
        return m

    def claim(i, name, dim, span=(0, math.inf)):
        # inside a concatenation several groups own disjoint spans of one dim
        for lo, hi, j in used.get((name, dim), []):
            if span[0] < hi and lo < span[1]:
                raise ValueError(f"slim_: module {name!r} dim {dim} appears in group {i} and in group {j}")
        used.setdefault((name, dim), []).append((*span, i))

    def fits(i, g, name, width, C, r=1):
        off = g.offsets.get(name)
        if off is None:
            return width == C * r
        if not isinstance(off, int) or off < 0:
            raise ValueError(f"slim_: group {i} ({g.name}): offset of {name!r} must be an int >= 0, got {off!r}")
        return off + C * r <= width

    plan = []
    for i, (g, k) in enumerate(zip(groups, keep)):
        if not g.producers:
            raise ValueError(f"slim_: group {i} has no producers")
        widths = set()
        for p in g.producers:
            m = mod(i, p, "producer")
            # a grouped conv is judged by its role, not its current shape: one with a channel
            # multiplier slimmed to one channel per conv group looks depthwise
            if not isinstance(m, (*_CONV, nn.Linear)):
                raise ValueError(f"slim_: producer {p!r} of group {i} is a {type(m).__name__}")
            if isinstance(m, _CONV) and g.blocks % m.groups:
                raise ValueError(f"slim_: producer {p!r} of group {i} has {m.groups} conv groups; the group's "
                                 f"blocks={g.blocks} must be a multiple")
            widths.add(int(m.weight.shape[0]))
        if len(widths) != 1:
            raise ValueError(f"slim_: producers of group {i} have different widths {sorted(widths)}")
        (C,) = widths
        for f in g.followers:
            m = mod(i, f, "follower")
            if isinstance(m, _NORM):
                w = m.num_features
            elif isinstance(m, _CONV) and m.groups == m.in_channels == m.out_channels:
                w = m.in_channels
            else:
                raise ValueError(f"slim_: follower {f!r} of group {i} is a {type(m).__name__}")
            if not fits(i, g, f, w, C):
                where = f" from offset {g.offsets[f]}" if f in g.offsets else ""
                raise ValueError(f"slim_: follower {f!r} of group {i} has width {w}, producers have {C}{where}")
        for c in g.consumers:
            m = mod(i, c.module, "consumer")
            where = f" from offset {g.offsets[c.module]}" if c.module in g.offsets else ""
            if c.module in g.offsets and c.groups > 1:
                raise ValueError(f"slim_: consumer {c.module!r} of group {i} is a grouped conv with an offset")
            if isinstance(m, nn.Linear):
                if not fits(i, g, c.module, m.in_features, C, c.repeat):
                    raise ValueError(
                        f"slim_: consumer {c.module!r} of group {i} has in_features={m.in_features}, "
                        f"expected {C} x {c.repeat}{where}"
                    )
            elif isinstance(m, _CONV) and (c.groups > 1 or not _is_depthwise(m)):
                if not fits(i, g, c.module, m.in_channels, C) or c.repeat != 1:
                    raise ValueError(f"slim_: consumer {c.module!r} of group {i} has in_channels={m.in_channels}, "
                                     f"expected {C}{where}")
                if m.groups != c.groups or g.blocks % m.groups:
                    raise ValueError(f"slim_: consumer {c.module!r} of group {i} has {m.groups} conv groups, the group "
                                     f"says {c.groups} (blocks={g.blocks})")
            else:
                raise ValueError(f"slim_: consumer {c.module!r} of group {i} is a {type(m).__name__}")
        if k is None:
            continue
        kk = _as_keep(k, C, f"slim_: keep[{i}] ({g.name})")
        if kk.numel() == C:
            continue
        if g.blocks > 1:  # every conv group of a grouped conv keeps the same width
            if C % g.blocks:
                raise ValueError(f"slim_: group {i} ({g.name}) has {C} channels, not a multiple of blocks={g.blocks}")
            per = torch.bincount(kk // (C // g.blocks), minlength=g.blocks)
            if bool((per != per[0]).any()):
                raise ValueError(f"slim_: keep[{i}] ({g.name}) keeps {per.tolist()} channels of its {g.blocks} "
                                 "blocks; a grouped conv needs the same number in each")
        for p in g.producers:
            claim(i, p, 0)
        for f in g.followers:
            off = g.offsets.get(f)
            claim(i, f, 0, (0, math.inf) if off is None else (off, off + C))
        for c in g.consumers:
            off = g.offsets.get(c.module)
            claim(i, c.module, 1, (0, math.inf) if off is None else (off, off + C * c.repeat))
        plan.append((g, kk, C))
    return plan


# --------------------------------------------------------------------------- public
@torch.no_grad()
def slim_(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep: Sequence[Tensor | None],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    masks: dict[str, Tensor] | None = None,
    gather: Gather | None = None,
) -> dict:
    """Physically remove the channels not in ``keep`` (see the module doc). Returns the
    record of this step (for :func:`replay_`)."""
    gather = gather or reference.gather_channels_
    plan = _plan(model, groups, keep)
    mods = dict(model.named_modules())
    s = _Slimmer(model, optimizer, masks, gather)
    rec_groups, rec_keep = [], []
    readers = []  # (offset, group, keep, C, module, consumer or None)
    for g, k, C in plan:
        K = int(k.numel())
        for name in g.producers:
            m = mods[name]
            s.tensor_attr(m, "weight", k, 0)
            s.tensor_attr(m, "bias", k, 0)
            if isinstance(m, nn.Linear):
                m.out_features = K
            else:
                m.out_channels = K
        readers += [(g.offsets.get(f), g, k, C, f, None) for f in g.followers]
        readers += [(g.offsets.get(c.module), g, k, C, c.module, c) for c in g.consumers]
        rec_groups.append(group_to_dict(g))
        rec_keep.append(k.clone())
    # inside a concatenation the last span goes first: the offsets before it stay true
    readers.sort(key=lambda t: -1 if t[0] is None else -t[0])
    for off, g, k, C, name, c in readers:
        m = mods[name]
        gone = C - int(k.numel())
        if c is None:  # follower: per-channel tensors, dim 0
            idx = k if off is None else _in_span(k, off, C, _width(m))
            for attr in ("weight", "bias", "running_mean", "running_var"):
                s.tensor_attr(m, attr, idx, 0)
            if isinstance(m, _NORM):
                m.num_features -= gone
            else:  # depthwise conv
                m.in_channels = m.out_channels = m.groups = m.in_channels - gone
        else:
            cols = _expand(k, c.repeat)
            if off is not None:
                cols = _in_span(cols, off, C * c.repeat, int(m.weight.shape[1]))
            s.tensor_attr(m, "weight", cols, 1, c.groups)
            if isinstance(m, nn.Linear):
                m.in_features -= gone * c.repeat
            else:
                m.in_channels -= gone
    s.finish()
    return {"groups": rec_groups, "keep": rec_keep}


def replay_(model: nn.Module, records: Sequence[dict] | dict, *, gather: Gather | None = None) -> nn.Module:
    """Apply recorded ``slim_`` steps (in order) to a freshly built full-width model, e.g.
    before ``model.load_state_dict(checkpoint_of_slim_model)``. Returns ``model``."""
    if isinstance(records, dict):
        records = [records]
    for j, rec in enumerate(records):
        if not isinstance(rec, dict) or "groups" not in rec or "keep" not in rec:
            raise ValueError(f"replay_: records[{j}] must be a dict with 'groups' and 'keep' (as returned by slim_)")
        groups = [g if isinstance(g, ChannelGroup) else group_from_dict(g) for g in rec["groups"]]
        try:
            slim_(model, groups, list(rec["keep"]), gather=gather)
        except ValueError as e:
            raise ValueError(f"replay_: records[{j}] does not fit the model: {e}") from e
    return model


def _is_chase(obj) -> bool:
    if obj is None:
        return False
    if isinstance(obj, functools.partial):
        return _is_chase(obj.func)
    if inspect.ismethod(obj):
        return _is_chase(obj.__self__) or _is_chase(obj.__func__)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        mod = getattr(obj, "__module__", None)
    else:
        mod = type(obj).__module__
    if not isinstance(mod, str):
        return False
    return mod == "chase_ext" or mod.startswith("chase_ext.")


def _hook_fn(h):
    return getattr(h, "hook", h)  # _WrappedHook (state-dict hooks) keeps the callable in .hook


def export_dense(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without any ``chase_ext`` hook, attribute or
    parametrization: an ordinary ``nn.Module`` (see the module doc)."""
    stripped: list[tuple[dict, Any, Any]] = []  # (container, key, value) to restore
    try:
        for m in model.modules():
            d = vars(m)
            for key, val in list(d.items()):
                if key in ("_parameters", "_buffers", "_modules"):
                    continue
                if isinstance(val, dict) and "hook" in key:
                    bad = [hid for hid, h in val.items() if _is_chase(_hook_fn(h))]
                    for hid in bad:
                        stripped.append((val, hid, val.pop(hid)))
                elif _is_chase(val):
                    stripped.append((d, key, d.pop(key)))
            # hook-kwargs bookkeeping dicts keyed by removed hook ids
            removed = {k for c, k, _ in stripped if c is not d and isinstance(k, int)}
            for key in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                extra = d.get(key)
                if isinstance(extra, dict):
                    for hid in [h for h in extra if h in removed]:
                        stripped.append((extra, hid, extra.pop(hid)))
        out = copy.deepcopy(model)
    finally:
        for container, key, val in reversed(stripped):
            container[key] = val
    # parametrizations registered by chase_ext: bake them in
    try:
        from torch.nn.utils import parametrize
    except ImportError:  # pragma: no cover
        parametrize = None
    if parametrize is not None:
        for m in list(out.modules()):
            if parametrize.is_parametrized(m):
                for tname, plist in list(m.parametrizations.items()):
                    if any(_is_chase(p) for p in plist):
                        parametrize.remove_parametrizations(m, tname, leave_parametrized=True)
    for m in out.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and type(p) is not nn.Parameter:
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    return out
