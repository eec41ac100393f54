"""Peak extra memory of ``ChaseOptimizer.slim_()`` (run by test_bench_slim.py in a child
process; prints one JSON line).

ResNet-50 shapes with SGD momentum, channels chosen by ChaseOptimizer at S_c = 0.5.
Measured as the growth of the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set before the call, with glibc told to
serve every allocation above 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_=65536``, set by the
caller), so freed tensors go back to the OS and a copy cannot hide in reused heap.
A control measures the same way a plain copy of every parameter and state tensor
(what a gather into new tensors would hold at its peak), to show the method sees copies.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import resnet50  # noqa: E402

from chase_ext import ChaseOptimizer  # noqa: E402


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_growth(fn) -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS:")
    out = fn()
    growth = _kib("VmHWM:") - before
    del out
    return growth


def main(width_div: int, size: int) -> dict:
    torch.manual_seed(0)
    model = resnet50(width_div=width_div)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(1, 3, size, size)
    chase = ChaseOptimizer(opt, model, density=0.1, total_steps=4, channel_sparsity=0.5, example_inputs=x,
                           update_interval=2, channel_interval=1, channel_end=1)
    for _ in range(2):
        loss = F.cross_entropy(model(x), torch.randint(0, 1000, (1,)))
        chase.zero_grad()
        loss.backward()
        chase.step()
    del loss
    chase.zero_grad()
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    mask_bytes = sum(m.numel() for m in chase.masks.values())
    biggest = max(t.numel() * t.element_size() for t in tensors)
    control = _peak_growth(lambda: [t.detach().clone() for t in tensors])
    del tensors
    slim = _peak_growth(lambda: chase.slim_())
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "model": f"resnet50/{width_div}", "params_and_state_bytes": state_bytes, "mask_bytes": mask_bytes,
        "largest_tensor_bytes": biggest, "slim_peak_extra_bytes": slim,
        "control_copy_all_peak_extra_bytes": control, "param_bytes_after_slim": after,
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
