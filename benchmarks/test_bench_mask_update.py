"""Mask-update cost on ResNet-50/ImageNet-shaped weights (54 tensors, 25.5 M values):
fused native op vs vectorized reference vs paper-style code, density 0.1, global scope,
grow by gradient, prune and grow 5% of N.

`CHASE_BENCH_QUICK=1` shrinks the model 8x in width and runs each variant once (CI
keeps the benchmark from rotting); the full run records medians, ratios and the
bandwidth floor in benchmarks/results/<machine>.json.
"""
import os
import statistics
import time
from unittest import mock

import pytest
import torch

from chase_ext import layout, reference as R

from conftest import QUICK, RESULTS, machine_name
from paper_style import mask_update as paper_mask_update
from shapes import resnet50_weight_shapes
from timing import copy_bandwidth, copy_variant, interleaved, save_results

ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DENSITY, SWAP = 0.1, 0.05


def make_problem(device, seed=0):
    shapes = resnet50_weight_shapes(width_div=8 if QUICK else 1)
    g = torch.Generator().manual_seed(seed)
    ws, ms, gs = [], [], []
    for s in shapes:
        m = torch.rand(s, generator=g) < DENSITY
        ws.append((torch.randn(s, generator=g) * m).to(device))
        ms.append(m.to(device))
        gs.append(torch.randn(s, generator=g).to(device))
    n = sum(w.numel() for w in ws)
    k = round(SWAP * n)
    return ws, ms, gs, n, k


def fused(ws, ms, gs, k):
    ops.mask_update_(ws, ms, gs, [], [], [], [], [k], [k])


def reference(ws, ms, gs, k):
    R.mask_update_(ws, ms, gs, [], [], [], [], [k], [k])


def paper(ws, ms, gs, k):
    paper_mask_update(ws, ms, gs, [], [], k, k)


def fused_bracket(ws, ms, gs, k):
    """CUDA only: the one-pass bracketed select (CHASE_EXT_CUDA_SELECT=bracket)."""
    with mock.patch.dict(os.environ, {"CHASE_EXT_CUDA_SELECT": "bracket"}):
        fused(ws, ms, gs, k)


def fused_compact(ws, ms, gs, k):
    """CUDA only: the compacting select (CHASE_EXT_CUDA_SELECT=compact: two full passes
    and one host wait per selection instead of five and six)."""
    with mock.patch.dict(os.environ, {"CHASE_EXT_CUDA_SELECT": "compact"}):
        fused(ws, ms, gs, k)


VARIANTS = {"fused": fused, "reference": reference, "paper_style": paper}
CUDA_VARIANTS = {"fused_bracket": fused_bracket, "fused_compact": fused_compact}


def variants_for(device):
    return {**VARIANTS, **(CUDA_VARIANTS if device == "cuda" else {})}


