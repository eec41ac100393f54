"""Pure-PyTorch versions of every op in ``chase_ext._ops``.

They define the semantics (SPEC §6) and serve as the test oracle and the benchmark
baseline. Same names, same arguments, same results as the native ops; selections and
masks bit-identical, float sums equal up to rounding.

Conventions shared by every op
------------------------------
* Lists of tensors are processed as one "global order": tensor after tensor, each
  flattened row-major. The global index of slot ``i`` of tensor ``t`` is
  ``sum(numel of tensors before t) + i``.
* A *key* is the float32 value (after ``abs`` when ``absolute``; ``-0.0`` counts as
  ``+0.0``) mapped to an unsigned 32-bit integer whose order is the float order.
* ``live_rows`` / ``live_cols``: either empty lists (every slot is live) or one bool
  tensor per weight with ``shape[0]`` resp. ``shape[1]`` entries; slot ``(r, c, ...)``
  is live when ``live_rows[t][r] and live_cols[t][c]``.
* A selection of ``k`` slots is returned as ``(key, cutoff)`` (int64 tensor of 2):
  the selected set is ``{key(i) better than key} ∪ {key(i) == key and gidx(i) < cutoff}``
  among the candidates, "better" being smaller (``largest=False``) or larger. Ties thus
  go to the lower global index. ``k == 0`` gives ``(0, 0)`` for smallest and
  ``(2**32 - 1, 0)`` for largest.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import dense_order, rows_dense, same_flat_layout

__all__ = [
    "sortable_key",
    "select_threshold",
    "selected",
    "mask_update_",
    "channel_stats",
    "masked_apply_",
    "masked_sgd_",
    "masked_adam_",
    "gather_channels_",
    "live_slots",
]

KEY_MAX = 2**32 - 1

# ------------------------------------------------------------------ argument checks
# The rules of csrc/common/checks.h (and the keep checks of gather_channels), so the
# reference refuses what the native ops refuse, naming the argument, and always before
# it writes anything (SPEC §6). Without them zip() truncates lists, owner -1 wraps and
# masks broadcast. Dtypes raise TypeError, everything else ValueError.

_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# zeroing goes through an integer view of the same width (see _zero_where_not)
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _err(op: str, msg: str, exc: type = ValueError) -> Exception:
    return exc(f"chase_ext.{op}: {msg}")


def _check_list(op: str, name: str, ts) -> None:
    if isinstance(ts, Tensor) or not all(isinstance(t, Tensor) for t in ts):
        raise _err(op, f"{name} must be a list of tensors", TypeError)


def _check_float_list(op: str, name: str, ts, contiguous: bool = True) -> None:
    """float32/float16/bfloat16, contiguous (unless told otherwise: mask_update_ checks
    its layouts apart), one dtype for the whole list."""
    _check_list(op, name, ts)
    for i, t in enumerate(ts):
        if t.dtype not in _KEY_DTYPES:
            raise _err(op, f"{name}[{i}] must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
        if contiguous and not t.is_contiguous():
            raise _err(op, f"{name}[{i}] must be contiguous")
        if t.dtype != ts[0].dtype:
            raise _err(op, f"{name}[{i}] has dtype {t.dtype} but {name}[0] has {ts[0].dtype} (one dtype per list)",
                       TypeError)


def _check_bool_list(op: str, name: str, ts, dense: bool = False) -> None:
    """Bool tensors, contiguous (or, with ``dense``, covering their memory densely in any
    dim order: masked_apply_ runs over flat storage)."""
    _check_list(op, name, ts)
    for i, t in enumerate(ts):
        if t.dtype != torch.bool:
            raise _err(op, f"{name}[{i}] must be bool, got {t.dtype}", TypeError)
        if dense and dense_order(t) is None:
            raise _err(op, f"{name}[{i}] must cover its memory densely (contiguous, channels_last or another "
                           f"permutation; no gaps or overlaps), got strides {t.stride()} for shape {list(t.shape)}")
        if not dense and not t.is_contiguous():
            raise _err(op, f"{name}[{i}] must be contiguous")


def _check_like(op: str, name: str, ts, ref_name: str, ref) -> None:
    """Same length as ``ref``; each tensor of the same shape (no broadcasting) and device."""
    _check_list(op, name, ts)
    if len(ts) != len(ref):
        raise _err(op, f"{name} has {len(ts)} tensors but {ref_name} has {len(ref)}")
    for i, (t, r) in enumerate(zip(ts, ref)):
        if t.shape != r.shape:
            raise _err(op, f"{name}[{i}] has shape {list(t.shape)} but {ref_name}[{i}] has shape {list(r.shape)}")
        if t.device != r.device:
            raise _err(op, f"{name}[{i}] is on {t.device} but {ref_name}[{i}] is on {r.device}")


def _check_rows_dense(op: str, name: str, ts) -> None:
    for i, t in enumerate(ts):
        if not rows_dense(t):
            raise _err(op, f"{name}[{i}] must cover its memory densely with dim 0 outermost (contiguous, "
                           f"channels_last or another order of the other dims), got strides {t.stride()} for shape "
                           f"{list(t.shape)}")


# the layout rules the messages name (csrc/common/checks.h words them alike)
_LIKE_WEIGHT = "each score, mask and state must be laid out in memory like its weight"
_LIKE_MASK = "a tensor must be laid out in memory like its mask"
_MASK_LIKE_WEIGHT = "each mask must be laid out in memory like its weight"


def _check_laid_out_like(op: str, name: str, t: Tensor, i: int, ref_name: str, ref: Tensor, r: int,
                         rule: str = _LIKE_WEIGHT) -> None:
    if not same_flat_layout(t, ref):
        raise _err(op, f"{name}[{i}] has strides {t.stride()} but {ref_name}[{r}] has strides {ref.stride()}; "
                       f"{rule}")


def _check_masks(op: str, masks, ref, ref_name: str, like_ref: bool = False, rule: str = _LIKE_WEIGHT) -> None:
    """Bool masks of the shapes of ``ref``: contiguous, or with ``like_ref`` laid out like
    their ``ref`` tensor (``rule`` says why)."""
    _check_like(op, "masks", masks, ref_name, ref)
    if not like_ref:
        _check_bool_list(op, "masks", masks)
        return
    _check_list(op, "masks", masks)
    for i, (m, r) in enumerate(zip(masks, ref)):
        if m.dtype != torch.bool:
            raise _err(op, f"masks[{i}] must be bool, got {m.dtype}", TypeError)
        _check_laid_out_like(op, "masks", m, i, ref_name, r, i, rule)


def _check_one_device(op: str, name: str, ts) -> None:
    for i, t in enumerate(ts):
        if t.device != ts[0].device:
            raise _err(op, f"{name}[{i}] is on {t.device} but {name}[0] is on {ts[0].device}")


def _check_live(op: str, name: str, live, ref, dim: int) -> None:
    """Empty (all live) or one contiguous 1-D bool tensor of ``ref[i].shape[dim]`` per tensor."""
    _check_list(op, name, live)
    if len(live) == 0:
        return
    if len(live) != len(ref):
        raise _err(op, f"{name} has {len(live)} tensors; expected 0 (all live) or {len(ref)}")
    for i, (l, r) in enumerate(zip(live, ref)):
        if r.dim() <= dim:
            raise _err(op, f"{name}[{i}] given for a tensor of {r.dim()} dims")
        if l.dtype != torch.bool or l.dim() != 1 or l.numel() != r.shape[dim] or not l.is_contiguous():
            raise _err(op, f"{name}[{i}] must be a contiguous 1-D bool tensor of {r.shape[dim]} entries, "
                           f"got {l.dtype} of shape {list(l.shape)}")
        if l.device != r.device:
            raise _err(op, f"{name}[{i}] is on {l.device} but its tensor is on {r.device}")


def _check_counts(op: str, name: str, counts, n: int) -> None:
    """1 count (global scope) or n (one per tensor), none negative."""
    if len(counts) not in (1, n):
        raise _err(op, f"{name} must hold 1 count (global) or {n} (one per tensor), got {len(counts)}")
    for i, c in enumerate(counts):
        if c < 0:
            raise _err(op, f"{name}[{i}]={c} is negative")


def _check_owned(op: str, name: str, ts, owner_name: str, owner, owned_name: str, owned,
                 like_owner: bool = False) -> None:
    """``ts[j]`` belongs to ``owned[owner[j]]``: owner in range (no -1 wrap), same shape
    and device, laid out in memory like its owner, and a float tensor we can zero bit-wise.
    ``like_owner`` words the layout rule for masks as owners (masked_apply_ and the fused
    steps), otherwise for weights (mask_update_'s states)."""
    _check_list(op, name, ts)
    if len(owner) != len(ts):
        raise _err(op, f"{owner_name} has {len(owner)} entries but there are {len(ts)} {name}")
    for j, (t, o) in enumerate(zip(ts, owner)):
        if not 0 <= o < len(owned):
            raise _err(op, f"{owner_name}[{j}]={o} is out of range [0, {len(owned)})")
        if t.shape != owned[o].shape:
            raise _err(op, f"{name}[{j}] has shape {list(t.shape)} but its owner {owned_name}[{o}] has shape "
                           f"{list(owned[o].shape)}")
        if t.device != owned[o].device:
            raise _err(op, f"{name}[{j}] is on {t.device} but its owner {owned_name}[{o}] is on {owned[o].device}")
        _check_laid_out_like(op, name, t, j, owned_name, owned[o], o, _LIKE_MASK if like_owner else _LIKE_WEIGHT)
        if not t.is_floating_point() or t.element_size() not in _SAME_WIDTH_INT:
            raise _err(op, f"{name}[{j}] must be floating point of 1, 2, 4 or 8 bytes, got {t.dtype}", TypeError)


def _check_no_alias(op: str, written: dict, read: dict) -> None:
    """No written tensor shares a byte with another argument (read-only ones may overlap
    each other): with aliases, what one tensor's write does would change what the next
    one reads. Byte ranges suffice: every tensor was checked dense (strides >= 0), so its
    bytes are one range from its data pointer."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), f"{name}[{i}]", w)
             for w, group in ((True, written), (False, read)) for name, ts in group.items()
             for i, t in enumerate(ts) if t.numel() > 0]
    spans.sort(key=lambda s: s[0])
    for a, (lo, hi, name, w) in enumerate(spans):
        for lo2, _, name2, w2 in spans[a + 1:]:
            if lo2 >= hi:
                break
            if w or w2:
                raise _err(op, f"{name2} shares memory with {name} and one of them is written; pass separate tensors")


def _check_float32_cpu(op: str, name: str, ts) -> None:
    """The fused optimizer steps take float32 CPU tensors only."""
    for i, t in enumerate(ts):
        if t.dtype != torch.float32:
            raise _err(op, f"{name}[{i}] must be float32, got {t.dtype}", TypeError)
        if t.device.type != "cpu":
            raise _err(op, f"{name}[{i}] must be on the CPU, got {t.device}")


def _zero_where_not(t: Tensor, keep: Tensor) -> None:
    """``t[~keep] = 0`` for any float dtype: on the integer view, since zero bits are +0.0
    in every float format and masked_fill_ has no float8 kernels."""
    t.view(_SAME_WIDTH_INT[t.element_size()]).masked_fill_(~keep, 0)


def sortable_key(x: Tensor, absolute: bool) -> Tensor:
    """int64 keys whose order equals the float32 order of ``x`` (or ``|x|``)."""
    v = x.detach().float()
    if absolute:
        v = v.abs()
    v = v + 0.0  # -0.0 -> +0.0
    bits = v.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = bits >= 2**31
    return torch.where(neg, bits ^ 0xFFFFFFFF, bits | 2**31)


def live_slots(w: Tensor, live_row: Tensor | None, live_col: Tensor | None) -> Tensor:
    """Bool tensor shaped like ``w``: which slots are in live channels."""
    live = torch.ones_like(w, dtype=torch.bool)
    if live_row is not None:
        shape = [w.shape[0]] + [1] * (w.dim() - 1)
        live = live & live_row.to(w.device).view(shape)
    if live_col is not None:
        shape = [1, w.shape[1]] + [1] * (w.dim() - 2)
        live = live & live_col.to(w.device).view(shape)
    return live


def _live_list(ws, live_rows, live_cols):
    return [
        live_slots(w, live_rows[i] if live_rows else None, live_cols[i] if live_cols else None)
        for i, w in enumerate(ws)
    ]


def _select(keys: Tensor, gidx: Tensor, k: int, largest: bool) -> tuple[int, int]:
    """(key, cutoff) of the k best of the candidate keys (flat, in global order)."""
    if k == 0:
        return (KEY_MAX if largest else 0), 0
    # stable sort keeps equal keys in global (index) order -> ties to the lower index
    order = torch.sort(keys, descending=largest, stable=True).indices
    kth = order[k - 1]
    return int(keys[kth]), int(gidx[kth]) + 1


def selected(keys: Tensor, gidx: Tensor, key: int, cutoff: int, largest: bool) -> Tensor:
    """Membership of each slot in the selection ``(key, cutoff)``."""
    better = keys > key if largest else keys < key
    return better | ((keys == key) & (gidx < cutoff))


def _check_k(op: str, name: str, k: int, available: int) -> None:
    if k < 0 or k > available:
        raise _err(op, f"{name}={k} is out of range: only {available} candidate slots")


def _check_finite(op: str, name: str, ts) -> None:
    # every slot, candidate or not, as the native ops do
    for i, t in enumerate(ts):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _err(op, f"{name}[{i}] has non-finite values")


def _gidx(ts) -> list[Tensor]:
    out, off = [], 0
    for t in ts:
        out.append(torch.arange(off, off + t.numel(), device=t.device).view(t.shape))
        off += t.numel()
    return out


def select_threshold(
    keys: list[Tensor],
    masks: list[Tensor],
    live_rows: list[Tensor],
    live_cols: list[Tensor],
    mask_value: bool,
    k: int,
    largest: bool,
    absolute: bool,
) -> Tensor:
    """k-th best key among slots with ``mask == mask_value`` in live channels."""
    op = "select_threshold"
    _check_float_list(op, "keys", keys)
    _check_masks(op, masks, keys, "keys")
    _check_live(op, "live_rows", live_rows, keys, 0)
    _check_live(op, "live_cols", live_cols, keys, 1)
    _check_one_device(op, "keys", keys)
    if k < 0:
        raise _err(op, f"k={k} is negative")
    _check_finite(op, "keys", keys)
    live = _live_list(keys, live_rows, live_cols)
    cand = [(m == mask_value) & l for m, l in zip(masks, live)]
    gidx = _gidx(keys)
    flat_keys = torch.cat([sortable_key(x, absolute).flatten()[c.flatten()] for x, c in zip(keys, cand)]) if keys else torch.zeros(0, dtype=torch.int64)
    flat_idx = torch.cat([g.flatten()[c.flatten()] for g, c in zip(gidx, cand)]) if keys else torch.zeros(0, dtype=torch.int64)
    _check_k(op, "k", k, flat_keys.numel())
    key, cutoff = _select(flat_keys, flat_idx, k, largest)
    return torch.tensor([key, cutoff], dtype=torch.int64)


def _select_scoped(key_list, cand_list, gidx_list, counts, largest, op, name):
    """Selections for global scope (one count) or per-tensor scope (one per tensor)."""
    if len(counts) == 1:
        keys = torch.cat([k.flatten()[c.flatten()] for k, c in zip(key_list, cand_list)])
        idx = torch.cat([g.flatten()[c.flatten()] for g, c in zip(gidx_list, cand_list)])
        _check_k(op, name, counts[0], keys.numel())
        sel = _select(keys, idx, counts[0], largest)
        return [sel] * len(key_list)
    out = []
    for t, (k, c, g) in enumerate(zip(key_list, cand_list, gidx_list)):
        keys, idx = k.flatten()[c.flatten()], g.flatten()[c.flatten()]
        _check_k(op, f"{name}[{t}]", counts[t], keys.numel())
        out.append(_select(keys, idx, counts[t], largest))
    return out


def mask_update_(
    weights: list[Tensor],
    masks: list[Tensor],
    scores: list[Tensor],
    live_rows: list[Tensor],
    live_cols: list[Tensor],
    states: list[Tensor],
    state_owner: list[int],
    prune_counts: list[int],
    grow_counts: list[int],
) -> tuple[Tensor, Tensor]:
    """Prune by |w|, grow by |score|, rewrite masks, zero changed weights and states.

    Prune: among active live slots, the ``prune_counts`` smallest ``|w|``.
    Grow: among inactive live slots (just-pruned included), the ``grow_counts`` largest
    ``|score|``. ``prune_counts``/``grow_counts`` hold one count (global scope) or one per
    tensor (per-tensor scope). A slot that stays active keeps its value and state; every
    other slot (and its state entries) becomes exactly 0.
    Returns per-row active counts (int64) and per-row Σ|w| (float32), concatenated over
    the weights in order.

    Layouts: each weight covers its memory densely with dim 0 outermost (contiguous,
    channels_last, ...; ``chase_ext.layout.rows_dense``), and its score, mask and states are laid out like
    it. The layout never changes the selections, masks, weights, states or counts: global
    indices are row-major whatever the memory order (the native Σ|w| may differ in its last
    bits, as its summation order follows memory).
    """
    op = "mask_update_"
    _check_float_list(op, "weights", weights, contiguous=False)
    _check_rows_dense(op, "weights", weights)
    _check_float_list(op, "scores", scores, contiguous=False)
    _check_like(op, "scores", scores, "weights", weights)
    for i, (sc, w) in enumerate(zip(scores, weights)):
        _check_laid_out_like(op, "scores", sc, i, "weights", w, i)
    _check_masks(op, masks, weights, "weights", like_ref=True)
    _check_live(op, "live_rows", live_rows, weights, 0)
    _check_live(op, "live_cols", live_cols, weights, 1)
    _check_owned(op, "states", states, "state_owner", state_owner, "weights", weights)
    _check_counts(op, "prune_counts", prune_counts, len(weights))
    _check_counts(op, "grow_counts", grow_counts, len(weights))
    if len(grow_counts) != len(prune_counts):
        raise _err(op, f"prune_counts has {len(prune_counts)} entries but grow_counts has {len(grow_counts)}")
    _check_one_device(op, "weights", weights)
    _check_no_alias(op, dict(weights=weights, masks=masks, states=states),
                    dict(scores=scores, live_rows=live_rows, live_cols=live_cols))
    if not weights:  # nothing to select from: only zero counts fit
        if any(prune_counts) or any(grow_counts):
            raise _err(op, "prune_counts/grow_counts given for an empty list of weights")
        return channel_stats([], [])
    _check_finite(op, "weights", weights)
    _check_finite(op, "scores", scores)
    live = _live_list(weights, live_rows, live_cols)
    gidx = _gidx(weights)
    old = [m.clone() for m in masks]
    wkeys = [sortable_key(w, True) for w in weights]
    skeys = [sortable_key(s, True) for s in scores]
    cand_p = [o & l for o, l in zip(old, live)]
    sel_p = _select_scoped(wkeys, cand_p, gidx, list(prune_counts), False, op, "prune_counts")
    pruned = [c & selected(k, g, *s, largest=False) for c, k, g, s in zip(cand_p, wkeys, gidx, sel_p)]
    after = [o & ~p for o, p in zip(old, pruned)]
    cand_g = [~a & l for a, l in zip(after, live)]
    sel_g = _select_scoped(skeys, cand_g, gidx, list(grow_counts), True, op, "grow_counts")
    new = [a | (c & selected(k, g, *s, largest=True)) for a, c, k, g, s in zip(after, cand_g, skeys, gidx, sel_g)]
    for w, m, o, nm in zip(weights, masks, old, new):
        keep = o & nm
        w.masked_fill_(~keep, 0)
        m.copy_(nm)
    for s, owner in zip(states, state_owner):
        _zero_where_not(s, old[owner] & new[owner])
    return channel_stats([w.contiguous() for w in weights], [m.contiguous() for m in masks])


def channel_stats(weights: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per output channel (dim 0) of each weight: active count and Σ|w| over active slots.

    Each weight rows-dense (dim 0 outermost: contiguous, channels_last, ...), its mask laid
    out like it; rows are summed in row-major order whatever the memory order."""
    op = "channel_stats"
    _check_float_list(op, "weights", weights, contiguous=False)
    _check_rows_dense(op, "weights", weights)
    _check_masks(op, masks, weights, "weights", like_ref=True, rule=_MASK_LIKE_WEIGHT)
    _check_one_device(op, "weights", weights)
    if not weights:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    counts, sums = [], []
    for w, m in zip(weights, masks):
        rows = w.shape[0] if w.dim() > 0 else 1  # a 0-dim tensor is one row
        per_row = w.numel() // rows if rows else 0
        counts.append(m.reshape(rows, per_row).sum(1, dtype=torch.int64))
        sums.append((w.detach().float().abs() * m).reshape(rows, per_row).sum(1, dtype=torch.float32))
    return torch.cat(counts), torch.cat(sums)


def masked_apply_(tensors: list[Tensor], masks: list[Tensor], owner: list[int]) -> None:
    """``tensors[i] <- where(masks[owner[i]], tensors[i], 0)`` for every i.

    Elementwise, so any dense layout is taken: each mask covers its memory densely and
    each tensor is laid out like its mask (same strides where a dim has > 1 entry)."""
    op = "masked_apply_"
    _check_bool_list(op, "masks", masks, dense=True)
    _check_owned(op, "tensors", tensors, "owner", owner, "masks", masks, like_owner=True)
    _check_one_device(op, "tensors", tensors)
    _check_no_alias(op, dict(tensors=tensors), dict(masks=masks))
    for t, o in zip(tensors, owner):
        _zero_where_not(t, masks[o])


def masked_sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], masks: list[Tensor],
                lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                maximize: bool) -> None:
    """A plain step's gradient masking and ``torch.optim.SGD``'s update in one: for each i,
    ``grads[i] <- where(masks[i], grads[i], 0)`` in place, then ``params[i]`` (and
    ``momentum_buffers[i]``, given exactly when ``momentum != 0``) take the single-tensor
    SGD rule of ``torch.optim.SGD`` with that gradient and these settings; the lines
    below are that rule. float32 CPU tensors, each laid out in memory like its mask.
    The native kernel computes each ``add(..., alpha=a)`` as one fused multiply-add, as
    ATen's float32 kernels do on AVX2 / AVX-512; ChaseOptimizer uses it only after
    checking it equals ``torch.optim.SGD`` bit for bit on the machine."""
    op = "masked_sgd_"
    n = len(params)
    if len(grads) != n or len(masks) != n:
        raise _err(op, f"params, grads and masks need one tensor each per weight, got {n}, {len(grads)} and "
                       f"{len(masks)}")
    if momentum != 0 and len(momentum_buffers) != n:
        raise _err(op, f"momentum {momentum} needs one momentum buffer per weight, got {len(momentum_buffers)} "
                       f"for {n} weights")
    if momentum == 0 and len(momentum_buffers):
        raise _err(op, f"momentum 0 takes no momentum buffers, got {len(momentum_buffers)}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise _err(op, f"nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD), got momentum "
                       f"{momentum} and dampening {dampening}")
    _check_bool_list(op, "masks", masks, dense=True)
    own = list(range(n))
    for name, ts in (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers)):
        _check_owned(op, name, ts, "owner", own[: len(ts)], "masks", masks, like_owner=True)
        _check_float32_cpu(op, name, ts)
    _check_no_alias(op, dict(params=params, grads=grads, momentum_buffers=momentum_buffers), dict(masks=masks))
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        _zero_where_not(g, m)
        grad = g if not maximize else -g
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.add_(grad, alpha=-lr)


