"""Chase under PyTorch Lightning: ``configure_optimizers`` returns a ``ChaseOptimizer``.

A small MLP learns a synthetic task (labels from a fixed random teacher network, no
download) at 80% sparsity with half of its hidden channels removed during training
(``slim_during_training=True``), checkpoints with Lightning's ``ModelCheckpoint`` and
resumes from such a checkpoint. ``chase_ext.lightning.ChaseCallback`` re-wraps Lightning's
DDP after every slim and lets a slimmed checkpoint load into a freshly built model.

    pip install lightning
    python examples/lightning_chase.py                                  # 1 process
    python examples/lightning_chase.py --devices 2                      # DDP, 2 CPU processes (gloo)
    python examples/lightning_chase.py --accumulate 2 --precision bf16-mixed
    python examples/lightning_chase.py --stop-after 2                   # as if interrupted after epoch 2
    python examples/lightning_chase.py --resume runs/lightning/last.ckpt  # ... and resumed

With ``--devices 2`` Lightning's ``ddp`` strategy starts the second process by running this
script again. (``ddp_spawn`` does not fit a run that slims: at the end it copies rank 0's
weights into the main process's full-width model, which the narrower tensors do not fit.)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:  # run from a checkout without installing
    import chase_ext  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from chase_ext import ChaseOptimizer
from chase_ext.lightning import ChaseCallback
from chase_ext.training import schedule_error

IN, HIDDEN, CLASSES = 32, 64, 8
DENSITY, SC = 0.2, 0.5  # kept weights; channel sparsity S_c


def teacher_data(n: int, seed: int = 0) -> TensorDataset:
    """Inputs ~ N(0, 1) and the labels a fixed random two-layer network gives them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w1, w2 = torch.randn(IN, 48, generator=g), torch.randn(48, CLASSES, generator=g)
    return TensorDataset(x, (torch.tanh(x @ w1) @ w2).argmax(1))


class LitMLP(pl.LightningModule):
    def __init__(self, total_steps: int, report_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).float(), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return ChaseOptimizer(
            opt, self, density=DENSITY, channel_sparsity=SC, total_steps=self.hparams.total_steps,
            example_inputs=torch.randn(2, IN), slim_during_training=True,
        )

    def on_train_end(self):
        chase = self.trainer.optimizers[0]
        widths = [g["live"] for g in chase.channel_report()]
        print(f"rank {self.global_rank}: {chase.t} steps, {chase.slim_count} slims, hidden widths {widths}")
        if self.hparams.report_dir:  # what each rank ended with (the test suite compares ranks)
            wrapper = self.trainer.strategy.model
            torch.save({"t": chase.t, "slims": chase.slim_count, "report": chase.channel_report(),
                        "masks": dict(chase.masks), "params": {n: q.detach() for n, q in self.net.named_parameters()},
                        "wrapper": type(wrapper).__name__,
                        "wrapper_slims": getattr(wrapper, "_chase_slim_count", None)},
                       os.path.join(self.hparams.report_dir, f"rank{self.global_rank}.pt"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1, help="CPU processes (DDP with gloo when > 1)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the schedule (sets total_steps)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (to resume later)")
    p.add_argument("--samples", type=int, default=2048, help="training samples (batch 64)")
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed")
    p.add_argument("--out", default="runs/lightning", help="checkpoint folder (last.ckpt)")
    p.add_argument("--resume", default=None, help="a checkpoint to resume from")
    p.add_argument("--report-dir", default=None, help="write each rank's final state here")
    args = p.parse_args(argv)
    if min(args.devices, args.epochs, args.samples, args.accumulate) < 1:
        p.error("--devices, --epochs, --samples and --accumulate must be >= 1")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        p.error(f"--stop-after must be in [1, --epochs={args.epochs}]")

    data = DataLoader(teacher_data(args.samples), batch_size=64, shuffle=False)
    # Lightning shards by rank, and steps on the last, partial accumulation of an epoch too
    steps_per_epoch = math.ceil(math.ceil(len(data) / args.devices) / args.accumulate)
    why = schedule_error(args.epochs * steps_per_epoch, density=DENSITY, channel_sparsity=SC)
    if why:
        p.error(f"{why} (raise --epochs or --samples)")
    torch.manual_seed(0)
    model = LitMLP(total_steps=args.epochs * steps_per_epoch, report_dir=args.report_dir)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.stop_after or args.epochs, accumulate_grad_batches=args.accumulate, precision=args.precision,
        callbacks=[ChaseCallback(), ModelCheckpoint(dirpath=args.out, save_last=True)],
        logger=False, enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(model, data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