@pytest.mark.parametrize("device", DEVICES)
def test_results_equal(device):
    """All three variants give the same masks and weights (no ties in these inputs)."""
    ws, ms, gs, n, k = make_problem(device)
    outs = {}
    for name, fn in variants_for(device).items():
        w, m = [x.clone() for x in ws], [x.clone() for x in ms]
        fn(w, m, gs, k)
        outs[name] = (w, m)
    for name in (n for n in outs if n != "fused"):
        for a, b in zip(outs["fused"][1] + outs["fused"][0], outs[name][1] + outs[name][0]):
            assert torch.equal(a, b), name
    assert sum(int(m.sum()) for m in outs["fused"][1]) == sum(int(m.sum()) for m in ms)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mask_update(benchmark, device, variant):
    ws, ms, gs, n, k = make_problem(device)

    def setup():
        args = ([w.clone() for w in ws], [m.clone() for m in ms], gs, k)
        if device == "cuda":  # the copies finish before the timer starts
            torch.cuda.synchronize()
        return args, {}

    def run(*a):
        VARIANTS[variant](*a)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(n=n, k=k, device=device)
    benchmark.pedantic(run, setup=setup, rounds=1 if QUICK else 5, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_update_side_by_side(device):
    """Interleaved medians, ratios and the bandwidth floor, saved per machine."""
    ws, ms, gs, n, k = make_problem(device)
    rounds = 1 if QUICK else 7
    variants = {
        name: ((lambda: ([w.clone() for w in ws], [m.clone() for m in ms], gs, k)), fn)
        for name, fn in variants_for(device).items()
    }
    variants["copy"], moved = copy_variant(device)
    times = interleaved(variants, rounds, device)
    med = {name: statistics.median(t) for name, t in times.items()}
    bw = moved / med.pop("copy")
    bytes_floor = n * (ws[0].element_size() + gs[0].element_size() + 2)  # read W, G, M; write M
    floor = bytes_floor / bw
    payload = {
        "n": n, "k_prune": k, "k_grow": k, "density": DENSITY, "tensors": len(ws), "rounds": rounds,
        "median_s": med,
        "speedup_vs_reference": med["reference"] / med["fused"],
        "speedup_vs_paper_style": med["paper_style"] / med["fused"],
        "copy_bandwidth_GBps": bw / 1e9,
        "bandwidth_floor_s": floor,
        "fused_over_floor": med["fused"] / floor,
        **({"bracket_over_floor": med["fused_bracket"] / floor,
            "bracket_speedup_vs_reference": med["reference"] / med["fused_bracket"]}
           if "fused_bracket" in med else {}),
        **({"compact_over_floor": med["fused_compact"] / floor,
            "compact_speedup_vs_fused": med["fused"] / med["fused_compact"]}
           if "fused_compact" in med else {}),
        "threads": torch.get_num_threads(),
        "cpu_isa": ops.cpu_isa() if device == "cpu" else None,
        "cuda_select_stats": ops.cuda_select_stats() if device == "cuda" else None,  # which paths ran
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(payload)
    if not QUICK:
        save_results(os.path.join(RESULTS, machine_name() + ".json"), f"mask_update_{device}", payload)


def _channels_last(ts):
    return [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ts]


@pytest.mark.parametrize("device", DEVICES)
def test_layout_side_by_side(device):
    """What a channels_last model costs ChaseOptimizer's kernel calls (chase_ext.layout):
    the mask update walks the channels_last tensors in place on the CPU (row-major
    tie-breaks from a per-tensor table; on CUDA the op stages contiguous copies); masked
    apply (weights + one momentum buffer) runs over flat storage; channel stats (channel
    events) gather each channels_last row into row-major order in a row buffer on the CPU.
    No copies on the CPU. "stats_channels_last_staged": the contiguous copies the channel
    stats took before (control)."""
    ws, ms, gs, n, k = make_problem(device)
    moms = [torch.randn_like(w) for w in ws]
    cl = {"w": _channels_last(ws), "m": _channels_last(ms), "g": _channels_last(gs), "s": _channels_last(moms)}
    owner = list(range(len(ws))) * 2

    def update(w, m, g):
        layout.mask_update_(ops, w, m, g, [], [], [], [], [k], [k])

    def apply(ts, m):
        layout.masked_apply_(ops, ts, m, owner)

    variants = {
        "update_contiguous": (lambda: ([w.clone() for w in ws], [m.clone() for m in ms], gs), update),
        "update_channels_last": (lambda: ([w.clone() for w in cl["w"]], [m.clone() for m in cl["m"]], cl["g"]), update),
        "apply_contiguous": (lambda: (ws + moms, ms), apply),
        "apply_channels_last": (lambda: (cl["w"] + cl["s"], cl["m"]), apply),
        "stats_contiguous": (lambda: (ws, ms), lambda w, m: layout.channel_stats(ops, w, m)),
        "stats_channels_last": (lambda: (cl["w"], cl["m"]), lambda w, m: layout.channel_stats(ops, w, m)),
        "stats_channels_last_staged": (lambda: (cl["w"], cl["m"]), lambda w, m: ops.channel_stats(
            [t.contiguous() for t in w], [t.contiguous() for t in m])),
    }
    out = {}
    for name in ("update_contiguous", "update_channels_last"):
        setup, fn = variants[name]
        args = setup()
        fn(*args)
        out[name] = args[:2]
    for a, b in zip(sum(out["update_contiguous"], []), sum(out["update_channels_last"], [])):
        assert torch.equal(a, b)
    for a, b in zip(layout.channel_stats(ops, ws, ms), layout.channel_stats(ops, cl["w"], cl["m"])):
        assert torch.equal(a, b)
    rounds = 1 if QUICK else 7
    med = {name: statistics.median(t) for name, t in interleaved(variants, rounds, device).items()}
    payload = {
        "n": n, "k": k, "tensors": len(ws), "four_d_tensors": sum(w.dim() == 4 for w in ws), "rounds": rounds,
        "median_s": med,
        "update_channels_last_over_contiguous": med["update_channels_last"] / med["update_contiguous"],
        "apply_channels_last_over_contiguous": med["apply_channels_last"] / med["apply_contiguous"],
        "stats_channels_last_over_contiguous": med["stats_channels_last"] / med["stats_contiguous"],
        "stats_staged_over_in_place": med["stats_channels_last_staged"] / med["stats_channels_last"],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(payload)
    if not QUICK:
        save_results(os.path.join(RESULTS, machine_name() + ".json"), f"layout_{device}", payload)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_by_dtype_side_by_side(device):
    """Each weight dtype through the three per-step/per-update kernels on ResNet-50 shapes:
    the fused mask update with one momentum buffer (as ChaseOptimizer calls it), masked
    apply of weights + momentum, channel stats; native vs reference where the reference
    is cheap enough to time, and each native op against its bandwidth floor."""
    ws32, ms, gs32, n, k = make_problem(device)
    rounds = 1 if QUICK else 7
    bw = copy_bandwidth(device)
    owner = list(range(len(ws32)))
    res = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ws = [w.to(dtype) for w in ws32]
        gs = [g.to(dtype) for g in gs32]
        moms = [torch.randn(w.shape, dtype=dtype, device=device) * m for w, m in zip(ws, ms)]
        es = ws[0].element_size()

        def update(w, m, s):
            ops.mask_update_(w, m, gs, [], [], s, owner, [k], [k])

        variants = {
            "mask_update": (lambda: ([w.clone() for w in ws], [m.clone() for m in ms], [s.clone() for s in moms]),
                            update),
            "masked_apply": (lambda: (ws + moms, ms, owner * 2), ops.masked_apply_),
            "masked_apply_reference": (lambda: ([w.clone() for w in ws] + [s.clone() for s in moms], ms, owner * 2),
                                       R.masked_apply_),
            "channel_stats": (lambda: (ws, ms), ops.channel_stats),
            "channel_stats_reference": (lambda: (ws, ms), R.channel_stats),
        }
        c, s = ops.channel_stats(ws, ms)
        rc, rs = R.channel_stats(ws, ms)
        assert torch.equal(c.cpu(), rc.cpu())
        torch.testing.assert_close(s.cpu(), rs.cpu(), rtol=1e-5, atol=1e-5)
        med = {name: statistics.median(t) for name, t in interleaved(variants, rounds, device).items()}
        floors = {  # bytes of one pass each op cannot avoid
            "mask_update": n * (2 * es + 2 + 2 * es),  # read W, G, M; write M; read+write the momentum
            "masked_apply": n * (4 * es + 1),  # read+write W and momentum, read M
            "channel_stats": n * (es + 1),  # read W, M
        }
        res[str(dtype).removeprefix("torch.")] = {
            "median_s": med,
            "over_floor": {name: med[name] / (b / bw) for name, b in floors.items()},
            "masked_apply_speedup_vs_reference": med["masked_apply_reference"] / med["masked_apply"],
            "channel_stats_speedup_vs_reference": med["channel_stats_reference"] / med["channel_stats"],
        }
    payload = {"n": n, "k": k, "tensors": len(ws32), "rounds": rounds, "by_dtype": res,
               "copy_bandwidth_GBps": bw / 1e9, "threads": torch.get_num_threads(),
               "cpu_isa": ops.cpu_isa() if device == "cpu" else None,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(payload)
    if not QUICK:
        save_results(os.path.join(RESULTS, machine_name() + ".json"), f"kernels_by_dtype_{device}", payload)


@pytest.mark.parametrize("device", DEVICES)
def test_liveness_side_by_side(device):
    """The mask update once channels are removed: live_rows / live_cols vectors passed
    (as ChaseOptimizer does after its first channel event), all live or 30% of rows and
    columns dead. Cost against the same call without liveness vectors; results equal the
    reference before timing."""
    ws, ms, gs, n, k = make_problem(device)
    g = torch.Generator().manual_seed(1)
    shapes = [w.shape for w in ws]

    def vectors(dead):
        rows = [(torch.rand(s[0], generator=g) >= dead).to(device) for s in shapes]
        cols = [(torch.rand(s[1] if len(s) > 1 else 1, generator=g) >= dead).to(device) for s in shapes]
        return rows, cols

    cases = {"no_vectors": ([], [], ms), "all_live": (*vectors(0.0), ms)}
    rows, cols = vectors(0.3)
    cases["30pct_dead"] = (rows, cols, [m & R.live_slots(m, r, c) for m, r, c in zip(ms, rows, cols)])
    rounds = 1 if QUICK else 7
    variants, ks = {}, {}
    for name, (r, c, m0) in cases.items():
        kk = min(k, sum(int(m.sum()) for m in m0) // 2)
        ks[name] = kk
        w1, m1 = [w * m for w, m in zip(ws, m0)], [m.clone() for m in m0]
        w2, m2 = [w.clone() for w in w1], [m.clone() for m in m0]
        ops.mask_update_(w1, m1, gs, r, c, [], [], [kk], [kk])
        R.mask_update_(w2, m2, gs, r, c, [], [], [kk], [kk])
        assert all(torch.equal(a, b) for a, b in zip(m1 + w1, m2 + w2)), name
        base = [w * m for w, m in zip(ws, m0)]
        variants[name] = ((lambda base=base, m0=m0: ([w.clone() for w in base], [m.clone() for m in m0])),
                          (lambda w, m, r=r, c=c, kk=kk: ops.mask_update_(w, m, gs, r, c, [], [], [kk], [kk])))
    med = {name: statistics.median(t) for name, t in interleaved(variants, rounds, device).items()}
    payload = {"n": n, "k": ks, "rounds": rounds, "median_s": med,
               "over_no_vectors": {name: med[name] / med["no_vectors"] for name in med},
               "threads": torch.get_num_threads(), "cpu_isa": ops.cpu_isa() if device == "cpu" else None,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(payload)
    if not QUICK:
        save_results(os.path.join(RESULTS, machine_name() + ".json"), f"mask_update_liveness_{device}", payload)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_update_peak_memory():
    """Peak extra memory of a mask update and of the channel stats through
    chase_ext.layout, contiguous and channels_last, against a plain copy of what staging
    would copy (update_memory.py, in a child process: glibc set to return freed blocks, so
    copies show)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "update_memory.py"),
                          str(8 if QUICK else 1)], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not QUICK:  # the method sees copies (at width/8 most tensors fit under the 64 KiB mmap threshold)
        assert r["channels_last_control_copy_peak_extra_bytes"] >= 0.9 * r["channels_last_staged_bytes"]
    r.update(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads())
    print(r)
    if not QUICK:
        save_results(os.path.join(RESULTS, machine_name() + ".json"), "update_peak_memory_cpu", r)
