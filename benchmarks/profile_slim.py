"""Where the time of a slim model goes (the analysis behind NOTES.md, "Inference").

    cd benchmarks && python profile_slim.py --model resnet50 --sc 0.5 --threads 1 2

Builds the dense / slim pair exactly as ``test_bench_slim.py`` does (channels chosen by
ChaseOptimizer), then times every leaf module with forward hooks (eval,
``torch.inference_mode``, channels_last, rounds interleaved dense/slim, medians per
module). Prints per-category totals (conv that lost channels, conv that kept its width,
BN, ReLU, pooling, linear, and "other" = whole forward minus the leaves: residual adds,
flatten, Python), the MAC ratio and the time ratio per category, then a per-layer table
of the slimmed convs with their effective GMAC/s. ``--widths`` adds a micro-benchmark of
one 3x3 conv at several output widths (channel counts that are / are not multiples of 16).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

import test_bench_slim as B
from timing import rotated


def leaf_timer(model):
    times: dict[str, float] = {}
    start: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if len(list(m.children())) == 0:
            def pre(mod, inp, name=name):
                start[name] = time.perf_counter()

            def post(mod, inp, out, name=name):
                times[name] = times.get(name, 0.0) + time.perf_counter() - start[name]
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return times, hooks


def conv_macs(model, x):
    macs, shapes = {}, {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def fn(mod, inp, out, name=name):
                if isinstance(mod, nn.Linear):
                    macs[name] = out.numel() // out.shape[0] * mod.in_features
                else:
                    macs[name] = out.numel() // out.shape[0] * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
                shapes[name] = (mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features,
                                mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features,
                                tuple(out.shape[2:]))
            hooks.append(m.register_forward_hook(fn))
    with torch.inference_mode():
        model(x[:1])
    for h in hooks:
        h.remove()
    return macs, shapes


def category(name, m, slimmed):
    if isinstance(m, nn.Conv2d):
        return "conv (slimmed)" if name in slimmed else "conv (full width)"
    if isinstance(m, nn.BatchNorm2d):
        return "batchnorm"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return "pool"
    if isinstance(m, nn.Linear):
        return "linear"
    return "other leaf"


def profile(name, sc, threads, rounds):
    case = B.inference_case(name, sc)
    models = {k: B._cl(case["models"][k]) for k in ("dense", "slim")}
    x = case["batch"].contiguous(memory_format=torch.channels_last)
    dm = dict(models["dense"].named_modules())
    sm = dict(models["slim"].named_modules())
    slimmed = {n for n, m in sm.items() if isinstance(m, (nn.Conv2d, nn.Linear))
               and tuple(m.weight.shape) != tuple(dm[n].weight.shape)}
    torch.set_num_threads(threads)
    per = {k: defaultdict(list) for k in models}
    total = {k: [] for k in models}
    timers = {k: leaf_timer(m) for k, m in models.items()}
    with torch.inference_mode():
        for m in models.values():
            m(x)
        for r in range(rounds):
            for k in rotated(list(models), r):
                m = models[k]
                tt = timers[k][0]
                tt.clear()
                t0 = time.perf_counter()
                m(x)
                total[k].append(time.perf_counter() - t0)
                for n, v in tt.items():
                    per[k][n].append(v)
    for _, hooks in timers.values():
        for h in hooks:
            h.remove()
    med = {k: {n: statistics.median(v) for n, v in per[k].items()} for k in models}
    tot = {k: statistics.median(v) for k, v in total.items()}
    macs = {k: conv_macs(m, x) for k, m in models.items()}
    print(f"\n== {name} S_c={sc} batch={x.shape[0]} threads={threads} rounds={rounds} "
          f"(load {__import__('os').getloadavg()[0]:.2f})")
    print(f"whole forward: dense {tot['dense']*1e3:.1f} ms, slim {tot['slim']*1e3:.1f} ms, "
          f"speedup {tot['dense']/tot['slim']:.3f}, MAC ratio "
          f"{sum(macs['dense'][0].values())/sum(macs['slim'][0].values()):.3f}")
    cats = {k: defaultdict(float) for k in models}
    cmacs = {k: defaultdict(int) for k in models}
    for k, mods in (("dense", dm), ("slim", sm)):
        for n, v in med[k].items():
            c = category(n, mods[n], slimmed)
            cats[k][c] += v
            cmacs[k][c] += macs[k][0].get(n, 0)
        cats[k]["other (adds, flatten, python)"] = tot[k] - sum(med[k].values())
    print(f"{'category':32s} {'dense ms':>9s} {'share':>6s} {'slim ms':>9s} {'share':>6s} {'t ratio':>8s} {'MAC ratio':>9s}")
    for c in sorted(cats["dense"], key=lambda c: -cats["dense"][c]):
        d, s = cats["dense"][c], cats["slim"][c]
        mr = cmacs["dense"][c] / cmacs["slim"][c] if cmacs["slim"][c] else float("nan")
        print(f"{c:32s} {d*1e3:9.2f} {d/tot['dense']:6.1%} {s*1e3:9.2f} {s/tot['slim']:6.1%} "
              f"{d/max(s,1e-9):8.2f} {mr:9.2f}")
    print(f"\nslimmed convs: name, dense -> slim (Cin, Cout, HxW), ms, effective GMAC/s (batch {x.shape[0]})")
    bs = x.shape[0]
    for n in sorted(slimmed, key=lambda n: list(dm).index(n)):
        md, ms = macs["dense"][0][n] * bs, macs["slim"][0][n] * bs
        td, ts = med["dense"][n], med["slim"][n]
        sd, ss = macs["dense"][1][n], macs["slim"][1][n]
        print(f"  {n:18s} {sd[0]:4d}x{sd[1]:4d} -> {ss[0]:4d}x{ss[1]:4d} @{ss[2][0]:>3d}  "
              f"{td*1e3:7.2f} -> {ts*1e3:7.2f} ms   {md/td/1e9:6.1f} -> {ms/ts/1e9:6.1f} GMAC/s   "
              f"t ratio {td/ts:5.2f} MAC ratio {md/ms:5.2f}")
    return tot


def widths(threads, rounds):
    """One 3x3 conv, 256 in, 14x14, batch 8, channels_last: GMAC/s per output width."""
    torch.set_num_threads(threads)
    x = torch.randn(8, 256, 14, 14).contiguous(memory_format=torch.channels_last)
    print(f"\n== 3x3 conv 256 -> C_out at 14x14, batch 8, threads={threads}")
    convs = {c: nn.Conv2d(256, c, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
             for c in (12, 16, 25, 30, 32, 40, 48, 51, 64, 256)}
    ts = defaultdict(list)
    with torch.inference_mode():
        for _ in range(rounds):
            for c, m in convs.items():
                m(x)
                t0 = time.perf_counter()
                for _ in range(10):
                    m(x)
                ts[c].append((time.perf_counter() - t0) / 10)
    for c, v in ts.items():
        t = statistics.median(v)
        print(f"  C_out {c:4d}: {t*1e3:7.3f} ms  {8*14*14*256*9*c/t/1e9:6.1f} GMAC/s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--sc", type=float, nargs="+", default=[0.5])
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--widths", action="store_true")
    a = ap.parse_args()
    for sc in a.sc:
        for t in a.threads:
            profile(a.model, sc, t, a.rounds)
    if a.widths:
        for t in a.threads:
            widths(t, a.rounds)