def masked_adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], masks: list[Tensor], lr: float,
                 beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
                 decoupled_weight_decay: bool, vector_width: int) -> None:
    """A plain step's gradient masking and ``torch.optim.Adam(fused=True)``'s update in one
    (AdamW's with ``decoupled_weight_decay``): for each i, ``grads[i] <- where(masks[i],
    grads[i], 0)`` in place, ``state_steps[i] += 1``, then torch's own fused CPU kernel
    (``torch._fused_adam_`` / ``torch._fused_adamw_``) on the tensors; ``max_exp_avg_sqs``
    are given exactly with ``amsgrad``. float32 CPU tensors, each laid out in memory like
    its mask; each step one float32 or float64 number.

    ``vector_width`` is for the native kernel, which reproduces that kernel's roundings:
    in each tensor's last ``numel % vector_width`` slots they are its scalar tail's
    (ATen's vector width for float32, 8 or 16). Here torch's kernel rounds as it does, so
    the argument is only checked; ChaseOptimizer uses the native kernel only after checking
    it equals torch bit for bit on the machine with the width it passes."""
    op = "masked_adam_"
    n = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps, masks=masks)
    if any(len(v) != n for v in lists.values()):
        raise _err(op, "params, grads, exp_avgs, exp_avg_sqs, state_steps and masks need one tensor each per "
                       f"weight, got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(state_steps)} "
                       f"and {len(masks)}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise _err(op, f"amsgrad needs one max_exp_avg_sq per weight, got {len(max_exp_avg_sqs)} for {n} weights")
    if not amsgrad and len(max_exp_avg_sqs):
        raise _err(op, f"max_exp_avg_sqs are taken only with amsgrad, got {len(max_exp_avg_sqs)}")
    if vector_width <= 0:
        raise _err(op, f"vector_width must be positive, got {vector_width}")
    _check_bool_list(op, "masks", masks, dense=True)
    own = list(range(n))
    written = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                   max_exp_avg_sqs=max_exp_avg_sqs)
    for name, ts in written.items():
        _check_owned(op, name, ts, "owner", own[: len(ts)], "masks", masks, like_owner=True)
        _check_float32_cpu(op, name, ts)
    _check_list(op, "state_steps", state_steps)
    for i, s in enumerate(state_steps):
        if s.numel() != 1 or s.device.type != "cpu" or s.dtype not in (torch.float32, torch.float64):
            raise _err(op, f"state_steps[{i}] must be one float32 or float64 number on the CPU, got {s.dtype} of "
                           f"shape {list(s.shape)} on {s.device}")
    _check_no_alias(op, written, dict(masks=masks))
    for g, m in zip(grads, masks):
        _zero_where_not(g, m)
    for s in state_steps:
        s.add_(1)
    fused = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    if params:
        fused(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
              weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize)


