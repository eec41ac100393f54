"""Peak extra memory of a mask update and of the channel stats as ``ChaseOptimizer`` makes
them (through ``chase_ext.layout``), contiguous and channels_last (run by
test_bench_mask_update.py in a child process; prints one JSON line).

ResNet-50 shapes, density 0.1, one momentum buffer per weight, prune and grow 5% of N.
Measured as ``slim_memory.py`` measures ``slim_()``: the growth of the peak resident set
over the resident set before the call, with glibc serving every allocation above 64 KiB
by mmap (set by the caller), so a copy cannot hide in reused heap. A control measures a
plain copy of the non-contiguous weights, masks, scores and momentum buffers (what
contiguous staging holds), to show the method sees copies.

    python update_memory.py WIDTH_DIV
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import resnet50_weight_shapes  # noqa: E402
from slim_memory import _peak_growth  # noqa: E402

from chase_ext import _ops as ops  # noqa: E402
from chase_ext import layout  # noqa: E402


def _problem(width_div: int, channels_last: bool):
    g = torch.Generator().manual_seed(0)

    def lay(t):
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    ws, ms, gs, st = [], [], [], []
    for s in resnet50_weight_shapes(width_div=width_div):
        m = torch.rand(s, generator=g) < 0.1
        ws.append(lay(torch.randn(s, generator=g) * m))
        ms.append(lay(m))
        gs.append(lay(torch.randn(s, generator=g)))
        st.append(lay(torch.randn(s, generator=g) * m))
    return ws, ms, gs, st


def main(width_div: int) -> dict:
    out = {"model": f"resnet50/{width_div}"}
    for name in ("contiguous", "channels_last"):
        ws, ms, gs, st = _problem(width_div, name == "channels_last")
        k = round(0.05 * sum(w.numel() for w in ws))
        staged = [t for ts in (ws, ms, gs, st) for t in ts if not t.is_contiguous()]
        gc.collect()
        out[f"{name}_non_contiguous_tensors"] = len(staged)
        out[f"{name}_staged_bytes"] = sum(t.numel() * t.element_size() for t in staged)
        out[f"{name}_control_copy_peak_extra_bytes"] = _peak_growth(lambda: [t.contiguous() for t in staged])
        del staged
        out[f"{name}_update_peak_extra_bytes"] = _peak_growth(
            lambda: layout.mask_update_(ops, ws, ms, gs, [], [], st, list(range(len(ws))), [k], [k]))
        out[f"{name}_stats_peak_extra_bytes"] = _peak_growth(lambda: layout.channel_stats(ops, ws, ms))
        # control: the channel stats on contiguous copies, as chase_ext.layout called them before
        out[f"{name}_stats_on_copies_peak_extra_bytes"] = _peak_growth(
            lambda: ops.channel_stats([t.contiguous() for t in ws], [t.contiguous() for t in ms]))
        out["slots"] = sum(w.numel() for w in ws)
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
