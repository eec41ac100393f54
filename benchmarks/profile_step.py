"""Where the time of a ChaseOptimizer step goes: torch.profiler over a few steps of each
variant of ``test_bench_step.py`` (same models, same gradients), ops grouped by name.

    python profile_step.py [--device cpu|cuda] [--layout contiguous|channels_last]
                           [--steps 3] [--threads N] [--top 14]

Prints, per variant, the wall time per step and the ops with the most self time
(CPU time on the host; with --device cuda also the device time per op), per step.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from test_bench_step import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--variants", default="sgd_step,chase_plain_step,chase_update_step")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    case = build(a.device, a.layout)
    cuda = a.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in a.variants.split(","):
        step = case["opt"][name].step
        step()  # warm
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / a.steps
        print(f"\n== {name}: {1e3 * wall:.2f} ms per step ({a.device}, {a.layout}, "
              f"{torch.get_num_threads()} threads), top ops by self time per step:")
        rows = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
        rows.sort(key=lambda e: -e.self_cpu_time_total)
        for e in rows[: a.top]:
            dev = f"  device {e.self_device_time_total / 1e3 / a.steps:7.3f} ms" if cuda else ""
            print(f"  {e.key:<44} calls {e.count // a.steps:5d}  host {e.self_cpu_time_total / 1e3 / a.steps:7.2f} ms"
                  + dev)


if __name__ == "__main__":
    main()
