"""The native ops: loads ``chase_ext._C``, registers fake kernels, typed wrappers.

Every function here has the name, arguments and results of its twin in
``chase_ext.reference`` (which documents the semantics); the optimizer can use either.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._loader import _read_record, load_extension

# registers the schemas and the CPU/CUDA kernels; refuses a library built for another torch
_C = load_extension()

__all__ = [
    "build_info",
    "cpu_isa",
    "cuda_select_stats",
    "select_threshold",
    "mask_update_",
    "channel_stats",
    "masked_apply_",
    "masked_sgd_",
    "masked_adam_",
    "gather_channels_",
]

_ops = torch.ops.chase_ext
KEY_MAX = 2**32 - 1


def build_info() -> dict:
    """Version, whether CUDA kernels are compiled in, their CUDA version and archs; without
    them, ``cuda_skipped`` says why, as the build recorded it (None when it did not)."""
    info = {
        "version": _C.__version__,
        "has_cuda": bool(_C.has_cuda),
        "cuda_version": _C.cuda_version,
        "cuda_archs": _C.cuda_archs,
    }
    if not info["has_cuda"]:
        rec = _read_record(os.path.dirname(os.path.abspath(_C.__file__)))
        info["cuda_skipped"] = (rec or {}).get("cuda_skipped")
    return info


def cpu_isa() -> str:
    """Instruction set of the CPU mask-update loops: ``"avx512"``, ``"avx2"`` or
    ``"baseline"`` -- the widest this CPU runs, unless ``CHASE_EXT_CPU_ISA`` names one."""
    return _C.cpu_isa()


def cuda_select_stats() -> dict | None:
    """Which path the CUDA mask update's selections took since the library was loaded
    (results are the same either way): ``bracket_fast`` / ``bracket_fallback``, calls the
    bracketed select (``CHASE_EXT_CUDA_SELECT=bracket``) finished itself / handed to the
    radix select; ``compact`` / ``compact_fallback``, selections the compacting select
    (``CHASE_EXT_CUDA_SELECT=compact``) made / handed to the radix select. None without
    CUDA kernels."""
    if not hasattr(_C, "cuda_select_stats"):
        return None
    keys = ("bracket_fast", "bracket_fallback", "compact", "compact_fallback")
    return dict(zip(keys, (int(v) for v in _C.cuda_select_stats())))


def _rows(ts) -> int:
    return sum((t.shape[0] if t.dim() > 0 else 1) for t in ts)


def _one_device(op: str, **lists) -> None:
    """Every tensor argument on one device. The fake kernels run for fake tensors (under
    torch.compile) and also whenever one argument is a meta tensor, which outranks the
    CPU and CUDA kernels in dispatch: without this check, a single meta tensor among real
    ones would skip the real kernel and return uninitialised results, with no error."""
    first = None
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if first is None:
                first = (f"{name}[{i}]", t.device)
            elif t.device != first[1]:
                raise RuntimeError(f"chase_ext.{op}: {name}[{i}] is on {t.device} but {first[0]} is on {first[1]}")


@torch.library.register_fake("chase_ext::select_threshold")
def _(keys, masks, live_rows, live_cols, mask_value, k, largest, absolute):
    _one_device("select_threshold", keys=keys, masks=masks, live_rows=live_rows, live_cols=live_cols)
    return torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.register_fake("chase_ext::mask_update_")
def _(weights, masks, scores, live_rows, live_cols, states, state_owner, prune_counts, grow_counts):
    _one_device("mask_update_", weights=weights, masks=masks, scores=scores, live_rows=live_rows,
                live_cols=live_cols, states=states)
    dev = weights[0].device
    n = _rows(weights)
    return torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.float32, device=dev)


@torch.library.register_fake("chase_ext::channel_stats")
def _(weights, masks):
    _one_device("channel_stats", weights=weights, masks=masks)
    dev = weights[0].device
    n = _rows(weights)
    return torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.float32, device=dev)


@torch.library.register_fake("chase_ext::masked_apply_")
def _(tensors, masks, owner):
    _one_device("masked_apply_", tensors=tensors, masks=masks)
    return None


@torch.library.register_fake("chase_ext::masked_sgd_")
def _(params, grads, momentum_buffers, masks, lr, weight_decay, momentum, dampening, nesterov, maximize):
    _one_device("masked_sgd_", params=params, grads=grads, momentum_buffers=momentum_buffers, masks=masks)
    return None


@torch.library.register_fake("chase_ext::masked_adam_")
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, lr, beta1, beta2, weight_decay, eps,
      amsgrad, maximize, decoupled_weight_decay, vector_width):
    _one_device("masked_adam_", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=max_exp_avg_sqs, masks=masks)
    return None


@torch.library.register_fake("chase_ext::gather_channels_")
def _(tensor, keep, dim):
    if keep.device.type != "cpu":  # keep may stay on the CPU for a tensor on any device
        _one_device("gather_channels_", tensor=[tensor], keep=[keep])
    return None


def select_threshold(
    keys: list[Tensor],
    masks: list[Tensor],
    live_rows: list[Tensor],
    live_cols: list[Tensor],
    mask_value: bool,
    k: int,
    largest: bool,
    absolute: bool,
) -> Tensor:
    """(key, cutoff) of the k-th best candidate; see ``reference.select_threshold``."""
    if not keys:  # the dispatcher needs a tensor to pick a backend
        if k != 0:
            raise ValueError(f"chase_ext.select_threshold: k={k} is out of range: only 0 candidate slots")
        return torch.tensor([KEY_MAX if largest else 0, 0], dtype=torch.int64)
    return _ops.select_threshold(keys, masks, live_rows, live_cols, mask_value, k, largest, absolute)


def mask_update_(
    weights: list[Tensor],
    masks: list[Tensor],
    scores: list[Tensor],
    live_rows: list[Tensor],
    live_cols: list[Tensor],
    states: list[Tensor],
    state_owner: list[int],
    prune_counts: list[int],
    grow_counts: list[int],
) -> tuple[Tensor, Tensor]:
    """Fused prune + grow + mask rewrite + zeroing + per-row stats (one pass after selection)."""
    if not weights:
        if any(prune_counts) or any(grow_counts):
            raise ValueError("chase_ext.mask_update_: counts given for an empty list of weights")
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return _ops.mask_update_(
        weights, masks, scores, live_rows, live_cols, states, list(state_owner), list(prune_counts), list(grow_counts)
    )


def channel_stats(weights: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per output channel active count (int64) and Σ|w| (float32), concatenated."""
    if not weights:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return _ops.channel_stats(weights, masks)


