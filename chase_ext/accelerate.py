"""Hugging Face accelerate: re-wrapping the prepared model after a slim, resuming slimmed states.

``accelerator.prepare(model, chase, loader)`` takes a ``ChaseOptimizer`` like any optimizer
(built on the bare model before ``prepare``); ``accelerator.backward``, gradient
accumulation (``Accelerator(gradient_accumulation_steps=n)`` with ``accelerator.accumulate``:
the optimizer steps once per ``n`` batches, so ``chase.t`` counts real steps) and mixed
precision (``mixed_precision="bf16"``, tested on the CPU; ``"fp16"`` goes through
``GradScaler``, which ``ChaseOptimizer`` supports, not tested with accelerate) need nothing more. A run that slims
during training needs two things from this module::

    chase_ext.accelerate.enable_slimmed_resume(accelerator, chase)   # once, after prepare
    ...
        chase.step()            # or the prepared optimizer's step()
        model = chase_ext.accelerate.rewrap(accelerator, model, chase)
    ...
    accelerator.load_state(folder)
    model = chase_ext.accelerate.rewrap(accelerator, model, chase)

* :func:`rewrap`: under several processes ``prepare`` wraps the model in
  ``DistributedDataParallel``, which cannot follow shrinking parameters; this builds a new
  wrapper when the ChaseOptimizer slimmed since the last one (else returns ``model``) and puts it
  in the accelerator's place of the old one (``save_state``, ``unwrap_model`` and
  ``accumulate`` then use it). A no-op for a model that is not wrapped (one process).
* :func:`enable_slimmed_resume`: ``accelerator.load_state`` loads the model's weights before
  the optimizer's state, so the narrower weights of a slimmed run do not fit a freshly built
  full-width model. The hook registered here loads the ChaseOptimizer's state from the same
  folder first (which replays the slims, as in a plain resume); then ``load_state`` goes on
  as usual (loading that state once more changes nothing).
"""
from __future__ import annotations

import os

from .distributed import rewrap_ddp
from .optimizer import ChaseOptimizer
from .wrappers import unwrap_model

__all__ = ["rewrap", "enable_slimmed_resume"]


def _inner(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer keeps the real one there


def _check_chase(accelerator, chase) -> int:
    if not isinstance(chase, ChaseOptimizer):
        chase = _inner(chase)  # the prepared (wrapped) optimizer is accepted too
    if not isinstance(chase, ChaseOptimizer):
        raise TypeError(f"chase must be a chase_ext.ChaseOptimizer, got {type(chase).__name__}")
    for i, opt in enumerate(accelerator._optimizers):
        if _inner(opt) is chase:
            return i
    raise ValueError("the ChaseOptimizer was not prepared by this accelerator (accelerator.prepare(model, chase, ...))")


def rewrap(accelerator, model, chase):
    """``model``, or a new DDP wrapper around the same module when ``chase`` slimmed since
    ``model`` was built; the accelerator's own reference follows."""
    from torch.nn.parallel import DistributedDataParallel

    i = _check_chase(accelerator, chase)
    chase = _inner(accelerator._optimizers[i])
    if not isinstance(model, DistributedDataParallel):
        if unwrap_model(model) is not chase.model:
            raise ValueError("chase does not drive this model (it was built for another one)")
        return model
    new = rewrap_ddp(model, chase)
    if new is not model:
        for j, m in enumerate(accelerator._models):
            if m is model:
                accelerator._models[j] = new
    return new


def enable_slimmed_resume(accelerator, chase):
    """Register the ``load_state`` pre-hook described in the module doc; returns its handle."""
    i = _check_chase(accelerator, chase)

    def load_chase_first(models, input_dir) -> None:
        from accelerate.utils import OPTIMIZER_NAME
        from accelerate.utils.other import load

        path = os.path.join(input_dir, f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"enable_slimmed_resume: no optimizer state {path} to replay the slims from")
        _inner(accelerator._optimizers[i]).load_state_dict(load(path, map_location="cpu"))

    return accelerator.register_load_state_pre_hook(load_chase_first)
