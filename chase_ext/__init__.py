"""chase_ext: channel-aware dynamic sparse training (Chase) with native kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import reference  # noqa: F401  (pure-PyTorch oracle, always importable)


def __getattr__(name):
    # Lazy: the optimizer pulls in the compiled ops; keep `import chase_ext` cheap.
    if name in ("ChaseOptimizer", "ChaseConfig"):
        from . import optimizer, config

        return {"ChaseOptimizer": optimizer.ChaseOptimizer, "ChaseConfig": config.ChaseConfig}[name]
    if name == "rewrap_ddp":
        from .distributed import rewrap_ddp

        return rewrap_ddp
    if name == "ops":
        from . import _ops

        return _ops
    raise AttributeError(f"module 'chase_ext' has no attribute {name!r}")
