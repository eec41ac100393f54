"""Plain steps of a wrapped ``torch.optim.SGD`` in one pass over the sparse weights (CPU).

On a plain step (no update, no channel event, no closure) ChaseOptimizer masks the
gradients and then lets the wrapped optimizer step (:mod:`chase_ext.grad_masking`). For
``torch.optim.SGD`` on the CPU that is five elementwise passes over every sparse weight:
the masking, then ``grad + wd * w`` into a new tensor, ``buf * momentum``,
``buf + grad``, ``w - lr * buf`` (about 53 bytes moved per float32 slot). The native op
``masked_sgd_`` does the same arithmetic in one pass (25 bytes): it zeroes masked
gradients and applies SGD's rule with the same roundings, each ``add(x, alpha=a)`` as the
one fused multiply-add that ATen's float32 kernels compute on AVX2 / AVX-512 CPUs. The
weights, momentum buffers and gradients come out bit for bit as the unfused path leaves
them. The op runs first (it checks all its arguments before writing anything); then
the wrapped optimizer steps every other parameter (biases, norms, dense layers), the
sparse weights' ``.grad`` set to None for that call and restored after it.

Taken only where that equality is known, and otherwise the unfused path runs:

* the wrapped optimizer is exactly ``torch.optim.SGD`` (not a subclass, ``step`` not
  replaced on the instance), with no step hooks of its own and no global optimizer hooks;
* the native backend on the CPU, every sparse weight float32 with a dense float32
  gradient and (with momentum) a float32 momentum buffer, all laid out like its mask;
* each sparse weight's group has ``foreach`` and ``fused`` unset or False, with torch
  itself picking the single-tensor rule for ``foreach=None`` (the rule reproduced; on
  the CPU it does), ``differentiable`` False, and plain numbers for ``lr``,
  ``weight_decay``, ``momentum`` and ``dampening``;
* the op equals ``torch.optim.SGD`` on this machine, checked once per setting (weight
  decay, momentum, dampening, nesterov, maximize) on random tensors whose lengths cover the
  vector body and the scalar tail of ATen's kernels: a CPU where ATen's kernels round
  otherwise (no FMA) fails the check, and its plain steps stay unfused.

``CHASE_EXT_FUSED_SGD=0`` in the environment turns it off (read on every step).
"""
from __future__ import annotations

import numbers
import os
from typing import Any

import torch

from .grad_masking import has_step_hooks
from .layout import maskable_by

__all__ = ["plan", "step", "matches_torch"]

_SETTINGS = ("weight_decay", "momentum", "dampening", "nesterov", "maximize")
_checked: dict[tuple, bool] = {}


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def plan(chase: Any) -> list[tuple[dict, list[int]]] | None:
    """``[(settings, indices of sparse weights), ...]`` per param group when this plain
    step may be fused (module docstring), else None. Host-side checks only."""
    opt = chase.optimizer
    # all sparse weights share one device (ChaseOptimizer._check_devices): the first one's says
    if os.environ.get("CHASE_EXT_FUSED_SGD", "1") == "0" or chase.backend != "native" \
            or type(opt) is not torch.optim.SGD or "step" in vars(opt) or has_step_hooks(opt) \
            or not hasattr(chase.ops, "masked_sgd_") or not chase._params \
            or chase._params[0].device.type != "cpu":
        return None
    group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
    by_group: dict[int, list[int]] = {}
    for i, (n, p) in enumerate(zip(chase._names, chase._params)):
        gi = group_of.get(id(p))
        m, g = chase._mask_dict[n], p.grad
        if gi is None or p.dtype != torch.float32 or g is None or g.is_sparse \
                or g.dtype != torch.float32 or g.requires_grad or not maskable_by(g, m) or not maskable_by(p, m):
            return None
        by_group.setdefault(gi, []).append(i)
    out = []
    for gi, idx in by_group.items():
        grp = opt.param_groups[gi]
        if grp.get("foreach") or grp.get("fused") or grp.get("differentiable") \
                or not all(_number(grp.get(k)) for k in ("lr", "weight_decay", "momentum", "dampening")) \
                or not isinstance(grp.get("nesterov"), bool) or not isinstance(grp.get("maximize"), bool):
            return None
        if grp.get("foreach") is None and _torch_picks_foreach([chase._params[i] for i in idx]):
            return None  # torch would take its multi-tensor rule (nesterov writes .grad there)
        s = {k: grp[k] for k in _SETTINGS}
        if s["momentum"] != 0:
            for i in idx:
                buf = opt.state.get(chase._params[i], {}).get("momentum_buffer")
                # the first step creates the buffers (a clone of the gradient): left to SGD
                if buf is None or buf.dtype != torch.float32 \
                        or not maskable_by(buf, chase._mask_dict[chase._names[i]]):
                    return None
        if not matches_torch(chase.ops, s):
            return None
        out.append((dict(s, lr=grp["lr"]), idx))
    return out


