"""Side-by-side timing: variants interleaved, each round starting one further along
(A B C, B C A, C A B, ...), so machine drift hits all of them alike and none always runs
right after the same other; medians and ratios come from one run."""
from __future__ import annotations

import json
import os
import statistics
import time

import torch


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rotated(names: list, r: int) -> list:
    """The order of round r: names, started r places further along."""
    r %= max(len(names), 1)
    return names[r:] + names[:r]


def interleaved(variants: dict, rounds: int, device="cpu") -> dict:
    """variants: name -> (setup() -> args, fn(*args)). Returns name -> list of seconds."""
    times = {k: [] for k in variants}
    for r in range(rounds):
        for name in rotated(list(variants), r):
            setup, fn = variants[name]
            args = setup()
            _sync(device)
            t0 = time.perf_counter()
            fn(*args)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def copy_variant(device="cpu", nbytes=256 << 20):
    """A 256 MiB tensor copy as an `interleaved` variant, so the bandwidth floor is timed in
    the same rounds as what it is compared with (this shared machine's copy bandwidth
    drifts between 20 and 40 GB/s within minutes). Returns (variant, bytes moved)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return (lambda: (), lambda: dst.copy_(src)), 2 * nbytes


def copy_bandwidth(device="cpu", nbytes=256 << 20, rounds=7) -> float:
    """Measured bytes/s of a large tensor copy (bytes read + bytes written)."""
    variant, moved = copy_variant(device, nbytes)
    ts = interleaved({"copy": variant}, rounds, device)["copy"]
    return moved / statistics.median(ts)


def save_results(path: str, key: str, payload: dict) -> None:
    """Merge one benchmark's figures into the machine's results file."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = payload
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
