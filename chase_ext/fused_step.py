"""Plain steps of a wrapped ``torch.optim.SGD``, ``Adam`` or ``AdamW`` in one pass over the
sparse weights (CPU).

On a plain step (no update, no channel event) ChaseOptimizer masks the
gradients and then lets the wrapped optimizer step (:mod:`chase_ext.grad_masking`). That is
a pass over every sparse weight's gradient and mask before the optimizer's own passes. Two
native ops do both in one pass, with the optimizer's roundings:

* ``masked_sgd_`` for ``torch.optim.SGD`` (its single-tensor rule, the CPU default: five
  elementwise passes, about 53 bytes moved per float32 slot, become one of 25 bytes). Each
  ``add(x, alpha=a)`` of that rule is the one fused multiply-add ATen's float32 kernels
  compute on AVX2 / AVX-512 CPUs.
* ``masked_adam_`` for ``torch.optim.Adam`` / ``AdamW`` with ``fused=True`` (torch's fused
  CPU kernel: masking plus that kernel move 37 bytes per slot, the op 33). It reproduces
  the kernel's roundings, which differ between its vector body and its scalar tail (the
  last ``numel % width`` slots of each tensor, ``width`` being ATen's vector width there).
  Adam without ``fused`` (torch's single-tensor rule) is not reproduced: its
  ``exp_avg_sq.sqrt()`` is MKL's on these builds, whose roundings are its own.

The weights, states and gradients come out bit for bit as the unfused path leaves them.
The op runs first (it checks all its arguments before writing anything); then the wrapped
optimizer steps every other parameter (biases, norms, dense layers), the sparse weights'
``.grad`` set to None for that call and restored after it.

Taken only where that equality is known, and otherwise the unfused path runs:

* the wrapped optimizer is exactly ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (not a
  subclass, ``step`` not replaced on the instance), with no step hooks of its own and no
  global optimizer hooks (and, for Adam, no ``grad_scale`` / ``found_inf`` set on it);
* the native backend on the CPU, every sparse weight float32 with a dense float32 gradient
  and float32 optimizer state (momentum buffer; exp_avg, exp_avg_sq, max_exp_avg_sq and a
  one-number step), all laid out like its mask; the first step, which creates the state,
  is left to the wrapped optimizer;
* SGD: each sparse weight's group has ``foreach`` and ``fused`` unset or False, with torch
  itself picking the single-tensor rule for ``foreach=None`` (on the CPU it does),
  ``differentiable`` False and plain numbers as settings; Adam: ``fused=True``,
  ``capturable`` and ``differentiable`` False, plain numbers as settings;
* the op equals the torch optimizer on this machine, checked once per kind of setting
  (and, for Adam, per vector width tried: 8, then 16) on random tensors whose lengths
  cover the vector body and the scalar tail of ATen's kernels: a CPU or torch build that
  rounds otherwise fails the check, and its plain steps stay unfused. A kind is what
  picks the branches of torch's rule and of the op (each setting zero or not, the flags,
  which side of 0.5 Adam's lerp weight ``1 - beta1`` lies on), not the values: the
  roundings of both depend only on those branches, so a scheduler that changes momentum
  or the betas every step (``OneCycleLR``, ``CyclicLR``) reuses the first check of its
  kind instead of probing again each step.

``CHASE_EXT_FUSED_STEP=0`` in the environment turns it off (read on every step).
"""
from __future__ import annotations

import numbers
import os
from typing import Any

import torch

from .grad_masking import has_step_hooks
from .layout import maskable_by

__all__ = ["plan", "step", "sgd_matches_torch", "adam_width"]