def _torch_picks_foreach(params: list[torch.Tensor]) -> bool:
    """Whether ``torch.optim.SGD`` with ``foreach=None`` would take its multi-tensor rule
    for these parameters (it does not for CPU tensors in the torch versions seen; asked of
    torch itself where it says, assumed so where it does not)."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:
        return True
    return bool(_default_to_fused_or_foreach(params, False, False)[1])


def step(chase: Any, groups: list[tuple[dict, list[int]]]):
    """The plain step (removed channels' bias gradients already masked): ``masked_sgd_``
    on the sparse weights first (it checks every argument before writing anything), then
    the wrapped SGD's step on every other parameter. Returns the wrapped step's result."""
    params = chase._params
    masks = chase._mask_list()
    state = chase.optimizer.state
    for s, idx in groups:
        bufs = [state[params[i]]["momentum_buffer"] for i in idx] if s["momentum"] != 0 else []
        chase.ops.masked_sgd_([params[i].detach() for i in idx], [params[i].grad for i in idx], bufs,
                              [masks[i] for i in idx], s["lr"], s["weight_decay"], s["momentum"], s["dampening"],
                              s["nesterov"], s["maximize"])
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None  # SGD skips parameters without a gradient
    try:
        loss = chase.optimizer.step()
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    chase._fused_sgd_steps += 1
    return loss


def matches_torch(ops: Any, settings: dict) -> bool:
    """Whether ``ops.masked_sgd_`` equals ``torch.optim.SGD`` (after masking the
    gradients) bit for bit on this machine for these settings; checked once per setting
    and instruction set, on lengths that cover ATen's vector body and scalar tail."""
    key = (tuple(float(settings[k]) for k in _SETTINGS), os.environ.get("CHASE_EXT_CPU_ISA", ""))
    if key not in _checked:
        _checked[key] = _probe(ops, settings)
    return _checked[key]


def _probe(ops: Any, s: dict) -> bool:
    gen = torch.Generator().manual_seed(0)
    lens = (1, 7, 16, 33, 1027, 40_003)
    ps = [torch.randn(n, generator=gen) for n in lens]
    gs = [torch.randn(n, generator=gen) * 3 for n in lens]
    bs = [torch.randn(n, generator=gen) for n in lens]
    ms = [torch.rand(n, generator=gen) < 0.5 for n in lens]
    for p, b, m in zip(ps, bs, ms):  # the invariant: masked weights and state are 0
        p[~m] = 0
        b[~m] = 0
    lr, mom = 0.0123, s["momentum"]
    want = [p.clone() for p in ps]
    want_g = [torch.where(m, g, torch.zeros(())) for g, m in zip(gs, ms)]
    for w, g in zip(want, want_g):
        w.grad = g.clone()
    ref = torch.optim.SGD(want, lr=lr, weight_decay=s["weight_decay"], momentum=mom, dampening=s["dampening"],
                          nesterov=s["nesterov"], maximize=s["maximize"], foreach=False)
    if mom != 0:
        for w, b in zip(want, bs):
            ref.state[w]["momentum_buffer"] = b.clone()
    with torch.no_grad():
        ref.step()
        got, got_g, got_b = [p.clone() for p in ps], [g.clone() for g in gs], [b.clone() for b in bs]
        ops.masked_sgd_(got, got_g, got_b if mom != 0 else [], ms, lr, s["weight_decay"], mom, s["dampening"],
                        s["nesterov"], s["maximize"])

    def same(a, b):
        return torch.equal(a.view(torch.int32), b.view(torch.int32))

    return (all(same(a, w.detach()) for a, w in zip(got, want))
            and all(same(a, w) for a, w in zip(got_g, want_g))
            and (mom == 0 or all(same(a, ref.state[w]["momentum_buffer"]) for a, w in zip(got_b, want))))
