"""The model behind the wrappers training code puts around it, and what they need after a slim.

* :func:`unwrap_model` peels ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and
  ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), in any nesting, so channel groups,
  masks and slims act on the real parameters whichever order the user wrapped in.
* :func:`check_not_sharded` refuses parameters that are ``DTensor`` (FSDP2's ``fully_shard``,
  tensor parallelism) and ``FullyShardedDataParallel`` (FSDP1) modules: the kernels, the
  global top-k of the mask update and the slimming gather all need each rank to hold whole
  tensors. Sharded training has no supported path yet.
* :func:`forget_compiled` drops the graphs ``torch.compile`` built for the model's forward
  once a slim changed parameter shapes. Dynamo guards on every parameter's shape, so a
  compiled forward never runs a stale graph (it recompiles on the next call), but each
  recompile adds a cache entry for the same code; after ``torch._dynamo.config.recompile_limit``
  entries (8) Dynamo falls back to eager for good, with one log line. Channels are only ever
  removed, so the old shapes never come back and their entries are dead weight: dropping them
  keeps a run that slims dozens of times compiled. Works for both orders (compile before or
  after wrapping) since it acts on the code objects of the model's own ``forward`` methods.
"""
from __future__ import annotations

import sys
import types

from torch import nn

__all__ = ["unwrap_model", "is_ddp", "check_not_sharded", "forget_compiled"]


def _compiled_type():
    # only when Dynamo is already loaded: a model cannot be compiled otherwise, and
    # importing it costs about a second
    mod = sys.modules.get("torch._dynamo.eval_frame")
    return None if mod is None else getattr(mod, "OptimizedModule", None)


def _wrapper_chain(model: nn.Module):
    """``model`` and each module inside its DDP / DataParallel / ``torch.compile`` wrappers,
    outermost first."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    compiled = _compiled_type()
    while True:
        yield model
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside any DDP / DataParallel / ``torch.compile`` wrappers."""
    for model in _wrapper_chain(model):
        pass
    return model


def is_ddp(model: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` is among ``model``'s wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    return any(isinstance(m, DistributedDataParallel) for m in _wrapper_chain(model))


def check_not_sharded(model: nn.Module) -> None:
    """``TypeError`` naming FSDP / DTensor when ``model`` holds DTensor parameters (FSDP2's
    ``fully_shard``, tensor parallelism) or ``FullyShardedDataParallel`` (FSDP1) modules."""
    # neither can exist unless its module was imported: no import (and no cost) otherwise
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if fsdp1 is not None:
        wrapped = [n or "the model itself" for n, m in model.named_modules() if isinstance(m, fsdp1)]
        if wrapped:
            raise TypeError(
                f"ChaseOptimizer: {', '.join(wrapped[:3])} {'is' if len(wrapped) == 1 else 'are'} wrapped in "
                "FullyShardedDataParallel (FSDP1), which flattens and shards the parameters; " + _WHOLE)
    tensor = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor, "DTensor", None)
    sharded = [] if dtensor is None else [n for n, p in model.named_parameters() if isinstance(p, dtensor)]
    if sharded:
        raise TypeError(
            f"ChaseOptimizer: {len(sharded)} parameter(s) are DTensors ({', '.join(sharded[:3])}"
            f"{', ...' if len(sharded) > 3 else ''}), as FSDP2 (torch.distributed.fsdp.fully_shard) or tensor "
            "parallelism make them; " + _WHOLE)


_WHOLE = ("chase_ext needs whole tensors on every rank (the mask update takes a global top-k, slimming "
          "gathers whole rows). Train with DistributedDataParallel instead (chase_ext.rewrap_ddp after slims); "
          "sharding is not supported, neither before nor after wrapping (sharding replaces the parameters the "
          "ChaseOptimizer holds)")


def _codes_of(model: nn.Module):
    """The code objects Dynamo may have compiled for ``model``: every submodule class's
    ``forward`` (a graph break inside a submodule compiles its forward as a frame of its
    own), the shared ``inner`` wrapper through which ``torch.compile`` enters a module whose
    ``forward`` lives in torch.nn (``nn.Sequential``), and the resume functions Dynamo
    generated after graph breaks in any of them."""
    seen, todo = set(), []
    ext = sys.modules.get("torch._dynamo.external_utils")
    wrap = getattr(getattr(ext, "wrap_inline", None), "__code__", None)
    for c in () if wrap is None else wrap.co_consts:
        if isinstance(c, types.CodeType):
            seen.add(c)
            todo.append(c)
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        code = getattr(fwd, "__code__", None)
        if code is not None and code not in seen:
            seen.add(code)
            todo.append(code)
    resume = sys.modules.get("torch._dynamo.resume_execution")
    cache = getattr(getattr(resume, "ContinueExecutionCache", None), "cache", None)
    out = []
    while todo:
        code = todo.pop()
        out.append(code)
        if cache is not None and code in cache:
            for generated in cache[code].values():
                if generated not in seen:
                    seen.add(generated)
                    todo.append(generated)
    return out


def forget_compiled(model: nn.Module) -> int:
    """Drop Dynamo's compiled entries for ``model``'s forward code (see the module doc);
    returns how many code objects had entries. A no-op when Dynamo was never loaded.
    Other instances of the same module classes recompile once on their next call."""
    ef = sys.modules.get("torch._dynamo.eval_frame")
    if ef is None:
        return 0
    n = 0
    for code in _codes_of(unwrap_model(model)):
        if ef._debug_get_cache_entry_list(code):
            ef.reset_code(code)
            n += 1
    return n