_SGD_SETTINGS = ("weight_decay", "momentum", "dampening", "nesterov", "maximize")
_ADAM_WIDTHS = (8, 16)  # ATen's float32 vector width for AVX2 and AVX-512 kernels
_checked: dict[tuple, Any] = {}  # probe results: SGD -> bool, Adam -> vector width or None


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _rule(opt: torch.optim.Optimizer) -> str | None:
    if type(opt) is torch.optim.SGD:
        return "sgd"
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def plan(chase: Any) -> list[tuple[str, dict, list[int]]] | None:
    """``[(rule, settings, indices of sparse weights), ...]`` per param group when this
    plain step may be fused (module docstring), else None. Host-side checks only."""
    opt = chase.optimizer
    rule = _rule(opt)
    # all sparse weights share one device (ChaseOptimizer._check_devices): the first one's says
    if rule is None or os.environ.get("CHASE_EXT_FUSED_STEP", "1") == "0" or chase.backend != "native" \
            or "step" in vars(opt) or has_step_hooks(opt) \
            or not hasattr(chase.ops, "masked_sgd_" if rule == "sgd" else "masked_adam_") or not chase._params \
            or chase._params[0].device.type != "cpu":
        return None
    if rule == "adam" and (getattr(opt, "grad_scale", None) is not None
                           or getattr(opt, "found_inf", None) is not None):
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
        s = _sgd_group(chase, grp, idx) if rule == "sgd" else _adam_group(chase, opt, grp, idx)
        if s is None:
            return None
        out.append((rule, s, idx))
    return out


def _state_ok(t: Any, mask: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32 and maskable_by(t, mask)


def _sgd_group(chase: Any, grp: dict, idx: list[int]) -> dict | None:
    if grp.get("foreach") or grp.get("fused") or grp.get("differentiable") \
            or not all(_number(grp.get(k)) for k in ("lr", "weight_decay", "momentum", "dampening")) \
            or not isinstance(grp.get("nesterov"), bool) or not isinstance(grp.get("maximize"), bool):
        return None
    if grp.get("foreach") is None and _torch_picks_foreach([chase._params[i] for i in idx]):
        return None  # torch would take its multi-tensor rule (nesterov writes .grad there)
    s = {k: grp[k] for k in _SGD_SETTINGS}
    if s["momentum"] != 0:
        state = chase.optimizer.state
        for i in idx:
            # the first step creates the buffers (a clone of the gradient): left to SGD
            if not _state_ok(state.get(chase._params[i], {}).get("momentum_buffer"), chase._mask_dict[chase._names[i]]):
                return None
    if not sgd_matches_torch(chase.ops, s):
        return None
    return dict(s, lr=grp["lr"])


def _adam_group(chase: Any, opt: torch.optim.Optimizer, grp: dict, idx: list[int]) -> dict | None:
    betas = grp.get("betas")
    if grp.get("fused") is not True or grp.get("capturable") or grp.get("differentiable") \
            or not all(_number(grp.get(k)) for k in ("lr", "eps", "weight_decay")) \
            or not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_number(b) for b in betas) \
            or not isinstance(grp.get("amsgrad"), bool) or not isinstance(grp.get("maximize"), bool):
        return None
    decoupled = grp.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW)
    if not isinstance(decoupled, bool):
        return None
    s = dict(beta1=betas[0], beta2=betas[1], eps=grp["eps"], weight_decay=grp["weight_decay"],
             amsgrad=grp["amsgrad"], maximize=grp["maximize"], decoupled_weight_decay=decoupled)
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if s["amsgrad"] else ())
    for i in idx:
        st = opt.state.get(chase._params[i], {})
        m = chase._mask_dict[chase._names[i]]
        step_t = st.get("step")
        if not all(_state_ok(st.get(k), m) for k in names) or not isinstance(step_t, torch.Tensor) \
                or step_t.numel() != 1 or step_t.device.type != "cpu" \
                or step_t.dtype not in (torch.float32, torch.float64):
            return None  # e.g. the first step, which creates the state: left to Adam
    width = adam_width(chase.ops, type(opt), s)
    if width is None:
        return None
    return dict(s, lr=grp["lr"], width=width)


