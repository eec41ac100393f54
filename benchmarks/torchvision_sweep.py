"""ChaseOptimizer on torchvision's classification models, as a new user would try it: each
model (``weights=None``, 10 classes, small inputs) trains a few steps on random data with
channel events, is slimmed, and its outputs are compared with a copy of the masked model
taken just before; a few more steps train the slim model, and ``export_dense`` runs.
Reports per model and setting: the channel groups found, the share of the candidate
layers' weights they reach (``chase_ext.graph.channel_coverage``), channels removed,
parameters before / after, the largest output difference (eval mode, and with the norms
in train mode, which stays finite where a model's running statistics do not), warnings.
With ``slim_during_training`` the last slim already happened during training, so the
comparison there is trivially equal. A run passes when it finishes and its slim and exported models give the masked model's
outputs within 1e-5 of their largest value (eval mode; train-mode norms where eval
outputs are not finite in both).

    python benchmarks/torchvision_sweep.py [--models resnet18 ...] [--settings base coupled ...]
                                           [--steps 30] [--out benchmarks/results/torchvision-sweep.json]

Needs a torchvision that matches the installed torch (not a dependency of chase_ext). The
JSON is rewritten after every run. Exit status 1 when a run failed or its slim model's
outputs differ from the masked model's by more than 1e-5 (relative).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
import warnings
from typing import Any

import torch
import torch.nn.functional as F

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "mobilenet_v2",
          "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5",
          "squeezenet1_1", "mnasnet0_5", "convnext_tiny", "vgg11_bn", "googlenet", "inception_v3", "vit_tiny",
          "swin_t"]
SETTINGS = {
    "base": {},
    "coupled": {"coupled_channels": True},
    "round8": {"round_to": 8},
    "coupled_round8": {"coupled_channels": True, "round_to": 8},
    "slim_during_training": {"slim_during_training": True},
    "gated": {"gated_channels": True},
    "coupled_gated": {"coupled_channels": True, "gated_channels": True},
    "grouped": {"grouped_channels": True},
    "all_joins": {"coupled_channels": True, "gated_channels": True, "grouped_channels": True},
    "concat": {"concat_channels": True},
    "every_join": {"coupled_channels": True, "gated_channels": True, "grouped_channels": True,
                   "concat_channels": True},
}
TOLERANCE = 1e-5  # relative to the largest output


def build(name: str):
    """(model, input side) for one name."""
    import torchvision.models as tvm

    if name == "vit_tiny":  # ViT-B/16's structure at a size a CPU trains in seconds
        return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10), 32
    if name == "googlenet":
        return tvm.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=10), 32
    if name == "inception_v3":  # its smallest input
        return tvm.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=10), 75
    if name == "squeezenet1_1":
        return tvm.squeezenet1_1(weights=None, num_classes=10), 64
    return getattr(tvm, name)(weights=None, num_classes=10), 32


def _norms_train(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    for sub in m.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            sub.train()
    return m


def _diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))


def one_run(name: str, setting: str, steps: int, batch: int) -> dict[str, Any]:
    from chase_ext import ChaseOptimizer
    from chase_ext.graph import channel_coverage
    from chase_ext.slim import export_dense

    torch.manual_seed(0)
    res: dict[str, Any] = {"model": name, "setting": setting}
    t0 = time.perf_counter()
    stage = "build"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model, hw = build(name)
            res["input"] = [batch, 3, hw, hw]
            nparams = lambda: sum(p.numel() for p in model.parameters())  # noqa: E731
            res["params_before"] = nparams()
            stage = "coverage"
            cov = channel_coverage(model, torch.randn(1, 3, hw, hw),
                                   coupled=SETTINGS[setting].get("coupled_channels", False),
                                   gated=SETTINGS[setting].get("gated_channels", False),
                                   grouped=SETTINGS[setting].get("grouped_channels", False),
                                   concat=SETTINGS[setting].get("concat_channels", False))
            res["coverage"] = {k: cov[k] for k in ("weight_share", "reached_layers", "candidate_layers")}
            stage = "construct"
            # channel events every 2 steps up to 70% of the run: several removals and re-growths
            chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9), model,
                                   density=0.1, channel_sparsity=0.5, total_steps=steps, update_interval=2,
                                   channel_end=0.7, example_inputs=torch.randn(1, 3, hw, hw),
                                   **SETTINGS[setting])
            report = chase.channel_report()
            res["groups"] = len(report)
            res["prunable_channels"] = sum(r["channels"] for r in report)
            stage = "train"
            g = torch.Generator().manual_seed(1)

            def train(n: int) -> float:
                model.train()
                for _ in range(n):
                    x = torch.randn(batch, 3, hw, hw, generator=g)
                    loss = F.cross_entropy(model(x), torch.randint(0, 10, (batch,), generator=g))
                    chase.zero_grad()
                    loss.backward()
                    chase.step()
                return float(loss)

            res["loss"] = train(steps)
            res["removed_channels"] = res["prunable_channels"] - sum(r["live"] for r in chase.channel_report())
            stage = "slim"
            model.eval()
            masked = copy.deepcopy(model)
            chase.slim_()
            res["params_after"] = nparams()
            stage = "compare"
            x = torch.randn(8, 3, hw, hw, generator=torch.Generator().manual_seed(7))
            res["rel_diff_eval"] = _diff(masked, model, x)
            res["rel_diff_norms_train"] = _diff(_norms_train(masked), _norms_train(model), x)
            stage = "train after the slim"
            res["loss_after_slim"] = train(3)
            stage = "export_dense"
            model.eval()
            dense = export_dense(model)
            res["export_rel_diff"] = _diff(model, dense, x)
            if res["export_rel_diff"] != res["export_rel_diff"]:  # NaN: running statistics gone bad (below)
                res["export_rel_diff"] = _diff(_norms_train(model), _norms_train(dense), x)
            # Eval mode decides. After a few steps on noise some models' running statistics are
            # not finite (MNASNet: torchvision's BatchNorm momentum 0.0003), with or without
            # Chase: eval outputs are NaN in both models, and the comparison with the norms in
            # train mode decides instead (batch statistics of 8 inputs; where a map is 1x1 they
            # come from 8 values, which magnifies rounding, so it is not the first choice).
            diff = res["rel_diff_eval"] if res["rel_diff_eval"] == res["rel_diff_eval"] else res["rel_diff_norms_train"]
            res["ok"] = diff <= TOLERANCE and res["export_rel_diff"] <= TOLERANCE
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            res["ok"] = False
            res["error"] = f"at {stage}: {type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-3000:]
    msgs = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    res["coverage_warning"] = next((m for m in msgs if "candidate layers" in m), None)
    res["warnings"] = [m[:500] for m in msgs]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, metavar="MODEL")
    ap.add_argument("--settings", nargs="+", default=["base", "coupled", "coupled_round8", "slim_during_training"],
                    choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "torchvision-sweep.json"))
    a = ap.parse_args(argv)
    import torchvision

    torch.set_num_threads(a.threads)
    out: dict[str, Any] = {
        "what": "ChaseOptimizer on torchvision's models: trains, slims, slim == masked, export (random data)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(), "threads": a.threads,
        "settings": {"steps": a.steps, "batch": a.batch, "density": 0.1, "channel_sparsity": 0.5,
                     "update_interval": 2, "channel_end": 0.7, "tolerance": TOLERANCE,
                     "per_setting": {s: SETTINGS[s] for s in a.settings}},
        "runs": [],
    }
    for name in a.models:
        for setting in a.settings:
            r = one_run(name, setting, a.steps, a.batch)
            out["runs"].append(r)
            cov = r["coverage_warning"]
            share = r.get("coverage", {}).get("weight_share")
            print(f"{name:>20} {setting:<20} {'ok ' if r['ok'] else 'BAD'} groups {r.get('groups', '-'):>3} "
                  f"({'-' if share is None else f'{100 * share:.0f}%'} of the candidates' weights) "
                  f"removed {r.get('removed_channels', '-')}/{r.get('prunable_channels', '-')} params "
                  f"{r.get('params_before', 0) / 1e6:.2f} -> {r.get('params_after', 0) / 1e6:.2f} M, diff "
                  f"{r.get('rel_diff_eval', float('nan')):.1e} / {r.get('rel_diff_norms_train', float('nan')):.1e}"
                  f"{', ' + r['error'] if 'error' in r else ''}{', low coverage' if cov else ''} "
                  f"({r['seconds']:.0f} s)", flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out + ".tmp", "w") as f:
                json.dump(out, f, indent=1)
            os.replace(a.out + ".tmp", a.out)
    bad = [f"{r['model']}/{r['setting']}" for r in out["runs"] if not r["ok"]]
    print(f"{len(out['runs']) - len(bad)} of {len(out['runs'])} runs ok" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
