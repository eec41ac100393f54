"""Chase under Hugging Face accelerate: ``accelerator.prepare(model, chase, loader)``.

A small MLP learns a synthetic task (labels from a fixed random teacher network, no
download) at 80% sparsity with half of its hidden channels removed during training
(``slim_during_training=True``), with accelerate's gradient accumulation, mixed precision
and ``save_state`` / ``load_state``. Two calls from ``chase_ext.accelerate`` are all a
slimming run needs: ``rewrap`` after each step (DDP cannot follow shrinking parameters)
and ``enable_slimmed_resume`` (a slimmed state loads into a freshly built model).

    pip install accelerate
    python examples/accelerate_chase.py                                  # 1 process
    torchrun --nproc_per_node 2 examples/accelerate_chase.py             # DDP, 2 CPU processes (gloo)
    python examples/accelerate_chase.py --accumulate 2 --mixed-precision bf16
    python examples/accelerate_chase.py --stop-after 2                   # as if interrupted after epoch 2
    python examples/accelerate_chase.py --resume runs/accelerate/last    # ... and resumed

(On CPUs ``accelerate launch --cpu`` starts one process unless it goes through mpirun;
``torchrun`` sets the environment ``Accelerator`` reads for several CPU processes.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:  # run from a checkout without installing
    import chase_ext  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator

import chase_ext.accelerate as chase_accelerate
from chase_ext import ChaseOptimizer
from chase_ext.training import schedule_error

IN, HIDDEN, CLASSES = 32, 64, 8
DENSITY, SC = 0.2, 0.5  # kept weights; channel sparsity S_c


def teacher_data(n: int, seed: int = 0) -> TensorDataset:
    """Inputs ~ N(0, 1) and the labels a fixed random two-layer network gives them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w1, w2 = torch.randn(IN, 48, generator=g), torch.randn(48, CLASSES, generator=g)
    return TensorDataset(x, (torch.tanh(x @ w1) @ w2).argmax(1))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="epochs of the schedule (sets total_steps)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (to resume later)")
    p.add_argument("--samples", type=int, default=2048, help="training samples (batch 64)")
    p.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--out", default="runs/accelerate", help="save_state folder (<out>/last)")
    p.add_argument("--resume", default=None, help="a save_state folder to resume from")
    args = p.parse_args(argv)
    if min(args.epochs, args.samples, args.accumulate) < 1:
        p.error("--epochs, --samples and --accumulate must be >= 1")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        p.error(f"--stop-after must be in [1, --epochs={args.epochs}]")

    acc = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.accumulate,
                      mixed_precision=args.mixed_precision)
    data = DataLoader(teacher_data(args.samples), batch_size=64, shuffle=False)
    batches = -(-len(data) // acc.num_processes)  # per process: prepare() shards the loader
    steps_per_epoch = -(-batches // args.accumulate)  # accelerate steps on the last, partial accumulation too
    why = schedule_error(args.epochs * steps_per_epoch, density=DENSITY, channel_sparsity=SC)
    if why:
        p.error(f"{why} (raise --epochs or --samples)")
    torch.manual_seed(0)
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    chase = ChaseOptimizer(opt, net, density=DENSITY, channel_sparsity=SC, total_steps=args.epochs * steps_per_epoch,
                           example_inputs=torch.randn(2, IN), slim_during_training=True)
    model, optimizer, loader = acc.prepare(net, chase, data)
    chase_accelerate.enable_slimmed_resume(acc, chase)

    first = 0
    if args.resume:
        acc.load_state(args.resume)
        model = chase_accelerate.rewrap(acc, model, chase)  # the load replayed the slims
        first = chase.t // steps_per_epoch
        acc.print(f"resumed at step {chase.t} (epoch {first}), hidden widths "
                  f"{[g['live'] for g in chase.channel_report()]}")
    for epoch in range(first, args.stop_after or args.epochs):
        for x, y in loader:
            with acc.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                model = chase_accelerate.rewrap(acc, model, chase)  # a new DDP wrapper after a slim
        acc.print(f"epoch {epoch + 1}: loss {loss.item():.3f}, step {chase.t}, {chase.slim_count} slims, "
                  f"hidden widths {[g['live'] for g in chase.channel_report()]}")
    acc.save_state(os.path.join(args.out, "last"))
    acc.end_training()


if __name__ == "__main__":
    main()
