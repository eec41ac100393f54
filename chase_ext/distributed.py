"""DistributedDataParallel after slimming: re-wrapping the model in one line.

DDP records every parameter's size when it is built (its gradient buckets are flat
buffers of those sizes), so once ``slim_()`` has shrunk parameters, the old wrapper
cannot reduce their gradients any more. The model, the optimizer, the LR scheduler and
the ``ChaseOptimizer`` are unaffected (parameters keep their identity); only the DDP
wrapper must be built again around the same module::

    loss.backward()
    chase.step()
    ddp = chase_ext.rewrap_ddp(ddp, chase)   # a no-op unless chase slimmed since ddp was built

Every rank slims the same channels at the same step (decisions depend only on
all-reduced gradients, weights and the seeded generator), so every rank re-wraps at
the same step, as DDP's constructor (a collective) requires.
"""
from __future__ import annotations

import inspect
import warnings

from torch import nn

__all__ = ["rewrap_ddp"]

_MiB = 1024 * 1024


def rewrap_ddp(ddp: nn.Module, chase=None) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``ddp.module`` with the same settings.

    With ``chase`` (a :class:`chase_ext.ChaseOptimizer`), ``ddp`` itself is returned when
    no slimming has happened since it was built (or last re-wrapped by this function), so
    the call can sit in the training loop after every ``chase.step()``. Without
    ``chase`` it always re-wraps. The old wrapper's gradient hooks are removed, so it
    must not be used afterwards.

    Carried over: devices, ``dim``, the process group (or device mesh), the bucket size
    (the default one with its small first bucket), ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph``, buffer syncing (rank-local buffers stay
    rank-local: no sync at construction when the old wrapper did not sync them), and where
    the running torch has them ``skip_all_reduce_unused_params`` and ``batched_grad_copy``.
    Not carried, with a warning naming them: communication hooks and delayed all-reduce
    parameters (register or pass them again on the returned wrapper). Not supported: DDP's
    experimental ``mixed_precision`` (``ValueError``, nothing changed).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp, DDP):
        raise TypeError(f"ddp must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    slims = None
    if chase is not None:
        from .optimizer import ChaseOptimizer

        if not isinstance(chase, ChaseOptimizer):
            raise TypeError(f"chase must be a chase_ext.ChaseOptimizer, got {type(chase).__name__}")
        from .wrappers import unwrap_model

        if chase.model is not unwrap_model(ddp.module):  # DDP(torch.compile(model)) holds the model too
            raise ValueError("chase does not drive ddp.module (it was built for another model)")
        slims = chase.slim_count
        if getattr(ddp, "_chase_slim_count", 0) == slims:
            chase._unwrapped_slim = None  # the loop re-wraps: the next step need not warn
            return ddp
    params = inspect.signature(DDP.__init__).parameters
    if getattr(ddp, "mixed_precision", None) is not None:
        raise ValueError("rewrap_ddp: a DistributedDataParallel built with its experimental mixed_precision cannot "
                         "be rebuilt around the same module (its casts are already installed there)")
    kwargs = dict(
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        dim=ddp.dim,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
    )
    if not getattr(ddp, "bucket_bytes_cap_default", False):  # the default keeps its small first bucket
        kwargs["bucket_cap_mb"] = ddp.bucket_bytes_cap / _MiB
    if getattr(ddp, "device_mesh", None) is not None:  # DDP takes one of the two
        kwargs["device_mesh"] = ddp.device_mesh
    else:
        kwargs["process_group"] = ddp.process_group
    for name in ("skip_all_reduce_unused_params", "batched_grad_copy"):  # newer torch only
        if name in params and hasattr(ddp, name):
            kwargs[name] = getattr(ddp, name)
    sync = getattr(ddp, "forward_sync_buffers", None)
    sync = ddp.broadcast_buffers if sync is None else sync
    # newer torch renamed broadcast_buffers (and warns on the old name)
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = sync
    if not sync and "init_sync" in params:
        # rank-local buffers (BatchNorm statistics) stay as they are: no sync at construction,
        # which forward_sync_buffers=False would still do; parameters are equal on every rank
        kwargs["init_sync"] = False
    not_carried = [f"communication hook {getattr(h, '__name__', h)!r}" for h, _ in getattr(ddp, "_comm_hooks", [])]
    if getattr(ddp, "_delay_all_reduce_params", None):
        not_carried.append("delay_all_reduce_named_params / param_to_hook_all_reduce")
    if not_carried:
        warnings.warn(f"rewrap_ddp: not carried over to the new wrapper: {', '.join(not_carried)}; register or "
                      "pass them again on the wrapper it returns (a hook's state may be sized for the old "
                      "parameters)", stacklevel=2)
    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()  # the old reducer must not see the next backward
    new = DDP(ddp.module, **kwargs)
    new._chase_slim_count = slims  # None (unknown) when re-wrapped without chase
    if chase is not None:
        chase._unwrapped_slim = None  # the loop re-wraps: the next step need not warn
    return new
