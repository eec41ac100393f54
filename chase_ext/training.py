"""Training and evaluation helpers shared by the demo and the examples.

Nothing here is part of the Chase method; it is the plain loop a user would write
around :class:`chase_ext.ChaseOptimizer`, plus the demo's three-way comparison (the
figures it reports are measured with :mod:`chase_ext.measure`):

* :class:`TensorLoader` — a seeded, shuffling batch iterator over in-memory tensors
  (much faster than ``DataLoader`` for a few thousand small images);
* :func:`vgg` — a VGG-style CNN (conv-BN-ReLU blocks, max-pool, 2-layer classifier) for
  any input size, so every conv and the hidden linear layer are prunable channels;
* :func:`resnet` — a small bottleneck ResNet (ResNet-50's block, fewer and narrower
  stages), so residual-coupled channel groups can be trained and measured on small images;
* :func:`resnext` — a small ResNeXt (grouped 3x3 convs), for channel groups through
  grouped convs (``grouped_channels``);
* :func:`efficientnet` — a small EfficientNet (MBConv blocks with squeeze-and-excitation),
  for the gated channel groups (``gated_channels``);
* :func:`densenet` — a small DenseNet-BC, for channels read inside concatenations
  (``concat_channels``);
* :func:`train` — one training run, dense (plain optimizer) or sparse (the optimizer
  wrapped in ``ChaseOptimizer``), with a tqdm bar, per-epoch test accuracy and hooks;
* :func:`evaluate`, :func:`predict`;
* :func:`run_comparison` — dense vs DST vs Chase on one task, with accuracy, size, MACs,
  channel density and throughput, and the channel-density helpers it reports with.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .measure import count_macs, count_params, measure_throughput, sparse_weights

__all__ = [
    "TensorLoader",
    "vgg",
    "resnet",
    "resnext",
    "efficientnet",
    "densenet",
    "pick_backend",
    "train",
    "evaluate",
    "predict",
    "channel_density_stats",
    "live_channels",
    "run_comparison",
    "summarize_channel_density",
    "schedule_error",
]


# --------------------------------------------------------------------------- data
class TensorLoader:
    """Batches of ``(x[i], y[i])`` from in-memory tensors.

    With ``shuffle=True`` every epoch draws a fresh permutation from a private CPU
    generator seeded with ``seed``: two loaders built alike yield the same batches in the
    same order, so runs compared "with the same seed" see the same data.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, device: str | torch.device | None = None):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dev = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(dev), y.to(dev)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.gen).to(self.x.device)
        else:
            order = None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            if order is None:
                yield self.x[sl], self.y[sl]
            else:
                idx = order[sl]
                yield self.x[idx], self.y[idx]


# --------------------------------------------------------------------------- model
class VGG(nn.Module):
    """``features`` (conv3x3-BN-ReLU blocks and 2x2 max-pools) -> flatten -> MLP head."""

    def __init__(self, cfg: Sequence[int | str], in_ch: int, size: int, num_classes: int, hidden: int):
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_ch, size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                s //= 2
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * s * s, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(cfg: Sequence[int | str] = (16, "M", 32, "M", 64, 64, "M"), *, in_ch: int = 1, size: int = 28,
        num_classes: int = 10, hidden: int = 128) -> VGG:
    """A VGG-style CNN. ``cfg`` lists conv widths, ``"M"`` for a 2x2 max-pool."""
    return VGG(cfg, in_ch, size, num_classes, hidden)


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 -> 3x3 (stride here) -> 1x1 to ``expansion * width``, each with a
    BatchNorm; ReLU after the residual add. The shortcut is a 1x1 conv + BN where shape
    changes, so the block output, the shortcut and every later block of the stage form one
    residual-coupled channel group."""

    def __init__(self, cin: int, width: int, stride: int, groups: int = 1, expansion: int = 4):
        super().__init__()
        cout = width * expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # groups > 1: ResNeXt's grouped 3x3 conv
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet(nn.Module):
    """conv3x3-BN-ReLU stem -> stages of :class:`Bottleneck` blocks (the first block of
    every stage halves the resolution) -> global average pool -> linear."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], stem: int, in_ch: int, num_classes: int,
                 groups: int = 1, expansion: int = 4):
        super().__init__()
        if len(widths) != len(blocks) or not widths or min(blocks) < 1 or min(widths) < 1 or stem < 1:
            raise ValueError(f"resnet: widths and blocks must be non-empty lists of positive integers of "
                             f"one length, stem >= 1; got widths={list(widths)}, blocks={list(blocks)}, stem={stem}")
        if groups < 1 or expansion < 1 or any(int(w) % groups for w in widths):
            raise ValueError(f"resnext: groups and expansion must be >= 1 and every width a multiple of groups; "
                             f"got widths={list(widths)}, groups={groups}, expansion={expansion}")
        self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True))
        stages, c = [], stem
        for w, n in zip(widths, blocks):
            layer = []
            for i in range(n):
                layer.append(Bottleneck(c, int(w), 2 if i == 0 else 1, groups, expansion))
                c = int(w) * expansion
            stages.append(nn.Sequential(*layer))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet(widths: Sequence[int] = (16, 32), blocks: Sequence[int] = (2, 2), *, stem: int = 16, in_ch: int = 1,
           num_classes: int = 10) -> ResNet:
    """A small bottleneck ResNet: ``widths`` are the blocks' inner widths per stage (outputs
    4x that), ``blocks`` the blocks per stage. The default (28x28 input: 14x14 and 7x7
    stages, 4.3 M MACs, 53 k weights) costs about what the demo's VGG does (3.8 M, 136 k)."""
    return ResNet(widths, blocks, stem, in_ch, num_classes)


