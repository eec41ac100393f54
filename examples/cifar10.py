"""Bring your own data: the chase-demo comparison on CIFAR-10 (torchvision).

Trains a VGG-11-style CNN three ways with the same seed, data order and weight budget —
dense, unstructured DST (S_c = 0) and Chase (S_c = --channel-sparsity) — slims the Chase
model and writes the same report folder as ``chase-demo`` (results.json + PNGs). The
training loop, counting and timing are ``chase_ext.training``, shared with the demo.

    pip install torchvision                       # pairs with your torch
    python examples/cifar10.py --data-dir ~/data --download --epochs 30 --device cuda

CIFAR-10 is downloaded only with ``--download``. Any other data works through
:func:`run`, which takes two ``torch.utils.data.Dataset`` objects yielding
``(image tensor, int label)``; ``--fake-data N`` uses torchvision's ``FakeData`` of
CIFAR's shape (N training images) to check the pipeline without any download.

Image size: VGG-11 halves the image five times (five 2x2 max-pools), so images must be
square and at least 32 x 32 pixels (CIFAR's size); smaller ones (e.g. 28 x 28 MNIST) are
rejected with a ``ValueError`` before training. Any channel count works.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

try:  # run from a checkout without installing
    import chase_ext  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chase_ext import measure as M
from chase_ext import training as T
from chase_ext.demo import _check_device, _HelpFormatter, _make_out_dir, format_table, write_report

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
MIN_SIZE = 2 ** VGG11.count("M")  # 32: every max-pool needs an input of at least 2 x 2
TORCHVISION_HINT = ("this needs torchvision (CIFAR-10 and --fake-data come from it): "
                    "pip install torchvision  (the build that pairs with your torch), "
                    "or call run() with your own datasets")


def vgg11_cfg(width: float = 1.0) -> tuple:
    """VGG-11's conv widths scaled by ``width`` (at least 2 channels per conv)."""
    return tuple(v if v == "M" else max(2, int(round(v * width))) for v in VGG11)


def cifar_datasets(data_dir: str, download: bool = False, augment: bool = True):
    """CIFAR-10 train/test with the usual crop + flip augmentation and normalisation."""
    import torchvision.transforms as tr
    from torchvision.datasets import CIFAR10

    norm = [tr.ToTensor(), tr.Normalize(CIFAR_MEAN, CIFAR_STD)]
    aug = [tr.RandomCrop(32, padding=4), tr.RandomHorizontalFlip()] if augment else []
    train = CIFAR10(data_dir, train=True, download=download, transform=tr.Compose(aug + norm))
    test = CIFAR10(data_dir, train=False, download=download, transform=tr.Compose(norm))
    return train, test