def gather_channels_(tensor: Tensor, keep: Tensor, dim: int) -> None:
    """Compact ``tensor`` along ``dim`` (0 or 1) to the channels in sorted ``keep``.

    The result is written row-major into the first ``numel * len(keep) / shape[dim]``
    elements of the tensor's (contiguous) memory; the caller re-views that prefix.
    """
    op = "gather_channels_"
    if not isinstance(tensor, Tensor) or not isinstance(keep, Tensor):
        raise _err(op, "tensor and keep must be tensors", TypeError)
    if dim not in (0, 1):  # no negative dims: the native kernels take 0 or 1 only
        raise _err(op, f"dim must be 0 or 1, got {dim}")
    if tensor.dim() <= dim:
        raise _err(op, f"tensor has {tensor.dim()} dims, cannot gather along dim {dim}")
    if not tensor.is_contiguous():
        raise _err(op, "tensor must be contiguous")
    if keep.dtype != torch.int64 or keep.dim() != 1:
        raise _err(op, f"keep must be a 1-D int64 tensor, got {keep.dtype} of shape {list(keep.shape)}",
                   TypeError if keep.dtype != torch.int64 else ValueError)
    if not (keep.device.type == "cpu" or tensor.device.type == "cpu" or keep.device == tensor.device):
        raise _err(op, f"keep is on {keep.device} but tensor is on {tensor.device}")
    # sorted and unique: index_select would happily reorder or repeat channels
    kv = keep.detach().cpu()
    c = tensor.shape[dim]
    bad = ((kv < 0) | (kv >= c)).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise _err(op, f"keep[{j}]={int(kv[j])} is out of range [0, {c})")
    down = (kv[1:] <= kv[:-1]).nonzero()
    if down.numel():
        j = int(down[0]) + 1
        raise _err(op, f"keep must be strictly increasing (keep[{j}]={int(kv[j])} after {int(kv[j - 1])})")
    kept = tensor.index_select(dim, keep.to(tensor.device)).contiguous()
    tensor.view(-1)[: kept.numel()].copy_(kept.view(-1))
