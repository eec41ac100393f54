"""What ChaseOptimizer may assume about the optimizer it wraps, to move fewer bytes.

Two questions, answered per step from the optimizer's class and settings; an optimizer
not listed here (another class, a subclass, which may override ``step``) gets the answer
that is always right, at the old cost.

**Does a slot whose weight, gradient and state are all exactly 0 stay exactly 0 through
a step?** (:func:`keeps_zero_slots`) Then, with masked weights and their state at 0 (the
invariant ChaseOptimizer keeps: construction, checkpoint loads, update steps, channel
events and every other step end with them zeroed), a plain step can zero the masked
*gradients* before the wrapped step instead of masked weights and every same-shape state
after it: the mask plus one tensor read and written instead of two or three (SGD with
momentum, Adam). The weights and states come out bit for bit the same, since these
optimizers are elementwise. Worked out from the update rules (``tests/test_grad_masking.py``
checks each, with every option below):

* ``SGD``, any settings (momentum, dampening, nesterov, weight decay, maximize):
  ``buf = μ·0 + (1-d)·0``, ``w = 0 - lr·0``;
* ``Adam``, ``AdamW``, ``NAdam``, ``RAdam`` (amsgrad, weight decay, maximize), ``RMSprop``
  (momentum, centered), ``Adadelta``: ``eps > 0``, as the step divides 0 by
  ``sqrt(0) + eps`` (``eps = 0`` makes it 0/0); ``eps`` must stay above 0 in the weights'
  dtype, where that sum is computed: float16 rounds Adam's default 1e-8 to 0;
* ``Adagrad``: ``eps > 0`` (the same way) and ``initial_accumulator_value == 0`` (its state
  starts there).

Not listed because a zero slot moves: ``Adamax`` (its infinity norm becomes ``eps``),
``Rprop`` (its step sizes start at ``lr``), ``LBFGS`` and ``SparseAdam`` (not elementwise
on dense gradients). Those keep masking weights and state after the step. A step with a
closure is no exception: ChaseOptimizer runs the closure before the wrapped step, and the
listed optimizers call it once, getting that loss back; a wrapped step that evaluates it
again (new, unmasked gradients) makes that step mask weights and state after it.

**Does the step leave ``.grad`` unchanged?** (:func:`leaves_gradients_alone`) Then an
update step can hand the gradients to the mask update as growth scores as they are (the
op ranks by ``|score|``) instead of copying them before the wrapped step. Not so for
every optimizer: ``SGD(nesterov=True)`` on its multi-tensor path adds the momentum into
the gradients in place, fused kernels may write unscaled gradients back, and a weight
decay given as a tensor that requires grad is applied in place. So only these are listed:
``SGD`` without nesterov, ``Adam`` / ``AdamW``, each without ``fused`` and with a number as
weight decay. ChaseOptimizer still checks the gradients' version counters after the step.
"""
from __future__ import annotations

import numbers
import struct

import torch
import torch.optim.optimizer as _optim_module  # the global step hooks

__all__ = ["keeps_zero_slots", "leaves_gradients_alone", "has_step_hooks"]

_O = torch.optim
# class -> group settings that must be > 0
_ZERO_SAFE: dict[type, tuple[str, ...]] = {
    _O.SGD: (),
    _O.Adam: ("eps",),
    _O.AdamW: ("eps",),
    _O.NAdam: ("eps",),
    _O.RAdam: ("eps",),
    _O.RMSprop: ("eps",),
    _O.Adadelta: ("eps",),
    _O.Adagrad: ("eps",),
}


def _positive(v, dtype: torch.dtype | None) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 and (dtype is None or _survives(v, dtype))


def _survives(v: float, dtype: torch.dtype) -> bool:
    """``v`` (> 0) is still > 0 as a ``dtype`` number (float16 rounds 1e-8 to 0). A number
    reaches float16 / bfloat16 through float32 (torch's arithmetic type for them), and
    survives when that float32 is above half the smallest subnormal of ``dtype`` (half
    rounds to 0, ties to even). Computed without a tensor, so that plain steps read no
    scalar off any device."""
    fi = torch.finfo(dtype)
    if v >= fi.max:
        return True
    if fi.bits <= 32:  # float64 (the reference backend's) takes the number as it is
        v = struct.unpack("f", struct.pack("f", v))[0]
    return v > fi.tiny * fi.eps / 2


def keeps_zero_slots(opt: torch.optim.Optimizer, dtype: torch.dtype | None = None) -> bool:
    """A slot with weight, gradient and state exactly 0 stays exactly 0 through ``opt.step()``,
    for weights of ``dtype`` (None: settings checked as numbers only)."""
    need = _ZERO_SAFE.get(type(opt))
    if need is None:
        return False
    for g in opt.param_groups:
        if not all(_positive(g.get(k), dtype) for k in need):
            return False
        if type(opt) is _O.Adagrad and g.get("initial_accumulator_value", 0) != 0:
            return False
    return True


def leaves_gradients_alone(opt: torch.optim.Optimizer) -> bool:
    """``opt.step()`` reads the gradients and writes none of them."""
    kind = type(opt)
    if kind not in (_O.SGD, _O.Adam, _O.AdamW):
        return False
    for g in opt.param_groups:
        if g.get("fused") or isinstance(g.get("weight_decay", 0), torch.Tensor):
            return False
        if kind is _O.SGD and g.get("nesterov"):
            return False
    return True


def has_step_hooks(opt: torch.optim.Optimizer) -> bool:
    """A step pre- or post-hook on ``opt`` or a global one: code that may read or write
    gradients and state around the wrapped step."""
    glob = _optim_module
    return any((getattr(opt, "_optimizer_step_pre_hooks", None), getattr(opt, "_optimizer_step_post_hooks", None),
                getattr(glob, "_global_optimizer_pre_hooks", None), getattr(glob, "_global_optimizer_post_hooks", None)))
