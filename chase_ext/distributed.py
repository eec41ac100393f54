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
        chase._rewraps_ddp = True  # the loop re-wraps: slims need not warn
        slims = chase.slim_count
        if getattr(ddp, "_chase_slim_count", 0) == slims:
            return ddp
    kwargs = dict(
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        dim=ddp.dim,
        process_group=ddp.process_group,
        bucket_cap_mb=ddp.bucket_bytes_cap / _MiB,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
    )
    params = inspect.signature(DDP.__init__).parameters
    # newer torch renamed broadcast_buffers (and warns on the old name)
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    kwargs[key] = ddp.broadcast_buffers
    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()  # the old reducer must not see the next backward
    new = DDP(ddp.module, **kwargs)
    new._chase_slim_count = slims  # None (unknown) when re-wrapped without chase
    return new