def resnext(widths: Sequence[int] = (32, 64), blocks: Sequence[int] = (2, 2), *, groups: int = 8, stem: int = 16,
            in_ch: int = 1, num_classes: int = 10) -> ResNet:
    """A small ResNeXt: :func:`resnet`'s stages with twice the inner width, the 3x3 conv
    grouped (``groups`` conv groups) and outputs 2x the inner width, as in ResNeXt-50
    32x4d. The default (28x28 input: outputs 64/128 as :func:`resnet`'s) costs 5.2 M MACs
    and has 59 k weights. Its convs meet grouped convs: ``grouped_channels`` prunes them."""
    return ResNet(widths, blocks, stem, in_ch, num_classes, groups=groups, expansion=2)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (torchvision's SqueezeExcitation): each channel of the map is
    scaled by a gate computed from the map's channel means."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return self.gate(self.fc2(self.act(self.fc1(self.pool(x))))) * x


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand (ratio > 1) -> 3x3 depthwise (stride here) ->
    squeeze-and-excitation (squeeze to a quarter of the block input) -> 1x1 project, each
    conv with a BatchNorm, SiLU after the first two; a residual add where shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.SiLU(inplace=True), SqueezeExcite(hidden, max(1, cin // 4)),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNet(nn.Module):
    """conv3x3-BN-SiLU stem -> :class:`MBConv` stages -> 1x1 head conv -> pool -> linear."""

    def __init__(self, stages: Sequence[tuple[int, int, int, int]], stem: int, head: int, in_ch: int,
                 num_classes: int):
        super().__init__()
        if not stages or any(len(st) != 4 or min(st) < 1 for st in stages) or stem < 1 or head < 1:
            raise ValueError(f"efficientnet: stages must be (expand, channels, blocks, stride) tuples of positive "
                             f"integers, stem and head >= 1; got stages={list(stages)}, stem={stem}, head={head}")
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_ch, stem, 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(stem), nn.SiLU(inplace=True))]
        c = stem
        for expand, cout, n, stride in stages:
            for i in range(n):
                layers.append(MBConv(c, cout, stride if i == 0 else 1, expand))
                c = cout
        layers.append(nn.Sequential(nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), nn.SiLU(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def efficientnet(stages: Sequence[tuple[int, int, int, int]] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 40, 2, 2)), *,
                 stem: int = 16, head: int = 128, in_ch: int = 1, num_classes: int = 10) -> EfficientNet:
    """A small EfficientNet: ``stages`` are (expand ratio, output channels, blocks, stride of
    the first block). Most of its weights sit in expand convs whose channels a
    squeeze-and-excitation gate scales: SPEC's rule leaves them out, ``gated_channels=True``
    prunes them."""
    return EfficientNet(stages, stem, head, in_ch, num_classes)


class _DenseLayer(nn.Module):
    """DenseNet-BC's layer (torchvision's layout): BN-ReLU-1x1 conv (``inner`` channels)
    -BN-ReLU-3x3 conv (``growth`` channels) over the concatenation of every earlier output
    of its block."""

    def __init__(self, cin: int, growth: int, inner: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(torch.relu(self.norm1(torch.cat(feats, 1))))
        return self.conv2(torch.relu(self.norm2(x)))


class DenseNet(nn.Module):
    """DenseNet-BC: a 3x3 stem of stride 2, dense blocks whose layers read the concatenation of all
    earlier outputs of their block, transitions (BN-ReLU-1x1 conv halving the channels,
    2x2 average pool) between them, then BN-ReLU, global average pool and a linear head."""

    def __init__(self, growth: int, blocks: Sequence[int], stem: int, in_ch: int, num_classes: int):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, stem, 3, stride=2, padding=1, bias=False)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        c = stem
        for i, n in enumerate(blocks):
            layers = nn.ModuleList()
            for _ in range(n):
                layers.append(_DenseLayer(c, growth, 4 * growth))
                c += growth
            self.blocks.append(layers)
            if i + 1 < len(blocks):
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                      nn.AvgPool2d(2)))
                c //= 2
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, layers in enumerate(self.blocks):
            feats = [x]
            for layer in layers:
                feats.append(layer(feats))
            x = torch.cat(feats, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        x = torch.relu(self.norm(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def densenet(growth: int = 12, blocks: Sequence[int] = (4, 4, 4), *, stem: int = 24, in_ch: int = 1,
             num_classes: int = 10) -> DenseNet:
    """A small DenseNet-BC (growth 12, three blocks of 4 layers). Every layer's output is
    read inside concatenations: SPEC's rule prunes only each layer's inner 1x1 conv (30% of
    the candidate layers' weights), ``concat_channels=True`` prunes them all. On 28x28
    digits: 8.2 M MACs, 102 k weights."""
    return DenseNet(growth, blocks, stem, in_ch, num_classes)


# --------------------------------------------------------------------------- backend
def pick_backend(device: str | torch.device = "cpu") -> str:
    """``"native"`` when the compiled ops load (and have kernels for ``device``), else ``"reference"``."""
    try:
        from . import _ops
    except Exception:  # not built / built against another torch
        return "reference"
    if torch.device(device).type == "cuda":
        try:
            if not _ops.build_info()["has_cuda"]:
                return "reference"
        except Exception:
            return "reference"
    return "native"


# --------------------------------------------------------------------------- eval
@torch.inference_mode()
def predict(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader (eval mode; the training flag is restored)."""
    was = model.training
    model.eval()
    outs, ys = [], []
    try:
        for x, y in loader:
            outs.append(model(x.to(device, non_blocking=True)).float().cpu())
            ys.append(y.cpu())
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in [0, 1]."""
    logits, y = predict(model, loader, device)
    return float((logits.argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- training
def train(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
    chase: dict | None = None,
    example_inputs: torch.Tensor | None = None,
    desc: str = "train",
    progress: bool = True,
    record_every: int | None = None,
    on_start: Callable[[Any], None] | None = None,
    on_record: Callable[[int, Any], None] | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` with SGD (momentum, weight decay) and a per-step cosine LR.

    ``chase=None`` trains dense with the plain optimizer. Otherwise ``chase`` holds the
    keywords of :class:`chase_ext.ChaseOptimizer` (``density``, ``channel_sparsity``,
    ``seed``, ``backend``, ...; ``total_steps`` and ``example_inputs`` are filled in here)
    and the optimizer is wrapped. ``on_start(opt)`` runs before the first step (the ERK
    start of a sparse run is visible there); ``on_record(t, opt)`` runs every
    ``record_every`` steps and at the end of every epoch.

    Returns ``{"optimizer", "acc_history" (test accuracy after each epoch),
    "loss_history" (mean train loss per epoch), "train_seconds", "eval_seconds",
    "steps", "test_acc"}``.
    """
    device = torch.device(device)
    model.to(device)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    total = steps_per_epoch * epochs
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt: Any = base
    if chase is not None:
        from .optimizer import ChaseOptimizer

        kw = dict(chase)
        kw.setdefault("total_steps", total)
        if example_inputs is not None:
            kw.setdefault("example_inputs", example_inputs.to(device))
        opt = ChaseOptimizer(base, model, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    if on_start is not None:
        on_start(opt)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    acc_hist: list[float] = []
    loss_hist: list[float] = []
    t_train = t_eval = 0.0
    step = 0
    bar = _bar(total, desc, progress)
    try:
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            run_loss = torch.zeros((), device=device)
            nb = 0
            for x, y in train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                run_loss += loss.detach()
                nb += 1
                step += 1
                if on_record is not None and record_every and step % record_every == 0:
                    on_record(step, opt)
                if bar is not None:
                    bar.update(1)
            del loss  # no stale graph alive across slimming
            loss_hist.append(float(run_loss) / max(1, nb))
            t1 = time.perf_counter()
            t_train += t1 - t0
            acc = evaluate(model, test_loader, device)
            t_eval += time.perf_counter() - t1
            acc_hist.append(acc)
            if on_record is not None and not (record_every and step % record_every == 0):
                on_record(step, opt)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_hist[-1]:.3f}", acc=f"{acc:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return {
        "optimizer": opt,
        "acc_history": acc_hist,
        "loss_history": loss_hist,
        "train_seconds": t_train,
        "eval_seconds": t_eval,
        "steps": step,
        "test_acc": acc_hist[-1] if acc_hist else evaluate(model, test_loader, device),
    }


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but the loop must not need it
        return None
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=True)


# --------------------------------------------------------------------------- introspection
def channel_density_stats(opt: Any, model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Per output channel of every sparse tensor: density (active / original fan-in) and UMM.

    Reads ``opt.channel_stats()`` (active count and Σ|w| per row). Fan-in is taken from
    the current shape, so call this before slimming (or on an unslimmed optimizer).
    """
    params = dict(model.named_parameters())
    out = {}
    for name, (count, absum) in opt.channel_stats().items():
        p = params[name]
        fan_in = p[0].numel() if p.dim() > 0 else 1
        out[name] = {
            "density": (count.double() / fan_in).cpu().tolist(),
            "umm": (absum.double() / fan_in).cpu().tolist(),
            "fan_in": fan_in,
        }
    return out


def live_channels(opt: Any) -> dict[str, tuple[int, int]]:
    """``{group: (original channels, live channels)}`` from ``opt.channel_report()``."""
    return {str(r["group"]): (int(r["channels"]), int(r["live"])) for r in opt.channel_report()}


# --------------------------------------------------------------------------- the three-way comparison
def schedule_error(total_steps: int, /, **knobs: Any) -> str | None:
    """Why ChaseOptimizer would refuse a run of ``total_steps`` optimizer steps with these
    knobs (the schedule checks of :class:`chase_ext.ChaseConfig`; ``backend`` ignored), or
    None: command-line tools call it before training anything, so a run too short for its
    channel schedule is refused up front, not after the dense and DST runs."""
    import dataclasses

    from .config import ChaseConfig

    fields = {f.name for f in dataclasses.fields(ChaseConfig)}
    kw = {k: v for k, v in knobs.items() if k in fields}  # ChaseOptimizer's own (backend, config) aside
    total_steps = kw.pop("total_steps", total_steps)  # a knob given explicitly wins, as in train()
    if kw.get("channel_sparsity", 0) > 0 and kw.get("channel_groups") is None:
        kw.setdefault("example_inputs", torch.zeros(()))  # only its presence is checked here
    try:
        ChaseConfig(total_steps=total_steps, **kw)
    except ValueError as e:
        return f"a run of {total_steps} optimizer steps cannot hold the Chase schedule: {e}"
    return None


def run_comparison(
    model_fn: Callable[[], nn.Module],
    train_loader_fn: Callable[[], Iterable],
    test_loader: Iterable,
    example: torch.Tensor,
    *,
    epochs: int,
    density: float = 0.1,
    channel_sparsity: float = 0.5,
    seed: int = 0,
    lr: float = 0.05,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    progress: bool = True,
    bench_batch: torch.Tensor | None = None,
    bench_rounds: int = 7,
    threads: int | None = None,
    chase_kwargs: dict | None = None,
    channel_kwargs: dict | None = None,
    amenable_ratio: float = 0.5,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Dense vs unstructured DST (S_c = 0) vs Chase (S_c = ``channel_sparsity``), then slim.

    Every run starts from ``torch.manual_seed(seed)``, ``model_fn()`` and a fresh
    ``train_loader_fn()`` (which must be seeded so all runs see the same batches), and
    trains ``epochs`` epochs with the same SGD + cosine schedule; the two sparse runs keep
    ``round(density * N)`` active weights (ERK start, gradient growth, global scope, SPEC
    defaults otherwise plus ``chase_kwargs``; the Chase run also takes ``channel_kwargs``,
    knobs of the channel part such as ``coupled_channels``). The Chase model is slimmed at the end and
    compared with its masked self; inference throughput of the slim model is measured
    against the dense one (interleaved, medians).

    Returns a JSON-ready dict (see ``chase_ext.demo`` for the report built from it) plus
    the live objects under the keys ``"_models"`` (``dense``, ``dst``, ``chase``) and
    ``"_optimizers"``; drop keys starting with ``_`` before serialising.
    """
    device = torch.device(device)
    backend = backend or pick_backend(device)
    example = example.to(device)
    res: dict[str, Any] = {"runs": {}, "timings": {}}
    models: dict[str, nn.Module] = {}
    opts: dict[str, Any] = {}
    sparse_kw = dict(density=density, seed=seed, backend=backend, **(chase_kwargs or {}))
    plan = [
        ("dense", None),
        ("dst", dict(sparse_kw, channel_sparsity=0.0)),
        ("chase", dict(sparse_kw, channel_sparsity=channel_sparsity, **(channel_kwargs or {}))),
    ]
    total = len(train_loader_fn()) * epochs  # type: ignore[arg-type]
    for name, kw in plan[1:]:  # before the dense run: a schedule that cannot fit fails now
        why = schedule_error(total, **kw)
        if why:
            raise ValueError(f"run_comparison ({name} run): {why}")
    erk_stats: dict = {}
    live_hist: dict[str, Any] = {"steps": [], "groups": {}}

    def record_live(t, opt):
        live_hist["steps"].append(int(t))
        for g, (_, live) in live_channels(opt).items():
            live_hist["groups"].setdefault(g, []).append(live)

    for name, kw in plan:
        torch.manual_seed(seed)
        model = model_fn().to(device)
        n_sparse = sum(p.numel() for _, p in sparse_weights(model))
        loader = train_loader_fn()
        total = len(loader) * epochs  # type: ignore[arg-type]
        hooks: dict[str, Any] = {}
        if name == "dst":
            hooks["on_start"] = lambda opt, m=model: erk_stats.update(channel_density_stats(opt, m))
        if name == "chase":
            hooks["on_start"] = lambda opt: record_live(0, opt)
            hooks["on_record"] = record_live
            hooks["record_every"] = max(1, total // 100)
        torch.manual_seed(seed)  # same dropout / augmentation draws in every run
        t0 = time.perf_counter()
        r = train(model, loader, test_loader, epochs=epochs, lr=lr, device=device, chase=kw,
                  example_inputs=example, desc=f"{name:>5}", progress=progress, **hooks)
        wall = time.perf_counter() - t0
        opt = r.pop("optimizer")
        run = dict(r, wall_seconds=wall, sparse_numel=n_sparse)
        if kw is None:
            run["active_weights"] = int(sum(int((p != 0).sum()) for _, p in sparse_weights(model)))
        else:
            run["active_weights"] = int(opt.active_count())
            run["budget"] = int(opt.budget)
            run["channel_sparsity_target"] = kw["channel_sparsity"]
        run["density"] = run["active_weights"] / n_sparse
        res["runs"][name] = run
        models[name], opts[name] = model, opt
        log(f"{name}: test accuracy {run['test_acc']:.4f} after {epochs} epochs "
            f"({r['train_seconds']:.1f} s training, {r['eval_seconds']:.1f} s eval)")

    # --- the 'sparse amenable channels' of unstructured DST vs its ERK start
    dst_stats = channel_density_stats(opts["dst"], models["dst"])
    res["channel_density"] = summarize_channel_density(erk_stats, dst_stats, amenable_ratio)

    # --- Chase: channels, slimming, equality of the slim and masked models
    chase_opt, chase_model = opts["chase"], models["chase"]
    report = chase_opt.channel_report()
    before = {str(r["group"]): int(r["channels"]) for r in report}
    live = {str(r["group"]): int(r["live"]) for r in report}
    # Compared in full float32: on a GPU, cuDNN may pick other kernels for the narrower
    # convs, and TF32 (its default for convs) would differ by ~1e-3 between the two.
    def exact():
        return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)

    with exact():
        masked_logits, ys = predict(chase_model, test_loader, device)
    masked_macs = count_macs(chase_model, example)
    t0 = time.perf_counter()
    chase_opt.slim_()
    slim_s = time.perf_counter() - t0
    with exact():
        slim_logits, _ = predict(chase_model, test_loader, device)
    mods = dict(chase_model.named_modules())
    after = {}
    for g in before:
        prod = g.split("+")[0]
        w = mods[prod].weight if prod in mods else None
        after[g] = int(w.shape[0]) if w is not None else live[g]
    c0, c1 = sum(before.values()), sum(after.values())
    run = res["runs"]["chase"]
    run.update(
        masked_test_acc=float((masked_logits.argmax(1) == ys).float().mean()),
        slim_test_acc=float((slim_logits.argmax(1) == ys).float().mean()),
        slim_max_abs_logit_diff=float((masked_logits - slim_logits).abs().max()),
        slim_same_predictions=bool(torch.equal(masked_logits.argmax(1), slim_logits.argmax(1))),
        active_weights_after_slim=int(chase_opt.active_count()),
        channels=[{"group": g, "before": before[g], "live": live[g], "after": after[g]} for g in before],
        channels_total_before=c0,
        channels_total_after=c1,
        channel_sparsity=1 - c1 / c0 if c0 else 0.0,
        live_history=live_hist,
        slim_seconds=slim_s,
    )
    cfg = getattr(chase_opt, "config", None)
    if cfg is not None:
        run["schedule"] = {
            "total_steps": cfg.total_steps,
            "channel_end": cfg.channel_end_steps,
            "channel_interval": cfg.channel_interval_steps,
            "update_interval": cfg.update_steps,
            "min_channel_ratio": cfg.min_channel_ratio,
        }

    # --- size and cost of the models
    dense_macs = count_macs(models["dense"], example)
    dst_macs = count_macs(models["dst"], example)
    slim_macs = count_macs(chase_model, example)
    res["models"] = {
        "dense": {"params": count_params(models["dense"]), "macs": dense_macs["macs"],
                  "nonzero_macs": dense_macs["nonzero_macs"]},
        "dst": {"params": count_params(models["dst"]), "macs": dst_macs["macs"],
                "nonzero_macs": dst_macs["nonzero_macs"]},
        "chase_masked": {"macs": masked_macs["macs"], "nonzero_macs": masked_macs["nonzero_macs"]},
        "chase_slim": {"params": count_params(chase_model), "macs": slim_macs["macs"],
                       "nonzero_macs": slim_macs["nonzero_macs"]},
    }
    for v in res["models"].values():
        v["flops"] = 2 * v["macs"]

    # --- measured inference throughput, slim vs dense, interleaved
    if bench_batch is not None and bench_rounds > 0:
        t0 = time.perf_counter()
        tp = measure_throughput({"dense": models["dense"], "chase_slim": chase_model},
                                bench_batch.to(device), rounds=bench_rounds, threads=threads,
                                channels_last=bench_batch.dim() == 4)
        tp["speedup"] = tp["chase_slim"]["samples_per_s"] / tp["dense"]["samples_per_s"]
        res["throughput"] = tp
        res["timings"]["throughput_seconds"] = time.perf_counter() - t0
    res["backend"] = backend
    res["_models"], res["_optimizers"] = models, opts
    return res


def summarize_channel_density(start: dict, end: dict, ratio: float = 0.5) -> dict[str, Any]:
    """Per layer: channel densities/UMMs at the start and the end, and the share of
    channels whose density is below ``ratio`` x their layer's mean density."""
    layers = {}
    far = {"start": [0, 0], "end": [0, 0]}
    for name in end:
        entry: dict[str, Any] = {"fan_in": end[name]["fan_in"]}
        for key, st in (("start", start.get(name)), ("end", end[name])):
            if st is None:
                continue
            d = torch.tensor(st["density"], dtype=torch.float64)
            mean = float(d.mean()) if len(d) else 0.0
            n_far = int((d < ratio * mean).sum()) if mean > 0 else 0
            entry[key] = {
                "density": st["density"],
                "umm": st["umm"],
                "mean_density": mean,
                "cv_density": float(d.std(correction=0)) / mean if mean > 0 else 0.0,
                "far_sparser": n_far,
                "share_far_sparser": n_far / max(1, len(d)),
                "empty_channels": int((d == 0).sum()),
            }
            far[key][0] += n_far
            far[key][1] += len(d)
        layers[name] = entry
    cvs = {k: [L[k]["cv_density"] for L in layers.values() if k in L] for k in ("start", "end")}
    return {
        "mean_cv_density_start": sum(cvs["start"]) / max(1, len(cvs["start"])),
        "mean_cv_density_end": sum(cvs["end"]) / max(1, len(cvs["end"])),
        "definition": f"a channel is far sparser when its density is below {ratio} x its layer's mean channel density",
        "ratio": ratio,
        "layers": layers,
        "share_far_sparser_start": far["start"][0] / max(1, far["start"][1]),
        "share_far_sparser_end": far["end"][0] / max(1, far["end"][1]),
    }
