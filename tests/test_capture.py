"""Plain steps in CUDA graphs (chase_ext.capture): the schedule bookkeeping on the CPU (a
capture simulated by patching ``is_capturing``), real capture and replay on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chase_ext.optimizer as opt_mod
from chase_ext import ChaseOptimizer
from chase_ext.schedules import is_channel_event, is_update_step

from models import MODELS, example_input


def _chase(device="cpu", **kw):
    torch.manual_seed(0)
    model = MODELS["vgg_small"]().to(device)
    kw = {"density": 0.3, "total_steps": 40, "update_interval": 6, "channel_sparsity": 0.5, "channel_end": 0.5,
          "min_channel_ratio": 0.1, "example_inputs": example_input("vgg_small").to(device), **kw}
    return model, ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, **kw)


def _batch(i, device="cpu"):
    x = example_input("vgg_small", batch=8, seed=i).to(device)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i)).to(device)
    return x, y


def _forward_backward(model, chase, i, device="cpu"):
    x, y = _batch(i, device)
    loss = F.cross_entropy(model(x), y)
    chase.zero_grad()
    loss.backward()


def _eager_at(chase, t):
    """Step t (1-based) runs eagerly: what step() decides, from the config and channel state."""
    cfg = chase.config
    return is_update_step(t, cfg.update_steps, cfg.t_end_steps) or (
        chase._ch is not None and not chase._ch.done and is_channel_event(t, cfg.channel_interval_steps, cfg.update_steps))


@pytest.mark.parametrize("kw", [{}, {"channel_sparsity": 0.0}, {"update_interval": 5, "channel_interval": 3},
                                {"t_end": 0.5, "channel_sparsity": 0.0}])
def test_plain_steps_ahead_matches_the_step_predicates(kw):
    model, chase = _chase(**kw)
    for i in range(45):
        ahead = chase.plain_steps_ahead()
        t = chase.t
        brute = next((k for k in range(0, 200) if _eager_at(chase, t + 1 + k)), None)
        assert ahead == brute, (t, ahead, brute)
        _forward_backward(model, chase, i)
        chase.step()
    if kw.get("t_end") == 0.5:  # no updates after t_end and no channel phase: every step is plain
        assert chase.plain_steps_ahead() is None


def test_replayed_plain_steps_keep_the_schedule(monkeypatch):
    """Plain steps 'captured' (patched capture flag: the work runs, the step is not counted)
    and counted by replayed() give the same run, bit for bit, as eager steps."""
    model_a, a = _chase()
    for i in range(30):
        _forward_backward(model_a, a, i)
        a.step()
    model_b, b = _chase()
    for i in range(30):
        _forward_backward(model_b, b, i)
        if b.plain_steps_ahead():
            monkeypatch.setattr(opt_mod, "is_capturing", lambda: True)
            t0 = b.t
            b.step()
            monkeypatch.setattr(opt_mod, "is_capturing", lambda: False)
            assert b.t == t0  # a capture is not a step
            b.replayed()
        else:
            b.step()
    assert a.t == b.t == 30 and a.slim_count == b.slim_count
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), n
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n]), n


def test_capturing_an_eager_step_is_refused_with_nothing_changed(monkeypatch):
    model, chase = _chase()
    for i in range(5):
        _forward_backward(model, chase, i)
        chase.step()
    assert chase.plain_steps_ahead() == 0  # step 6 is an update step
    _forward_backward(model, chase, 5)
    before = [p.detach().clone() for p in model.parameters()]
    masks = {n: m.clone() for n, m in chase.masks.items()}
    monkeypatch.setattr(opt_mod, "is_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="step 6 is an update step, which cannot be captured"):
        chase.step()
    with pytest.raises(RuntimeError, match="a step with a closure"):
        monkeypatch.setattr(chase, "_t", 0)
        chase.step(lambda: None)
    monkeypatch.undo()
    assert chase.t == 5
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(chase.masks[n], m) for n, m in masks.items())


def test_capture_key_changes_when_captured_tensors_are_replaced():
    """Same key over plain and update steps (masks change in place); a new key after a
    channel event that removed channels (new bias masks) and after a slim (new tensors)."""
    model, chase = _chase(slim_during_training=2)
    _forward_backward(model, chase, 0)
    chase.step()  # the momentum buffers exist from here on
    changed, replacing = [], []
    for i in range(1, 30):
        key = chase.capture_key()
        events, slims = chase._ch.events, chase.slim_count
        live = [r["live"] for r in chase.channel_report()]
        _forward_backward(model, chase, i)
        chase.step()
        if chase.capture_key() != key:
            changed.append(chase.t)
        removed = chase._ch.events > events and [r["live"] for r in chase.channel_report()] != live
        if removed or chase.slim_count > slims:
            replacing.append(chase.t)
    assert replacing and changed == replacing
    assert chase.slim_count >= 1


def test_replayed_refuses_crossing_an_eager_step():
    model, chase = _chase()
    assert chase.plain_steps_ahead() == 2  # channel events at t % 6 == 3 (offset 6 // 2)
    with pytest.raises(ValueError, match=r"step 3 is an update or channel-event step.*only 2 plain"):
        chase.replayed(3)
    assert chase.t == 0
    chase.replayed(2)
    assert chase.t == 2 and chase.plain_steps_ahead() == 0
    for bad in (0, -1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            chase.replayed(bad)
    assert chase.t == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_plain_steps(monkeypatch):
    """forward + backward + chase.step() captured once, replayed for the plain steps, eager
    steps in between (recaptured when capture_key() changed): the same weights and masks as
    an eager run."""
    dev = "cuda"
    # the same conv algorithms eager and in the graph, so that both runs see the same numbers
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model_a, a = _chase(dev, slim_during_training=1)
    for i in range(30):
        _forward_backward(model_a, a, i, dev)
        a.step()

    model_b, b = _chase(dev, slim_during_training=1)
    static_x, static_y = (t.clone() for t in _batch(0, dev))
    graph, key = None, None
    for i in range(30):
        x, y = _batch(i, dev)
        if b.plain_steps_ahead() and graph is not None and b.capture_key() == key:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            b.replayed()
            continue
        _forward_backward(model_b, b, i, dev)  # eager: updates, events, and the step before a capture
        b.step()
        if b.plain_steps_ahead() and (graph is None or b.capture_key() != key):
            # warm-up on a side stream (lazy cuBLAS/cuDNN state), forward and backward only
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    F.cross_entropy(model_b(static_x), static_y).backward()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            b.zero_grad(set_to_none=True)  # backward allocates static gradients in the graph's pool
            with torch.cuda.graph(graph):
                loss = F.cross_entropy(model_b(static_x), static_y)
                loss.backward()
                b.step()
            key = b.capture_key()
    torch.cuda.synchronize()
    assert a.t == b.t == 30 and a.slim_count == b.slim_count >= 1
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n]), n
    for n, p in zip(b.sparse_names(), b._params):
        assert not bool(p.detach()[~b.masks[n]].any()), n
