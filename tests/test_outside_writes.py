"""What users do to the model and masks between steps: weights loaded or written after
wrapping, masks edited or replaced through ``ChaseOptimizer.masks``, a model converted to
another dtype, an LBFGS optimizer across a slim; and the warning for updates that end in
phase A. Each is detected and handled, or refused before anything changes."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from chase_ext import ChaseOptimizer
from models import MODELS, example_input


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _step(model, chase, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    chase.zero_grad()
    model(x).square().mean().backward()
    chase.step()


def _masked_zero(chase):
    for n, p in zip(chase.sparse_names(), chase._params):
        off = ~chase.masks[n]
        assert not bool(p.detach()[off].any()), n
        for k, v in chase.optimizer.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert not bool(v[off].any()), (n, k)


OPTS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}


@pytest.mark.parametrize("opt", list(OPTS))
def test_weights_loaded_after_wrapping_are_masked_at_the_next_step(opt):
    """model.load_state_dict(dense) after construction: the gradient-masking plain step
    alone would keep the loaded values at masked slots; the step sees the weights'
    version counters moved and masks weights and state after the wrapped step."""
    model = _net()
    dense = copy.deepcopy(model.state_dict())
    chase = ChaseOptimizer(OPTS[opt](model.parameters()), model, density=0.3, total_steps=100,
                           update_interval=50, t_explore_end=0.5)
    _step(model, chase)
    _step(model, chase, 1)
    fused_before = chase._fused_steps
    model.load_state_dict(dense)
    assert any(bool(p.detach()[~chase.masks[n]].any()) for n, p in zip(chase.sparse_names(), chase._params))
    _step(model, chase, 2)
    _masked_zero(chase)
    assert chase._fused_steps == fused_before  # that step took the masking path
    _step(model, chase, 3)  # and the next one the fast path again, where there is one
    _masked_zero(chase)
    assert chase._fused_steps == fused_before + (opt != "adam")


def test_a_mask_edited_in_place_masks_its_weight_and_state_at_the_next_step():
    model = _net()
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, density=0.5,
                           total_steps=100, update_interval=50, t_explore_end=0.5)
    _step(model, chase)
    name = chase.sparse_names()[1]
    masks = chase.masks  # a user keeps the mapping and edits it later
    _step(model, chase, 1)
    masks[name][:4] = False
    _step(model, chase, 2)
    _masked_zero(chase)
    w = dict(model.named_parameters())[name]
    assert not bool(w.detach()[:4].any()) and not bool(chase.optimizer.state[w]["momentum_buffer"][:4].any())


def test_replacing_a_mask_is_checked_and_applied():
    model = _net()
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, density=0.5, total_steps=100,
                           update_interval=50, t_explore_end=0.5)
    name = chase.sparse_names()[0]
    shape = tuple(chase.masks[name].shape)
    for bad, match in [(torch.ones(2, 2, dtype=torch.bool), r"shape \(8, 3, 3, 3\).*got torch.bool of shape"),
                       (torch.ones(shape), "torch.bool tensor.*got torch.float32"),
                       ([1, 0], "got list")]:
        with pytest.raises(ValueError, match=match):
            chase.masks[name] = bad
    with pytest.raises(KeyError, match="not a sparse weight"):
        chase.masks["0.bias"] = torch.ones(8, dtype=torch.bool)
    with pytest.raises(TypeError, match="cannot be removed"):
        del chase.masks[name]
    assert tuple(chase.masks[name].shape) == shape and len(chase.masks) == 3
    new = torch.zeros(shape, dtype=torch.bool)
    new[0] = True
    chase.masks[name] = new
    _step(model, chase)
    w = dict(model.named_parameters())[name]
    assert not bool(w.detach()[1:].any()) and bool(w.detach()[0].any())
    assert chase.active_count() == int(new.sum()) + sum(int(chase.masks[n].sum()) for n in chase.sparse_names()[1:])
    plain = pickle.loads(pickle.dumps(chase.masks))  # a plain dict of tensors, not the optimizer
    assert type(plain) is dict and torch.equal(plain[name], new)
    assert type(copy.deepcopy(chase.masks)) is dict


def test_a_model_converted_after_wrapping_is_refused_before_the_step():
    model = _net()
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, density=0.5, total_steps=100,
                           update_interval=2)
    _step(model, chase)
    model.double()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    with pytest.raises(TypeError, match="share one dtype.*torch.float64"):
        chase.step()  # an update step: refused before the wrapped step, nothing lost
    assert chase.t == 1 and all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    model.float()
    chase.step()
    assert chase.t == 2


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        ChaseOptimizer(torch.optim.SGD(_net().parameters(), lr=0.1), "model", density=0.5, total_steps=10)


def test_updates_ending_in_phase_a_warn_when_weights_stay_above_the_budget():
    model = _net()
    with pytest.warns(UserWarning, match=r"last mask update \(step 48\).*weights active above the budget"):
        ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, density=0.5, total_steps=100,
                       update_interval=12, t_end=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, density=0.5, total_steps=100,
                       update_interval=12, t_end=0.5, t_explore_end=0.4)


@pytest.mark.parametrize("during_training", [True, False])
def test_lbfgs_goes_on_after_a_slim(during_training):
    """LBFGS's flat vectors (d, prev_flat_grad) lose the removed slots' entries at a slim, in
    step with its parameters, its curvature pairs are dropped and rebuilt, and its cached
    size is reset."""
    torch.manual_seed(0)
    model = MODELS["vgg_small"]()
    x = example_input("vgg_small", batch=4)
    y = torch.tensor([1, 2, 3, 4])
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3, history_size=4)
    chase = ChaseOptimizer(opt, model, density=0.5, total_steps=24, update_interval=4, channel_sparsity=0.5,
                           channel_end=0.5, slim_during_training=during_training, example_inputs=x)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(12):
        chase.step(closure)
    if not during_training:
        chase.slim_()
    assert chase.slim_count > 0
    params = opt.param_groups[0]["params"]
    n = sum(p.numel() for p in params)
    st = opt.state[params[0]]
    assert st["d"].numel() == n and st["prev_flat_grad"].numel() == n
    assert all(v.numel() == n for v in st["old_dirs"] + st["old_stps"]) and len(st["ro"]) == len(st["old_dirs"])
    for _ in range(12):
        loss = chase.step(closure)
        _masked_zero(chase)
    n = sum(p.numel() for p in params)
    assert torch.isfinite(loss) and len(st["old_dirs"]) > 0 and all(v.numel() == n for v in st["old_dirs"])


def test_a_mask_edited_after_the_model_changed_layout_is_masked_at_the_next_step():
    """model.to(channels_last) bumps no weight counter; the masks realigned to the new
    layout are new tensors, so the watch starts again from them."""
    model = _net()
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, density=0.5,
                           total_steps=100, update_interval=50, t_explore_end=0.5)
    _ = chase.masks  # handed out before: the masks' counters are watched
    _step(model, chase)
    name = chase.sparse_names()[1]
    model.to(memory_format=torch.channels_last)
    chase.masks[name][:4] = False  # the property realigns the mask first: a new tensor
    _step(model, chase, 1)
    _masked_zero(chase)


def test_a_replaced_mask_is_copied():
    model = _net()
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, density=0.5, total_steps=100,
                           update_interval=50, t_explore_end=0.5)
    name = chase.sparse_names()[1]
    mine = torch.ones(chase.masks[name].shape, dtype=torch.bool)
    chase.masks[name] = mine
    mine[0] = False  # the user's tensor, not the mask (which may not alias anything the kernels write)
    assert bool(chase.masks[name][0].all()) and chase.masks[name].data_ptr() != mine.data_ptr()
    assert chase.masks.copy().keys() == dict(chase.masks).keys()


def test_lbfgs_goes_on_after_loading_a_slimmed_checkpoint():
    """The replay of a checkpoint's slims resets LBFGS's cached size too (its state comes
    from the checkpoint already slimmed), also after it stepped at full width."""
    x = example_input("vgg_small", batch=4)
    y = torch.tensor([1, 2, 3, 4])

    def build():
        torch.manual_seed(0)
        model = MODELS["vgg_small"]()
        opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2, history_size=3)
        return model, ChaseOptimizer(opt, model, density=0.5, total_steps=24, update_interval=4,
                                     channel_sparsity=0.5, channel_end=0.5, slim_during_training=True,
                                     example_inputs=x)

    def run(model, chase, n):
        for _ in range(n):
            def closure():
                chase.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            chase.step(closure)

    ma, ca = build()
    run(ma, ca, 12)
    assert ca.slim_count > 0
    saved = {"chase": copy.deepcopy(ca.state_dict()), "model": copy.deepcopy(ma.state_dict())}
    mb, cb = build()
    run(mb, cb, 1)  # LBFGS caches its full-width size here
    cb.load_state_dict(saved["chase"])
    mb.load_state_dict(saved["model"])
    run(mb, cb, 3)
    _masked_zero(cb)