def slow_default_adam(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> str | None:
    """A hint, or None: the wrapped optimizer is ``torch.optim.Adam`` / ``AdamW`` with its
    default (unfused) rule for float32 CPU sparse weights on a torch with MKL. That rule
    takes ``exp_avg_sq.sqrt()`` from MKL, several times slower on zeros, and a sparse
    model's optimizer state is mostly zeros (ResNet-50 at density 0.1: 2.2x the dense
    step, with or without Chase); with ``fused=True`` the step is torch's fused kernel,
    and Chase's plain step one op (``masked_adam_``)."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW) or not torch.backends.mkl.is_available():
        return None
    ids = {id(p) for p in params if p.device.type == "cpu" and p.dtype == torch.float32}
    slow = [g for g in opt.param_groups
            if any(id(p) in ids for p in g["params"]) and not g.get("fused") and not g.get("differentiable")]
    if not slow:
        return None
    name = type(opt).__name__
    return (f"ChaseOptimizer: torch.optim.{name} without fused=True on the CPU takes exp_avg_sq.sqrt() from MKL, "
            "several times slower on the zeros of a sparse model's optimizer state (ResNet-50 at density 0.1: "
            f"2.2x the dense step); torch.optim.{name}(..., fused=True) avoids it, and Chase then masks and steps "
            "the sparse weights in one op (README, 'Adam or AdamW on the CPU')")


def _torch_picks_foreach(params: list[torch.Tensor]) -> bool:
    """Whether ``torch.optim.SGD`` with ``foreach=None`` would take its multi-tensor rule
    for these parameters (it does not for CPU tensors in the torch versions seen; asked of
    torch itself where it says, assumed so where it does not)."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:
        return True
    return bool(_default_to_fused_or_foreach(params, False, False)[1])


def step(chase: Any, groups: list[tuple[str, dict, list[int]]], closure: Any = None):
    """The plain step (removed channels' bias gradients already masked): the op on the
    sparse weights of each group first (it checks every argument before writing anything),
    then the wrapped optimizer's step on every other parameter. Returns that step's result,
    or with ``closure`` (which ran already) its loss: the wrapped step itself gets no
    closure, as these optimizers only take the loss from it, so nothing can run it again."""
    params = chase._params
    masks = chase._mask_list()
    state = chase.optimizer.state
    for rule, s, idx in groups:
        ps = [params[i].detach() for i in idx]
        gs = [params[i].grad for i in idx]
        ms = [masks[i] for i in idx]
        if rule == "sgd":
            bufs = [state[params[i]]["momentum_buffer"] for i in idx] if s["momentum"] != 0 else []
            chase.ops.masked_sgd_(ps, gs, bufs, ms, s["lr"], s["weight_decay"], s["momentum"], s["dampening"],
                                  s["nesterov"], s["maximize"])
        else:
            sts = [state[params[i]] for i in idx]
            chase.ops.masked_adam_(ps, gs, [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                                   [st["max_exp_avg_sq"] for st in sts] if s["amsgrad"] else [],
                                   [st["step"] for st in sts], ms, s["lr"], s["beta1"], s["beta2"],
                                   s["weight_decay"], s["eps"], s["amsgrad"], s["maximize"],
                                   s["decoupled_weight_decay"], s["width"])
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None  # the optimizers skip parameters without a gradient
    try:
        loss = chase.optimizer.step()
    finally:
        for p, g in zip(params, grads):
            p.grad = g
    chase._fused_steps += 1
    return loss if closure is None else closure()


def _isa() -> str:
    return os.environ.get("CHASE_EXT_CPU_ISA", "")


def _sgd_kind(s: dict) -> tuple:
    """What picks the branches of SGD's rule and of ``masked_sgd_``: ``weight_decay``,
    ``momentum`` zero or not (``1 - dampening`` is an ``alpha``: any value, one rounding),
    ``nesterov``, ``maximize``."""
    return ("sgd", s["weight_decay"] != 0, s["momentum"] != 0, bool(s["nesterov"]), bool(s["maximize"]))


def _adam_kind(cls: type, s: dict) -> tuple:
    """What picks the branches of torch's fused Adam and of ``masked_adam_``: the class,
    weight decay zero or not, the flags, and the lerp's side of 0.5 (ATen's lerp takes
    ``a + w*(b - a)`` below it, ``b - (b - a)*(1 - w)`` otherwise). A weight within 1e-6
    of 0.5 keys on its value: which side the float arithmetic of each lands on is not
    worth reasoning about."""
    w = 1.0 - float(s["beta1"])
    side = w if abs(w - 0.5) < 1e-6 else w < 0.5
    return ("adam", cls.__name__, s["weight_decay"] != 0, side, bool(s["amsgrad"]), bool(s["maximize"]),
            bool(s["decoupled_weight_decay"]))


def sgd_matches_torch(ops: Any, settings: dict) -> bool:
    """Whether ``ops.masked_sgd_`` equals ``torch.optim.SGD`` (after masking the
    gradients) bit for bit on this machine for settings of this kind (``_sgd_kind``);
    checked once per kind and instruction set, on lengths that cover ATen's vector body
    and scalar tail, with the first settings of the kind met."""
    key = _sgd_kind(settings) + (_isa(),)
    if key not in _checked:
        _checked[key] = _sgd_probe(ops, settings)
    return _checked[key]


def adam_width(ops: Any, cls: type, settings: dict) -> int | None:
    """The vector width with which ``ops.masked_adam_`` equals ``cls(fused=True)`` (Adam or
    AdamW, after masking the gradients) bit for bit on this machine for settings of this
    kind (``_adam_kind``), or None; checked once per kind and instruction set, with the
    first settings of the kind met."""
    key = _adam_kind(cls, settings) + (_isa(),)
    if key not in _checked:
        _checked[key] = next((w for w in _ADAM_WIDTHS if _adam_probe(ops, cls, settings, w)), None)
    return _checked[key]


_PROBE_LENGTHS = (1, 7, 8, 9, 15, 16, 17, 33, 1027, 40_003)


def _probe_tensors(extra: int):
    """Weights, gradients, ``extra`` state tensors and masks over the probe lengths, with
    masked weights and state at 0 (ChaseOptimizer's invariant)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in _PROBE_LENGTHS:
        p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 3
        st = [torch.rand(n, generator=gen) * 0.1 for _ in range(extra)]
        m = torch.rand(n, generator=gen) < 0.5
        for t in [p] + st:
            t[~m] = 0
        out.append((p, g, st, m))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _sgd_probe(ops: Any, s: dict) -> bool:
    mom = s["momentum"]
    data = _probe_tensors(1)
    ps, gs, bs, ms = ([d[0] for d in data], [d[1] for d in data], [d[2][0] for d in data], [d[3] for d in data])
    lr = 0.0123
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
    return (all(_same(a, w.detach()) for a, w in zip(got, want))
            and all(_same(a, w) for a, w in zip(got_g, want_g))
            and (mom == 0 or all(_same(a, ref.state[w]["momentum_buffer"]) for a, w in zip(got_b, want))))


def _adam_probe(ops: Any, cls: type, s: dict, width: int) -> bool:
    ams = s["amsgrad"]
    data = _probe_tensors(3)
    lr = 0.0123
    kw = dict(lr=lr, betas=(s["beta1"], s["beta2"]), eps=s["eps"], weight_decay=s["weight_decay"], amsgrad=ams,
              maximize=s["maximize"], fused=True)
    if cls is torch.optim.Adam and s["decoupled_weight_decay"]:
        kw["decoupled_weight_decay"] = True
    want = [d[0].clone() for d in data]
    try:
        ref = cls(want, **kw)
    except (TypeError, ValueError, RuntimeError):  # e.g. a torch without fused CPU Adam
        return False
    for w, (_, g, st, m) in zip(want, data):
        w.grad = torch.where(m, g, torch.zeros(()))
        ref.state[w].update(step=torch.tensor(3.0), exp_avg=st[0].clone(), exp_avg_sq=st[1].clone(),
                            **({"max_exp_avg_sq": st[2].clone()} if ams else {}))
    got = [[t.clone() for t in (p, g, *st)] for p, g, st, _ in data]
    steps = [torch.tensor(3.0) for _ in data]
    try:
        with torch.no_grad():
            ref.step()
            ops.masked_adam_([t[0] for t in got], [t[1] for t in got], [t[2] for t in got], [t[3] for t in got],
                             [t[4] for t in got] if ams else [], steps, [d[3] for d in data], lr, s["beta1"],
                             s["beta2"], s["weight_decay"], s["eps"], ams, s["maximize"],
                             s["decoupled_weight_decay"], width)
    except RuntimeError:
        return False
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if ams else ())
    return all(
        _same(t[0], w.detach()) and _same(t[1], w.grad) and _same(st, ref.state[w]["step"])
        and all(_same(t[2 + j], ref.state[w][k]) for j, k in enumerate(names))
        for t, st, w in zip(got, steps, want))
