"""Keep freed CPU memory in the process, so a forward pass does not page-fault its activations anew.

glibc's ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB, rising with use to at
most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, and gives the top of the heap
back to the OS past ``M_TRIM_THRESHOLD``. A CNN's activations are such blocks (ResNet-50,
batch 16, fp32: 51 MB for one 256x56x56 map), so every forward maps new pages and the
kernel zeroes each 4 KiB page on first touch. On the 2-core AMD EPYC machine of
``benchmarks/NOTES.md`` that costs ~100 ms of a 420 ms dense ResNet-50 batch through the
fused deploy path, and as much of the slim model's 290 ms, so it also hides a quarter of
the slim model's lead: the same allocation is paid by both models whatever their MACs.

:func:`retain_cpu_memory` sets both thresholds through glibc's ``mallopt``: freed blocks
stay in the heap and the next forward reuses pages already mapped. It is a process-wide
setting (every allocation of the process, not one model's), opt-in, and not undone: the
process keeps the peak it reached (what jemalloc or tcmalloc, the other usual fix, also
do; ResNet-50 there: peak resident 740 -> 789 MiB, resident between calls 667 -> 789 MiB).
The environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set the
same before a process starts. CUDA tensors are unaffected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import numbers
import sys

__all__ = ["retain_cpu_memory", "cpu_memory_retained"]

# mallopt parameter numbers (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1  # mallopt takes an int
_MIN_BLOCK = 128 * 1024  # glibc's default threshold: lower would map more, not less

_retained: dict | None = None


def _glibc():
    """glibc as a ctypes library, or None where the C library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.glibc_version = version().decode()
    return libc


def retain_cpu_memory(max_block_bytes: int = _INT_MAX) -> dict:
    """Make glibc keep freed memory for reuse: blocks up to ``max_block_bytes`` come from the
    heap instead of ``mmap``, and the heap is not trimmed back to the OS (below 2 GiB
    free at its top). Process-wide and not undone; calling again with another bound
    changes the bound. Returns what was set: ``{"mmap_threshold", "trim_threshold",
    "glibc"}``.

    Raises ``ValueError`` for a bound that is not an int in [128 KiB, 2**31 - 1] and
    ``RuntimeError`` where the C library is not glibc (use jemalloc or tcmalloc through
    ``LD_PRELOAD`` there) or glibc refuses a setting."""
    global _retained
    if isinstance(max_block_bytes, bool) or not isinstance(max_block_bytes, numbers.Integral):
        raise ValueError(f"max_block_bytes must be an int, got {type(max_block_bytes).__name__}")
    max_block_bytes = int(max_block_bytes)  # numpy.int64 and other integrals too
    if not _MIN_BLOCK <= max_block_bytes <= _INT_MAX:
        raise ValueError(f"max_block_bytes must be in [{_MIN_BLOCK}, {_INT_MAX}] (mallopt takes an int), "
                         f"got {max_block_bytes}")
    libc = _glibc()
    if libc is None:
        raise RuntimeError(f"retain_cpu_memory needs glibc's mallopt; this process ({sys.platform}) does not use "
                           "glibc. Preload jemalloc or tcmalloc (LD_PRELOAD) for the same effect.")
    # the trim threshold first: if glibc refused the mmap one, only freed heap memory would be kept
    for name, param, value in (("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _INT_MAX),
                               ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, max_block_bytes)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc {libc.glibc_version} refused mallopt({name}, {value})")
    _retained = {"mmap_threshold": max_block_bytes, "trim_threshold": _INT_MAX, "glibc": libc.glibc_version}
    return dict(_retained)


def cpu_memory_retained() -> dict | None:
    """What :func:`retain_cpu_memory` set in this process, or None if it was not called
    (settings made through the ``MALLOC_*_`` environment variables are not seen here)."""
    return None if _retained is None else dict(_retained)
