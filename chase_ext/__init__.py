"""chase_ext: channel-aware dynamic sparse training (Chase) with native kernels.

Public names (all reachable after a plain ``import chase_ext``; everything but
``reference`` is loaded on first use, so the import itself stays cheap):

* ``ChaseOptimizer``, ``ChaseConfig``, ``rewrap_ddp``;
* submodules ``ops`` (the native kernels), ``reference`` (the same ops
  in plain PyTorch), ``slim`` (``export_dense``, ``slim_``), ``graph`` (channel groups),
  ``config``, ``distributed``, ``optimizer``, ``training``, ``measure``, ``deploy`` (the
  inference model as shipped), ``cpu_memory`` (keep freed CPU memory for reuse),
  ``allocation`` (latency-table channel allocation), ``wrappers``, ``ema``, and the
  training-tool glue ``lightning`` and ``accelerate`` (each imports its framework when
  first used).

``import chase_ext.ops`` and ``from chase_ext import ops`` both work.
"""
import importlib as _importlib

__version__ = "0.1.0"

from . import reference  # noqa: F401  (pure-PyTorch oracle, always importable)

# Submodules loaded on first attribute access.
_SUBMODULES = ("ops", "reference", "slim", "graph", "config", "distributed", "optimizer", "training", "measure",
               "deploy", "cpu_memory", "allocation", "wrappers", "ema", "lightning", "accelerate")

# `optimizer`, `training` and `measure` stay out of __all__: a star import would shadow common names.
__all__ = ["ChaseOptimizer", "ChaseConfig", "rewrap_ddp",
           "ops", "reference", "slim", "graph", "config", "distributed"]


def __getattr__(name):
    # Lazy: the optimizer pulls in the compiled ops; keep `import chase_ext` cheap.
    if name == "ChaseOptimizer":
        from .optimizer import ChaseOptimizer

        return ChaseOptimizer
    if name == "ChaseConfig":
        from .config import ChaseConfig

        return ChaseConfig
    if name == "rewrap_ddp":
        from .distributed import rewrap_ddp

        return rewrap_ddp
    if name in _SUBMODULES:
        mod = _importlib.import_module(f"{__name__}.{name}")
        globals()[name] = mod  # later accesses skip __getattr__
        return mod
    raise AttributeError(f"module 'chase_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | set(_SUBMODULES) | {n for n in globals() if n.startswith("__")})

