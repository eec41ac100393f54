"""Any parameter memory layout in front of kernels that take some layouts only.

SPEC §1 breaks ties by the row-major index, and the sums of ``channel_stats`` depend on
their order, so each op of ``chase_ext._C`` takes the layouts it can read in row-major
terms (below), contiguous tensors always. Parameters need not be contiguous:
``model.to(memory_format=torch.channels_last)``, the fast layout for convolutions on GPUs,
gives a conv weight (O, I, kh, kw) the strides (I·kh·kw, 1, kw·I, I). ``ChaseOptimizer``
calls the ops through this module:

- ``masked_apply_`` runs every step and is elementwise, so the memory order does not
  matter: the op itself takes any dense mask with tensors laid out like it and runs over
  their flat storage, so a weight, its mask and its optimizer state that share one dense
  layout (channels_last, say) are handed over as they are. Only a tensor laid out unlike
  its mask (or a mask that is not dense) goes through a copy, written back.
- ``mask_update_`` breaks ties by the row-major index, whatever the memory order: it
  takes each weight laid out with dim 0 outermost (each output channel one block of
  memory: contiguous, channels_last, any order of the other dims) and its score, mask and
  states laid out like it. The CPU kernel walks such tensors in place (the row-major
  index of each slot from a per-tensor table); on CUDA the op copies the non-contiguous
  ones itself. Other layouts (a transposed Linear weight, a mask or state laid out unlike
  its weight) go through contiguous copies here, written back after the kernel returned;
  a score laid out unlike its weight (random growth) is copied into the weight's layout.
- ``channel_stats`` (channel events) sums each row in row-major order whatever the
  memory order, so it takes the layouts ``mask_update_`` takes for its weights, each mask
  laid out like its weight: the CPU kernel gathers a row held in another order into a
  row buffer first; on CUDA the op copies the non-contiguous ones itself. Other layouts go
  through contiguous copies here.

A kernel that raises has written nothing, and then nothing is copied back either. The
extra memory is one contiguous copy of each staged tensor, for the duration of the call.

With everything contiguous (the default layout) each wrapper is a plain call.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["dense_order", "same_layout", "same_flat_layout", "rows_dense", "maskable_by", "like",
           "masked_apply_", "mask_update_", "channel_stats"]


def dense_order(t: Tensor) -> list[int] | None:
    """Dims from outermost to innermost in memory, if ``t`` covers its memory densely.

    ``t.permute(order)`` is then a contiguous view. None for overlapping or gappy tensors.
    """
    if t.is_contiguous():
        return list(range(t.dim()))
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


def _same_order(ts: Sequence[Tensor], order: list[int]) -> bool:
    return all(t.shape == ts[0].shape and t.permute(order).is_contiguous() for t in ts)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and same memory order (strides of size-1 dims do not matter)."""
    if a.stride() == b.stride():
        return a.shape == b.shape
    order = dense_order(b)
    return order is not None and _same_order([b, a], order)


def same_flat_layout(a: Tensor, b: Tensor) -> bool:
    """Same strides on every dim of more than one entry: element (i, j, ...) sits at the
    same offset in both, so the storage of one masks the storage of the other slot by slot
    (the rule of ``masked_apply_``; shapes are compared apart). Empty tensors address
    nothing, so any two of them agree."""
    if a.stride() == b.stride() or (a.numel() == 0 and b.numel() == 0):
        return True
    return a.dim() == b.dim() and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def maskable_by(t: Tensor, mask: Tensor) -> bool:
    """``mask`` can mask ``t`` in place through the flat-storage ops: same shape, same
    device, same flat layout."""
    return t.shape == mask.shape and t.device == mask.device and same_flat_layout(t, mask)


def rows_dense(t: Tensor) -> bool:
    """Covers its memory densely with dim 0 outermost, so each row (output channel) is one
    block of memory, its slots in any order (contiguous, channels_last, ...): the weight
    layouts ``mask_update_`` takes."""
    if t.numel() == 0 or t.dim() == 0:
        return True
    return _dense(t) and (t.shape[0] == 1 or t.stride(0) * t.shape[0] == t.numel())


def _dense(t: Tensor) -> bool:
    """Covers its memory densely; the common layouts are checked without ``dense_order``."""
    return (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or dense_order(t) is not None)