def masked_apply_(tensors: list[Tensor], masks: list[Tensor], owner: list[int]) -> None:
    """``tensors[j] <- where(masks[owner[j]], tensors[j], 0)``, one call for all."""
    if tensors:
        _ops.masked_apply_(tensors, masks, list(owner))


def masked_sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], masks: list[Tensor],
                lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                maximize: bool) -> None:
    """Gradient masking and ``torch.optim.SGD``'s step in one pass (CPU, float32)."""
    if params or grads or momentum_buffers or masks:
        _ops.masked_sgd_(params, grads, momentum_buffers, masks, float(lr), float(weight_decay), float(momentum),
                         float(dampening), bool(nesterov), bool(maximize))


def masked_adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], masks: list[Tensor], lr: float,
                 beta1: float, beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
                 decoupled_weight_decay: bool, vector_width: int) -> None:
    """Gradient masking and the fused CPU Adam / AdamW step in one pass (CPU, float32)."""
    if params or grads or exp_avgs or exp_avg_sqs or max_exp_avg_sqs or state_steps or masks:
        _ops.masked_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masks, float(lr),
                          float(beta1), float(beta2), float(weight_decay), float(eps), bool(amsgrad), bool(maximize),
                          bool(decoupled_weight_decay), int(vector_width))


def gather_channels_(tensor: Tensor, keep: Tensor, dim: int) -> None:
    """Compact ``tensor`` along ``dim`` in place into the prefix of its memory.

    ``keep`` may be on any device (as in the reference). The CUDA kernel reads ``keep``
    on the host anyway, so it is moved only for a CPU tensor (a CUDA ``keep`` would
    otherwise pick the CUDA kernel).
    """
    if isinstance(keep, Tensor) and isinstance(tensor, Tensor) and tensor.device.type == "cpu" \
            and keep.device != tensor.device:
        keep = keep.to(tensor.device)
    _ops.gather_channels_(tensor, keep, dim)
