"""Ending a test's process group without a hang.

DDP's reducer (and FSDP modules, DTensor meshes) hold the process group. When the group is
destroyed by ``dist.destroy_process_group()`` while such an object is still alive, the
group's C++ object is freed later, with the object, and ``~ProcessGroupGloo`` then joins
worker threads that may never return: seen once in a full CI run, a single-process test
hung in ``~ProcessGroupGloo`` called from ``~Reducer`` as the test function returned (and
a two-rank test hung at its end earlier, cause not found then). So the tests drop their
wrappers first and end the group here."""
from __future__ import annotations

import gc

import torch.distributed as dist


def end_process_group() -> None:
    """Collects what reference cycles still hold, then destroys the default group: call it
    after setting every wrapper that holds the group (DDP, FSDP, the optimizers and losses
    that reach them) to None."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