def like(src: Tensor, ref: Tensor) -> Tensor:
    """``src`` laid out in memory like ``ref``; ``src`` itself if it already is, or if
    ``ref`` is not dense. Of the same shape, ``src`` gets the very strides of ``ref``, not
    just its dim order: a 1x1 conv weight is contiguous in either order, and equal strides
    let the per-step layout checks stop at one comparison. Of another shape (a slimmed
    tensor), it gets the dim order of ``ref``."""
    if src.stride() == ref.stride():
        return src
    order = dense_order(ref)
    if order is None:
        return src
    if src.shape == ref.shape:
        out = torch.empty_strided(ref.shape, ref.stride(), dtype=src.dtype, device=src.device)
        return out.copy_(src)
    if _same_order([src], order):
        return src
    inv = sorted(range(len(order)), key=order.__getitem__)
    return src.permute(order).contiguous().permute(inv)


class _Staged:
    """Contiguous stand-ins for tensors; ``write_back`` copies them into the originals."""

    def __init__(self, ts: Sequence[Tensor]):
        self.orig = list(ts)
        self.ts = [t if t.is_contiguous() else t.contiguous() for t in ts]

    def write_back(self) -> None:
        for o, s in zip(self.orig, self.ts):
            if s is not o:
                o.copy_(s)


def _all_contiguous(*lists: Sequence[Tensor]) -> bool:
    return all(t.is_contiguous() for ts in lists for t in ts)


def masked_apply_(ops, tensors: list[Tensor], masks: list[Tensor], owner: list[int]) -> None:
    """``ops.masked_apply_`` for any layouts: a plain call when each tensor is laid out like
    its mask (the usual case: masks follow their parameter's layout, and optimizer state
    is created like its parameter); otherwise through copies in the mask's layout."""
    if all(_dense(m) for m in masks) and all(
            0 <= o < len(masks) and same_flat_layout(t, masks[o]) for t, o in zip(tensors, owner)):
        ops.masked_apply_(tensors, masks, owner)
        return
    ms = [m if _dense(m) else m.contiguous() for m in masks]
    ts, copied = list(tensors), []
    for i, (t, o) in enumerate(zip(tensors, owner)):
        # bad arguments (owner out of range, another shape) go to the op as they are: it names them
        if 0 <= o < len(ms) and t.shape == ms[o].shape and not same_flat_layout(t, ms[o]):
            ts[i] = like(t, ms[o])
            copied.append(i)
    ops.masked_apply_(ts, ms, owner)
    for i in copied:
        tensors[i].copy_(ts[i])


def channel_stats(ops, weights: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``ops.channel_stats``, directly when it takes the layouts (each weight rows-dense,
    its mask laid out like it: the usual case), else on contiguous copies."""
    if _all_contiguous(weights, masks) or _taken_as_is(weights, masks, [], []):
        return ops.channel_stats(weights, masks)
    return ops.channel_stats(_Staged(weights).ts, _Staged(masks).ts)


def _taken_as_is(weights, masks, states, state_owner) -> bool:
    """``mask_update_`` and ``channel_stats`` take the tensors as they are: each weight
    rows-dense, its mask and states laid out like it."""
    if not all(rows_dense(w) for w in weights):
        return False
    pairs = list(zip(masks, weights)) + [(t, weights[o]) for t, o in zip(states, state_owner) if 0 <= o < len(weights)]
    return all(t.shape == w.shape and same_flat_layout(t, w) for t, w in pairs)


def mask_update_(ops, weights, masks, scores, live_rows, live_cols, states, state_owner,
                 prune_counts, grow_counts) -> None:
    """``ops.mask_update_``, directly when it takes the written tensors' layouts (the usual
    case: masks and optimizer state follow their parameter's layout), with any score laid
    out unlike its weight (random growth scores) copied into the weight's layout;
    otherwise on contiguous copies, weights, masks and states written back."""
    if _all_contiguous(weights, masks, scores, states):
        ops.mask_update_(weights, masks, scores, live_rows, live_cols, states, state_owner,
                         prune_counts, grow_counts)
        return
    if _taken_as_is(weights, masks, states, state_owner):
        # bad arguments (another shape, a list too short) go to the op as they are: it names them
        scores = [like(s, w) if s.shape == w.shape and not same_flat_layout(s, w) else s
                  for s, w in zip(scores, weights)] + list(scores[len(weights):])
        ops.mask_update_(weights, masks, scores, live_rows, live_cols, states, state_owner,
                         prune_counts, grow_counts)
        return
    w, m, s = _Staged(weights), _Staged(masks), _Staged(states)
    ops.mask_update_(w.ts, m.ts, _Staged(scores).ts, live_rows, live_cols, s.ts, state_owner,
                     prune_counts, grow_counts)
    for st in (w, m, s):
        st.write_back()
