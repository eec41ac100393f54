"""EMA / weight-averaged copies follow the model's slims (torch.optim.swa_utils.AveragedModel)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from chase_ext.ema import follow_slims
from chase_ext.optimizer import ChaseOptimizer
from models import example_input, vgg_small

try:
    import chase_ext._ops  # noqa: F401

    BACKEND = "native"
except Exception:  # pragma: no cover - extension not built
    BACKEND = "reference"

STEPS = 30


def _run(slim_during_training: bool):
    torch.manual_seed(0)
    model = vgg_small()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = ChaseOptimizer(opt, model, density=0.2, total_steps=STEPS, update_interval=3, channel_sparsity=0.5,
                           channel_end=0.6, example_inputs=example_input("vgg_small"),
                           slim_during_training=slim_during_training, backend=BACKEND)
    return model, chase


def _step(model, chase, g):
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    chase.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    chase.step()


def test_averaged_model_follows_slims_during_training():
    torch.set_num_threads(1)
    model, chase = _run(slim_during_training=True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    late = None  # a copy made after some slims catches up from where it is
    g = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        _step(model, chase, g)
        follow_slims(ema, chase)
        ema.update_parameters(model)
        if t == STEPS // 3:
            assert chase.slim_count >= 1
            late = copy.deepcopy(model)
    assert chase.slim_count >= 3
    for a, b in zip(ema.module.parameters(), model.parameters()):
        assert a.shape == b.shape
    follow_slims(late, chase)
    assert [p.shape for p in late.parameters()] == [p.shape for p in model.parameters()]
    follow_slims(ema, chase)  # nothing new: a no-op
    assert [p.shape for p in ema.module.parameters()] == [p.shape for p in model.parameters()]


def test_averaged_model_breaks_without_follow_slims():
    model, chase = _run(slim_during_training=True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    g = torch.Generator().manual_seed(1)
    with pytest.raises(RuntimeError, match="must match the size"):
        for _ in range(STEPS):
            _step(model, chase, g)
            ema.update_parameters(model)


def test_follow_slims_keeps_the_same_channels():
    # a copy taken before the slims, slimmed by follow_slims, equals the slimmed model exactly
    model, chase = _run(slim_during_training=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        _step(model, chase, g)
    twin = copy.deepcopy(model)
    chase.slim_()
    assert chase.slim_count == 1
    follow_slims(twin, chase)
    sd, td = model.state_dict(), twin.state_dict()
    assert sd.keys() == td.keys()
    for k in sd:
        assert torch.equal(sd[k], td[k]), k


def test_follow_slims_refuses_what_it_cannot_follow():
    model, chase = _run(slim_during_training=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        _step(model, chase, g)
    chase.slim_()
    with pytest.raises(ValueError, match="not a copy"):
        follow_slims(model, chase)
    other = vgg_small(num_classes=10)
    other.features[0] = nn.Conv2d(3, 5, 3, padding=1)  # a width no point of the history had
    with pytest.raises(ValueError, match="match no point of the slim history"):
        follow_slims(other, chase)
    with pytest.raises(TypeError, match="must be a chase_ext.ChaseOptimizer"):
        follow_slims(copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.1))
