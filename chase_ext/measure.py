"""Measuring tools shared by the demo, the examples and the benchmarks.

Nothing here changes a model; each function reads one figure off it:

* :func:`count_params` (every parameter, shared ones once), :func:`sparse_weights` (the
  conv and linear weights Chase masks by default), :func:`count_macs` (conv/linear
  multiply-accumulates per sample via forward hooks, dense and with zero weights skipped);
* :func:`measure_throughput` (interleaved timing, each round starting one model further
  along, medians, fixed thread count, ``torch.inference_mode``) and
  :func:`default_threads` (the thread count the demo and benchmarks time with).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["count_params", "count_macs", "sparse_weights", "measure_throughput", "default_threads"]


# --------------------------------------------------------------------------- counting
_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def sparse_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights Chase masks by default: conv and linear weights, in parameter order."""
    out, seen = [], set()
    for mname, m in model.named_modules():
        if isinstance(m, _COUNTED) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((f"{mname}.weight" if mname else "weight", m.weight))
    return out


def count_params(model: nn.Module) -> int:
    """All parameters (weights, biases, norm affine), each shared tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Multiply-accumulates per sample of every conv/linear, measured with forward hooks.

    Returns ``{"macs": dense MACs per sample, "nonzero_macs": MACs with exactly-zero
    weights skipped (what an ideal sparse kernel would do), "layers": {name: macs}}``.
    The model runs once in eval mode on ``example`` (training flags are restored).
    """
    per_layer: dict[str, int] = {}
    nonzero: dict[str, float] = {}
    hooks = []

    def hook(name):
        def fn(m, inp, out):
            n = out.shape[0]
            if isinstance(m, nn.Linear):
                macs = out.numel() // n * m.in_features
            else:
                macs = out.numel() // n * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            dens = float((m.weight != 0).sum()) / max(1, m.weight.numel())
            per_layer[name] = per_layer.get(name, 0) + int(macs)
            nonzero[name] = nonzero.get(name, 0.0) + macs * dens
        return fn

    for name, m in model.named_modules():
        if isinstance(m, _COUNTED):
            hooks.append(m.register_forward_hook(hook(name)))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        for m, f in flags.items():
            m.train(f)
    return {"macs": sum(per_layer.values()), "nonzero_macs": int(round(sum(nonzero.values()))), "layers": per_layer}


# --------------------------------------------------------------------------- timing
def default_threads() -> int:
    """Half the CPU cores torch would use (at least 1).

    On small shared machines a second OpenMP thread that has to wait for a busy core makes
    every op slower (measured: 2 threads 3.5x slower than 1 on a loaded 2-core box), so
    the demo leaves half the cores free by default.
    """
    return max(1, torch.get_num_threads() // 2)


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    models: dict[str, nn.Module],
    batch: torch.Tensor,
    *,
    rounds: int = 7,
    iters: int | None = None,
    min_seconds: float = 0.05,
    threads: int | None = None,
    warmup: int = 2,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Inference throughput (samples/s) of several models on one batch, interleaved.

    Each round times every model once, starting one model further along each round
    (A B C, B C A, ...), so drift of a shared machine hits all alike and no model always
    runs first; a round runs ``iters`` forwards (chosen from the slowest model so a round
    lasts about ``min_seconds`` when not given). Eval mode and ``torch.inference_mode``;
    CPU work uses ``threads`` threads (the current count when None). With
    ``channels_last`` (4-D inputs) copies of the models run in that memory format, which
    is much faster for small convs and pools on CPU; the caller's models are untouched.
    Returns
    ``{name: {"samples_per_s": median, "seconds": [...per round]}, "rounds", "iters",
    "batch", "threads"}``.
    """
    device = batch.device
    if channels_last and batch.dim() == 4:
        import copy

        models = {k: copy.deepcopy(m).to(memory_format=torch.channels_last) for k, m in models.items()}
        batch = batch.contiguous(memory_format=torch.channels_last)
    else:
        channels_last = False
    flags = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        with _threads(threads), torch.inference_mode():
            for m in models.values():
                for _ in range(warmup):
                    m(batch)
            _sync(device)
            if iters is None:
                slowest = 0.0
                for m in models.values():
                    t0 = time.perf_counter()
                    m(batch)
                    _sync(device)
                    slowest = max(slowest, time.perf_counter() - t0)
                iters = max(1, min(1000, math.ceil(min_seconds / max(slowest, 1e-6))))
            names = list(models)
            for r in range(rounds):  # each round starts one model further along: A B C, B C A, ...
                for k in names[r % len(names):] + names[: r % len(names)]:
                    m = models[k]
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        m(batch)
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
            nthreads = torch.get_num_threads()
    finally:
        for k, m in models.items():
            m.train(flags[k])
    n = batch.shape[0] * iters
    res: dict[str, Any] = {k: {"samples_per_s": n / statistics.median(v), "seconds": v} for k, v in times.items()}
    res.update(rounds=rounds, iters=iters, batch=int(batch.shape[0]), threads=nthreads, device=str(device),
               memory_format="channels_last" if channels_last else "contiguous")
    return res
