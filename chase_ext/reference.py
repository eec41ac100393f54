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

__all__ = [
    "sortable_key",
    "select_threshold",
    "selected",
    "mask_update_",
    "channel_stats",
    "masked_apply_",
    "gather_channels_",
    "live_slots",
]

KEY_MAX = 2**32 - 1


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


def _check_k(name: str, k: int, available: int) -> None:
    if k < 0 or k > available:
        raise ValueError(f"{name}={k} is out of range: only {available} candidate slots")


def _check_finite(name: str, ts) -> None:
    for i, t in enumerate(ts):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}[{i}] has non-finite values")


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
    _check_finite("keys", keys)
    live = _live_list(keys, live_rows, live_cols)
    cand = [(m == mask_value) & l for m, l in zip(masks, live)]
    gidx = _gidx(keys)
    flat_keys = torch.cat([sortable_key(x, absolute).flatten()[c.flatten()] for x, c in zip(keys, cand)]) if keys else torch.zeros(0, dtype=torch.int64)
    flat_idx = torch.cat([g.flatten()[c.flatten()] for g, c in zip(gidx, cand)]) if keys else torch.zeros(0, dtype=torch.int64)
    _check_k("k", k, flat_keys.numel())
    key, cutoff = _select(flat_keys, flat_idx, k, largest)
    return torch.tensor([key, cutoff], dtype=torch.int64)


def _select_scoped(key_list, cand_list, gidx_list, counts, largest, name):
    """Selections for global scope (one count) or per-tensor scope (one per tensor)."""
    if len(counts) == 1:
        keys = torch.cat([k.flatten()[c.flatten()] for k, c in zip(key_list, cand_list)])
        idx = torch.cat([g.flatten()[c.flatten()] for g, c in zip(gidx_list, cand_list)])
        _check_k(name, counts[0], keys.numel())
        sel = _select(keys, idx, counts[0], largest)
        return [sel] * len(key_list)
    out = []
    for t, (k, c, g) in enumerate(zip(key_list, cand_list, gidx_list)):
        keys, idx = k.flatten()[c.flatten()], g.flatten()[c.flatten()]
        _check_k(f"{name}[{t}]", counts[t], keys.numel())
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
    """
    n = len(weights)
    if len(prune_counts) not in (1, n) or len(grow_counts) != len(prune_counts):
        raise ValueError("prune_counts and grow_counts must both hold 1 or len(weights) counts")
    _check_finite("weights", weights)
    _check_finite("scores", scores)
    live = _live_list(weights, live_rows, live_cols)
    gidx = _gidx(weights)
    old = [m.clone() for m in masks]
    wkeys = [sortable_key(w, True) for w in weights]
    skeys = [sortable_key(s, True) for s in scores]
    cand_p = [o & l for o, l in zip(old, live)]
    sel_p = _select_scoped(wkeys, cand_p, gidx, list(prune_counts), False, "prune_counts")
    pruned = [c & selected(k, g, *s, largest=False) for c, k, g, s in zip(cand_p, wkeys, gidx, sel_p)]
    after = [o & ~p for o, p in zip(old, pruned)]
    cand_g = [~a & l for a, l in zip(after, live)]
    sel_g = _select_scoped(skeys, cand_g, gidx, list(grow_counts), True, "grow_counts")
    new = [a | (c & selected(k, g, *s, largest=True)) for a, c, k, g, s in zip(after, cand_g, skeys, gidx, sel_g)]
    for w, m, o, nm in zip(weights, masks, old, new):
        keep = o & nm
        w.masked_fill_(~keep, 0)
        m.copy_(nm)
    for s, owner in zip(states, state_owner):
        s.masked_fill_(~(old[owner] & new[owner]), 0)
    return channel_stats(weights, masks)


def channel_stats(weights: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per output channel (dim 0) of each weight: active count and Σ|w| over active slots."""
    if not weights:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    counts, sums = [], []
    for w, m in zip(weights, masks):
        rows = w.shape[0] if w.dim() > 0 else 1  # a 0-dim tensor is one row
        per_row = w.numel() // rows if rows else 0
        counts.append(m.reshape(rows, per_row).sum(1, dtype=torch.int64))
        sums.append((w.detach().float().abs() * m).reshape(rows, per_row).sum(1, dtype=torch.float32))
    return torch.cat(counts), torch.cat(sums)


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def masked_apply_(tensors: list[Tensor], masks: list[Tensor], owner: list[int]) -> None:
    """``tensors[i] <- where(masks[owner[i]], tensors[i], 0)`` for every i."""
    for t, o in zip(tensors, owner):
        # on the integer view: zero bits are +0.0 in every float format, and masked_fill_
        # has no float8 kernels
        t.view(_SAME_WIDTH_INT[t.element_size()]).masked_fill_(~masks[o], 0)


def gather_channels_(tensor: Tensor, keep: Tensor, dim: int) -> None:
    """Compact ``tensor`` along ``dim`` (0 or 1) to the channels in sorted ``keep``.

    The result is written row-major into the first ``numel * len(keep) / shape[dim]``
    elements of the tensor's (contiguous) memory; the caller re-views that prefix.
    """
    kept = tensor.index_select(dim, keep.to(tensor.device)).contiguous()
    tensor.view(-1)[: kept.numel()].copy_(kept.view(-1))
