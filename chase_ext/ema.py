"""Copies of the model that must follow its slims: EMA / weight averaging.

``torch.optim.swa_utils.AveragedModel`` (EMA, SWA) and timm's ``ModelEmaV2``/``V3`` keep a
deep copy of the model and update it from the model's parameters, pairing them in order.
Once a slim shrinks the model, the copy is wider and its update fails on the first
mismatched shape. :func:`follow_slims` slims the copy the same way, keeping the same
channels (an averaged weight stays the average of what the model now keeps)::

    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ...
        chase.step()
        chase_ext.ema.follow_slims(ema, chase)   # a no-op unless chase slimmed since
        ema.update_parameters(model)

The copy's widths tell which of the ChaseOptimizer's slims it has seen (every slim removes
at least one channel), so a copy made at any point, before or after some slims, catches up.
"""
from __future__ import annotations

import torch
from torch import nn

from .groups import at_widths
from .slim import slim_
from .wrappers import unwrap_model

__all__ = ["follow_slims"]


def _inner(copy: nn.Module) -> nn.Module:
    # AveragedModel and timm's ModelEma keep the copy in .module (as DDP does) and have no
    # parameters of their own; a model with a submodule called "module" is not such a wrapper
    inner = getattr(copy, "module", None)
    if isinstance(inner, nn.Module) and len(list(copy.parameters())) == len(list(inner.parameters())):
        copy = inner
    return unwrap_model(copy)


def _widths(model: nn.Module, groups) -> list[int]:
    mods = dict(model.named_modules())
    out = []
    for g in groups:
        m = mods.get(g.producers[0])
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"follow_slims: the copy has no layer {g.producers[0]!r} with a weight "
                             "(it must be built like the model the ChaseOptimizer drives)")
        out.append(int(w.shape[0]))
    return out


def follow_slims(copy: nn.Module, chase) -> nn.Module:
    """Slim ``copy`` (an averaged / EMA copy of ``chase.model``, or its wrapper) to the
    channels ``chase`` kept; returns ``copy``. Raises ``ValueError`` when the copy's widths
    match no point of the ChaseOptimizer's slim history."""
    from .optimizer import ChaseOptimizer

    if not isinstance(chase, ChaseOptimizer):
        raise TypeError(f"chase must be a chase_ext.ChaseOptimizer, got {type(chase).__name__}")
    target = _inner(copy)
    if target is chase.model:
        raise ValueError("follow_slims: this is the model the ChaseOptimizer drives, not a copy of it")
    if chase._ch is None or not chase._ch.slim_records:
        return copy
    groups, records = chase.groups, chase._ch.slim_records
    widths = list(chase._ch.channels)  # the widths after 0, 1, ... slims
    history = [list(widths)]
    for rec in records:
        widths = [w if k is None else len(k) for w, k in zip(widths, rec)]
        history.append(list(widths))
    have = _widths(target, groups)
    if have not in history:
        raise ValueError(f"follow_slims: the copy's widths {have} match no point of the slim history "
                         f"(from {history[0]} to {history[-1]}): is it a copy of this ChaseOptimizer's model?")
    seen = len(history) - 1 - history[::-1].index(have)
    with torch.no_grad():
        for rec, widths in zip(records[seen:], history[seen:]):  # concatenation readers' offsets at those widths
            slim_(target, at_widths(groups, widths),
                  [None if k is None else torch.as_tensor(k, dtype=torch.int64) for k in rec])
    return copy
