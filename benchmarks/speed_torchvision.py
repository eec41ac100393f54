"""What slimming buys on torchvision's models: dense vs slim inference, one interleaved run.

    python benchmarks/speed_torchvision.py [--models efficientnet_b0 mobilenet_v3_large ...]
        [--settings spec gated coupled_gated] [--sc 0.5] [--size 224] [--batch 16] [--threads 2]
        [--rounds 7] [--device cpu|cuda] [--out PATH]

Results go to ``benchmarks/results/torchvision-<machine>-speed.json`` (the machine named as
``speed_resnet50.py`` names it: the GPU, or the CPU model and thread count).

Each model (``weights=None``) gets its channels chosen by ``ChaseOptimizer`` itself under
each setting (``speed_resnet50.select_slim``: density 0.1, one channel event reaching S_c,
two steps on one random sample, then ``slim_()``; ``benchmarks/recipes.py`` names the
settings), and every model, the dense one included, goes through the same deploy path
(``chase_ext.deploy``: norms folded, channels_last; fp32 on the CPU, fp16 on CUDA). The
variants of one model are timed interleaved (``speed_resnet50.time_interleaved``: rounds
rotating the order, medians) at ``--batch``. Beside each speedup: the share of candidate
weights the setting's groups reach (``channel_coverage``), the MAC ratio dense/slim and the
activation-elements ratio. Widths chosen from a random sample are what the channel schedule
does with uninformative scores; a trained model's choices differ, its shapes' cost does not
much. Needs a torchvision that matches the installed torch (its ``models`` package only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipes import RECIPES  # noqa: E402
from speed_resnet50 import RESULTS, activation_elements, machine_file, select_slim, time_interleaved  # noqa: E402

from chase_ext.deploy import deploy  # noqa: E402
from chase_ext.graph import channel_coverage  # noqa: E402
from chase_ext.measure import count_macs  # noqa: E402

MODELS = ["efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf", "resnet50"]
SETTINGS = ["spec", "gated", "coupled_gated"]


def one_model(name: str, settings: list[str], sc: float, size: int, batch: int, rounds: int, device: str) -> dict:
    import torchvision.models as tvm

    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    dense = getattr(tvm, name)(weights=None, **extra).to(device).eval()
    x1 = torch.randn(1, 3, size, size, device=device)
    xb = torch.randn(batch, 3, size, size, device=device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    variants, rec = {"dense": dense}, {"model": name, "settings": {}}
    for s in settings:
        kw = RECIPES[s]
        cov = channel_coverage(dense, x1, coupled=kw.get("coupled_channels", False),
                               gated=kw.get("gated_channels", False), grouped=kw.get("grouped_channels", False),
                               concat=kw.get("concat_channels", False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the low-coverage warning: the share is recorded instead
            slim, info = select_slim(dense, sc, kw, size, device)
        variants[s] = slim
        rec["settings"][s] = {"coverage": round(cov["weight_share"], 4), "groups": cov["groups"],
                              "channels_before": info["channels_before"], "channels_after": info["channels_after"]}
    macs = {k: count_macs(m, x1)["macs"] for k, m in variants.items()}
    acts = {k: activation_elements(m, x1) for k, m in variants.items()}
    deployed = {k: deploy(m, x1, channels_last=True, dtype=dtype) for k, m in variants.items()}
    xd = xb.to(dtype).contiguous(memory_format=torch.channels_last)
    timed = time_interleaved({k: (lambda m=m: m(xd)) for k, m in deployed.items()}, device, rounds, 0.5)
    d = timed["dense"]["median_s"]
    rec["dense"] = {"ms": 1e3 * d, "macs": macs["dense"]}
    for s in settings:
        t = timed[s]["median_s"]
        rec["settings"][s].update(ms=1e3 * t, speedup=d / t, mac_ratio=macs["dense"] / macs[s],
                                  activation_ratio=acts["dense"] / acts[s],
                                  efficiency=(d / t) / (macs["dense"] / macs[s]))
    return rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=sorted(RECIPES))
    ap.add_argument("--sc", type=float, default=0.5, help="channel sparsity S_c, in (0, 1)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help="results JSON (default: named after the machine)")
    a = ap.parse_args(argv)
    if not 0 < a.sc < 1:
        ap.error(f"--sc must lie in (0, 1), got {a.sc}")
    import torchvision

    torch.set_num_threads(a.threads)
    machine = os.path.basename(machine_file(a.device))[: -len("-speed.json")]
    a.out = a.out or os.path.join(RESULTS, f"torchvision-{machine}-speed.json")
    out = {"what": "dense vs slim inference of torchvision models through chase_ext.deploy, per setting",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "python": platform.python_version(),
           "machine": machine,
           "threads": a.threads, "sc": a.sc, "size": a.size, "batch": a.batch, "rounds": a.rounds,
           "settings": {s: RECIPES[s] for s in a.settings}, "models": []}
    for name in a.models:
        r = one_model(name, a.settings, a.sc, a.size, a.batch, a.rounds, a.device)
        out["models"].append(r)
        print(f"{name:>20} dense {r['dense']['ms']:.1f} ms | " + " | ".join(
            f"{s} {v['speedup']:.2f}x (MACs {v['mac_ratio']:.2f}x, reach {100 * v['coverage']:.0f}%)"
            for s, v in r["settings"].items()), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return out


if __name__ == "__main__":
    main()