def fake_datasets(n_train: int, n_test: int | None = None, seed: int = 0):
    """torchvision ``FakeData`` of CIFAR-10's shape (3 x 32 x 32, 10 classes)."""
    import torchvision.transforms as tr
    from torchvision.datasets import FakeData

    t = tr.Compose([tr.ToTensor(), tr.Normalize(CIFAR_MEAN, CIFAR_STD)])
    n_test = n_test if n_test is not None else max(10, n_train // 4)
    train = FakeData(n_train, (3, 32, 32), 10, transform=t, random_offset=seed)
    test = FakeData(n_test, (3, 32, 32), 10, transform=t, random_offset=seed + 10**6)
    return train, test


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the command-line settings ``args``, or None."""
    if args.fake_data < 0:
        return f"--fake-data must be >= 0 (0 = real CIFAR-10), got {args.fake_data}"
    if not 0 < args.density <= 1:
        return f"--density must lie in (0, 1], got {args.density}"
    if not 0 <= args.channel_sparsity < 1:
        return f"--channel-sparsity must lie in [0, 1), got {args.channel_sparsity}"
    if args.epochs < 1:
        return f"--epochs must be >= 1, got {args.epochs}"
    if not 0 <= args.seed < 2**64:
        return f"--seed must lie in [0, 2**64), got {args.seed}"
    if not args.out or (os.path.exists(args.out) and not os.path.isdir(args.out)):
        return f"--out {args.out!r} must name a folder (it is created), not a file"
    why = _check_device(args.device)
    if why:
        return why
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"--lr must be a finite number > 0, got {args.lr}"
    if not (math.isfinite(args.width) and args.width > 0):
        return f"--width must be a finite number > 0, got {args.width}"
    if args.num_classes < 2:
        return f"--num-classes must be >= 2, got {args.num_classes}"
    if args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1 (or left out for the default), got {args.threads}"
    if args.bench_batch < 1:
        return f"--bench-batch must be >= 1, got {args.bench_batch}"
    if args.bench_rounds < 1:
        return f"--bench-rounds must be >= 1, got {args.bench_rounds}"
    return _make_out_dir(args.out)  # last, once all else is valid


def check_steps(args: argparse.Namespace, n_train: int) -> str | None:
    """Whether ``n_train`` images at ``args``' batch size and epochs give the Chase run
    enough optimizer steps for its channel schedule, or what is wrong."""
    per_epoch = n_train // args.batch_size if n_train > args.batch_size else 1  # drop_last, as _run's loader
    why = T.schedule_error(args.epochs * per_epoch, density=args.density, channel_sparsity=args.channel_sparsity)
    return f"{why} (raise --epochs or the number of images, or lower --batch-size)" if why else None


def run(train_ds: Dataset, test_ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """The three-way comparison on any pair of datasets; writes ``args.out``; returns results.

    Raises ``ValueError`` for invalid settings in ``args`` or images smaller than
    ``MIN_SIZE`` (32) pixels a side.
    """
    why = check_args(args) or check_steps(args, len(train_ds))
    if why:
        raise ValueError(why)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or M.default_threads())
    try:
        return _run(train_ds, test_ds, args)
    finally:
        torch.set_num_threads(old_threads)


def _run(train_ds: Dataset, test_ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = torch.device(args.device)
    pin = device.type == "cuda"

    def train_loader():
        # a fresh, identically seeded loader per run: every run sees the same batches
        g = torch.Generator().manual_seed(args.seed)
        return DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=g,
                          num_workers=args.workers, pin_memory=pin, drop_last=len(train_ds) > args.batch_size,
                          persistent_workers=False)

    test_loader = DataLoader(test_ds, batch_size=max(256, args.batch_size), num_workers=args.workers, pin_memory=pin)
    n_bench = min(args.bench_batch, len(test_ds))
    bench = torch.stack([test_ds[i][0] for i in range(n_bench)])
    x0 = bench[:2]
    if x0.dim() != 4 or x0.shape[-1] != x0.shape[-2] or x0.shape[-1] < MIN_SIZE:
        raise ValueError(
            f"the VGG-11 of this example needs square images of at least {MIN_SIZE} x {MIN_SIZE} pixels "
            f"(C x H x W tensors; it max-pools {VGG11.count('M')} times), got images of shape "
            f"{list(x0.shape[1:])}; resize them (e.g. torchvision.transforms.Resize({MIN_SIZE}))"
        )
    num_classes = args.num_classes
    cfg = vgg11_cfg(args.width)
    hidden = max(4, int(round(512 * args.width)))
    res = T.run_comparison(
        lambda: T.vgg(cfg, in_ch=x0.shape[1], size=x0.shape[-1], num_classes=num_classes, hidden=hidden),
        train_loader,
        test_loader,
        x0,
        epochs=args.epochs,
        density=args.density,
        channel_sparsity=args.channel_sparsity,
        seed=args.seed,
        lr=args.lr,
        device=device,
        backend=None if args.backend == "auto" else args.backend,
        progress=not args.no_progress,
        bench_batch=bench,
        bench_rounds=args.bench_rounds,
        threads=torch.get_num_threads(),
    )
    res["config"] = {**vars(args), "model": f"vgg{cfg}, hidden {hidden}", "backend": res["backend"],
                     "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    res["data"] = {"source": getattr(args, "data_source", "datasets given to run()"), "n_train": len(train_ds), "n_test": len(test_ds),
                   "image_shape": list(x0.shape[1:])}
    out = write_report(res, args.out, plots=not args.no_plots, t_start=t_start)
    print()
    print(format_table(out))
    print(f"\nreport: {os.path.abspath(args.out)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"Needs torchvision (pip install torchvision). Images must be square, "
                                f"at least {MIN_SIZE} x {MIN_SIZE} pixels (VGG-11 max-pools "
                                f"{VGG11.count('M')} times).",
                                formatter_class=_HelpFormatter)
    p.add_argument("--data-dir", default="./data", help="where CIFAR-10 is (or goes with --download)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    p.add_argument("--fake-data", type=int, default=0, metavar="N",
                   help="use N fake CIFAR-shaped training images instead (no download; for tests)")
    p.add_argument("--density", type=float, default=0.1, help="kept weights of the sparse runs, in (0, 1]")
    p.add_argument("--channel-sparsity", "--sc", dest="channel_sparsity", type=float, default=0.5,
                   help="S_c: share of prunable channels Chase removes, in [0, 1)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run, >= 1")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**64)")
    p.add_argument("--out", default="report_cifar10", help="report folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=128, help=">= 1")
    p.add_argument("--lr", type=float, default=0.05, help="SGD peak learning rate, > 0")
    p.add_argument("--width", type=float, default=1.0, help="multiplier of VGG-11's channel widths, > 0")
    p.add_argument("--num-classes", type=int, default=10, help=">= 2")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, >= 0")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads, >= 1 (default: half of torch's count, at least 1)")
    p.add_argument("--backend", choices=("auto", "native", "reference"), default="auto",
                   help="Chase ops: compiled kernels or the pure-PyTorch reference")
    p.add_argument("--bench-batch", type=int, default=256, help="batch size of the throughput measurement, >= 1")
    p.add_argument("--bench-rounds", type=int, default=7, help="interleaved timing rounds, >= 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="results.json only")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, load CIFAR-10 (or fake data) and :func:`run`; returns the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    why = check_args(args)
    if why:
        parser.error(why)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise SystemExit(f"{parser.prog}: {TORCHVISION_HINT}") from None
    if args.fake_data:
        train_ds, test_ds = fake_datasets(args.fake_data, seed=args.seed)
        args.data_source = f"torchvision FakeData, CIFAR-10 shape ({args.fake_data} train)"
    else:
        try:
            train_ds, test_ds = cifar_datasets(args.data_dir, download=args.download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise SystemExit(f"{e}\nCIFAR-10 not found in {args.data_dir!r}: pass --download (or --fake-data N)")
        args.data_source = f"CIFAR-10 (torchvision) from {os.path.abspath(args.data_dir)}"
    why = check_steps(args, len(train_ds))
    if why:
        parser.error(why)
    return run(train_ds, test_ds, args)


if __name__ == "__main__":
    main()
    sys.exit(0)
