"""torch.compile'd models: channel groups found through the compiled wrapper, masks and slims
on the real parameters, the compiled forward equal to eager after every slim (Dynamo's
shape guards recompile it), and stale graphs dropped so many slims never reach Dynamo's
recompile limit. Both orders: compile before wrapping (ChaseOptimizer gets the
OptimizedModule) and after (the user compiles the model ChaseOptimizer drives).

One test uses the default inductor backend (C++ codegen on the CPU, tens of seconds for a
few recompiles on 2 cores); the others use ``aot_eager`` (same Dynamo capture, guards and
AOTAutograd graphs, no code generation), which is what the wrapping and the guards depend on.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from chase_ext.optimizer import ChaseOptimizer
from chase_ext.wrappers import forget_compiled, unwrap_model

from dist_teardown import end_process_group
from models import TwoGroupNet as Net

try:
    import chase_ext._ops  # noqa: F401

    BACKEND = "native"
except Exception:  # pragma: no cover - extension not built
    BACKEND = "reference"

dynamo = pytest.importorskip("torch._dynamo")




# the names before torch 2.7: fail_on_cache_limit_hit, cache_size_limit; torch 2.5 has no
# such switch (a stale graph is then caught by the cache-entry counts alone)
FAIL_AT_LIMIT = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                      if hasattr(dynamo.config, n)), None)
RECOMPILE_LIMIT = next(n for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo.config, n))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # a run that reaches the recompile limit fails instead of silently falling back to eager
    if FAIL_AT_LIMIT:
        with mock.patch.object(dynamo.config, FAIL_AT_LIMIT, True):
            yield
    else:
        yield
    torch.set_num_threads(n)
    dynamo.reset()


def _entries() -> int:
    return len(dynamo.eval_frame._debug_get_cache_entry_list(Net.forward.__code__))


def _train(order: str, backend: str, steps: int, update_interval: int = 2, device: str = "cpu"):
    """``steps`` training steps of a compiled ``Net`` under Chase (slims during training),
    checking the compiled forward against the eager model at each step."""
    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(density=0.3, total_steps=steps, update_interval=update_interval, channel_sparsity=0.5,
              channel_end=0.6, example_inputs=torch.randn(2, 12, device=device), slim_during_training=True,
              backend=BACKEND)
    if order == "before":
        compiled = torch.compile(model, backend=backend)
        chase = ChaseOptimizer(opt, compiled, **kw)
    else:
        chase = ChaseOptimizer(opt, model, **kw)
        compiled = torch.compile(model, backend=backend)
    assert chase.model is model
    assert [g.producers for g in chase.groups] == [["fc1"], ["fc2"]]
    g = torch.Generator().manual_seed(1)
    slims, max_entries = [], 0
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g).to(device), torch.randint(0, 4, (8,), generator=g).to(device)
        out = compiled(x)
        # the compiled forward computes what the (slimmed, masked) eager model computes
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        loss = nn.functional.cross_entropy(out, y)
        chase.zero_grad()
        loss.backward()
        chase.step()
        slims.append(chase.slim_count)
        max_entries = max(max_entries, _entries())
    # masks live on the real parameters, with their slimmed shapes
    for name, p in model.named_parameters():
        if name in chase.masks:
            assert chase.masks[name].shape == p.shape
            assert not bool(p.detach()[~chase.masks[name]].any())
    return model, chase, slims, max_entries


def test_compiled_before_wrapping_inductor():
    model, chase, slims, entries = _train("before", "inductor", steps=8)
    assert slims[-1] >= 2, slims
    assert model.fc1.weight.shape[0] < 24 and model.fc2.weight.shape[0] < 24
    assert model.fc2.weight.shape[1] == model.fc1.weight.shape[0]
    assert entries == 1  # the graphs of the old widths were dropped at each slim


@pytest.mark.parametrize("order", ["before", "after"])
def test_compiled_many_slims_stay_compiled(order, device):
    # more slims than Dynamo's recompile limit (8): without dropping the stale graphs the
    # 9th recompile would fail here (fail_on_recompile_limit_hit)
    model, chase, slims, entries = _train(order, "aot_eager", steps=40, update_interval=1, device=device)
    assert slims[-1] > getattr(dynamo.config, RECOMPILE_LIMIT), slims
    assert entries == 1
    assert sum(r["live"] for r in chase.channel_report()) < 48


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph trees need a GPU")
def test_cuda_graph_trees_train_like_eager_graphs():
    """The model compiled with CUDA graph trees (the ``cudagraphs`` backend: what
    ``mode="reduce-overhead"`` wraps around Inductor's code, here around the same AOTAutograd
    graphs as ``aot_eager``), ``chase.step()`` eager: the same run as ``aot_eager``, bit for
    bit, through updates and slims (each slim's new shapes are recorded anew)."""
    runs = []
    for backend in ("aot_eager", "cudagraphs"):
        dynamo.reset()
        runs.append(_train("after", backend, steps=10, device="cuda"))
    (ma, ca, sa, _), (mb, cb, sb, _) = runs
    assert sa == sb and sa[-1] >= 2, (sa, sb)
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(p, q), n
    assert ca.masks.keys() == cb.masks.keys()
    for n in ca.masks:
        assert torch.equal(ca.masks[n], cb.masks[n]), n


def test_forget_compiled_drops_only_what_was_compiled():
    model = Net()
    assert forget_compiled(model) == 0  # nothing compiled yet
    compiled = torch.compile(model, backend="aot_eager")
    compiled(torch.randn(4, 12))
    assert _entries() == 1
    assert forget_compiled(compiled) >= 1  # the wrapper or the model itself
    assert _entries() == 0
    compiled(torch.randn(4, 12))  # and it compiles again on the next call
    assert _entries() == 1


def test_unwrap_model_peels_every_wrapper():
    model = Net()
    compiled = torch.compile(nn.DataParallel(torch.compile(model, backend="aot_eager")), backend="aot_eager")
    assert unwrap_model(compiled) is model
    assert unwrap_model(model) is model


def test_compiled_inside_ddp_rewraps(tmp_path):
    # DDP(torch.compile(model)): the compiled module is what rewrap_ddp wraps again after a slim
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from chase_ext import rewrap_ddp

    ddp = chase = new = None
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(torch.compile(model, backend="aot_eager"))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        chase = ChaseOptimizer(opt, ddp, density=0.3, total_steps=12, update_interval=2, channel_sparsity=0.5,
                               channel_end=0.6, example_inputs=torch.randn(2, 12), slim_during_training=True,
                               backend=BACKEND)
        assert chase.model is model and [g.producers for g in chase.groups] == [["fc1"], ["fc2"]]
        assert rewrap_ddp(ddp, chase) is ddp  # nothing slimmed yet; tells chase the loop re-wraps
        g = torch.Generator().manual_seed(1)
        wraps = 0
        for _ in range(12):
            x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
            out = ddp(x)
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
            chase.zero_grad()
            nn.functional.cross_entropy(out, y).backward()
            chase.step()
            new = rewrap_ddp(ddp, chase)
            wraps += new is not ddp
            ddp = new
        assert chase.slim_count == wraps >= 2
        assert model.fc1.weight.shape[0] < 24
    finally:
        ddp = chase = new = None  # they hold the process group (dist_teardown.py)
        end_process_group()
