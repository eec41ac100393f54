"""Parameters in any memory layout (chase_ext.layout): a channels_last model trains to
exactly the masks, weights and optimizer state of the same model in the default layout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from chase_ext import layout, reference
from chase_ext.optimizer import ChaseOptimizer
from models import MODELS, example_input

try:
    import chase_ext._ops as native

    BACKENDS = ["native", "reference"]
except Exception:  # pragma: no cover - extension not built
    native = None
    BACKENDS = ["reference"]

CL = torch.channels_last


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CL) if t.dim() == 4 else t


def test_dense_order_and_like():
    w = torch.randn(5, 3, 2, 4)
    assert layout.dense_order(w) == [0, 1, 2, 3]
    c = _cl(w)
    assert not c.is_contiguous() and layout.dense_order(c) == [0, 2, 3, 1]
    assert layout.dense_order(w[:, ::2]) is None  # gappy
    assert layout.dense_order(torch.randn(3, 1).expand(3, 4)) is None  # overlapping
    m = layout.like(torch.ones(5, 3, 2, 4, dtype=torch.bool), c)
    assert m.stride() == c.stride() and m.dtype == torch.bool
    assert layout.like(c, c) is c
    assert layout.same_layout(m, c) and not layout.same_layout(m, w)
    one = torch.randn(6, 4, 1, 1)  # 1x1 conv: channels_last has other strides, same order
    assert layout.same_layout(one.contiguous(memory_format=CL), one)
    t = w.transpose(0, 1).contiguous().transpose(0, 1)  # dense, dim 1 outermost
    assert layout.dense_order(t) == [1, 0, 2, 3]
    u = layout.like(w, t)
    assert torch.equal(u, w) and u.stride() == t.stride()


def _ops(backend):
    return native if backend == "native" else reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_update_breaks_ties_row_major(backend, device):
    """Quantised weights and scores (many ties): the channels_last call equals the
    contiguous one, i.e. ties go to the lower row-major index, not the lower address."""
    ops = _ops(backend)
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4, 3, 3), (8, 6, 1, 1), (10, 8)]
    ws = [(torch.randint(-3, 4, s, generator=g).float() / 4).to(device) for s in shapes]
    ms = [(torch.rand(s, generator=g) < 0.4).to(device) for s in shapes]
    for w, m in zip(ws, ms):
        w.mul_(m)
    sc = [torch.randint(0, 3, s, generator=g).float().to(device) for s in shapes]
    st = [torch.randn(s, generator=g).to(device) * m for s, m in zip(shapes, ms)]
    lr, lc = [], []  # every row and column live
    a = ([w.clone() for w in ws], [m.clone() for m in ms], [s.clone() for s in st])
    ops.mask_update_(a[0], a[1], sc, lr, lc, a[2], [0, 1, 2], [25], [31])
    b = ([_cl(w) for w in ws], [_cl(m) for m in ms], [_cl(s) for s in st])
    assert not b[0][0].is_contiguous()
    layout.mask_update_(ops, b[0], b[1], [_cl(s) for s in sc], lr, lc, b[2], [0, 1, 2], [25], [31])
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)
    assert b[0][0].is_contiguous(memory_format=CL) and b[1][0].is_contiguous(memory_format=CL)
    # and the channel stats of the channels_last tensors equal the contiguous ones
    for x, y in zip(ops.channel_stats(a[0], a[1]), layout.channel_stats(ops, b[0], b[1])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_apply_views_and_mixed_layouts(backend):
    ops = _ops(backend)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 2, 2, generator=g)
    m = torch.rand(4, 3, 2, 2, generator=g) < 0.5
    s = torch.randn(4, 3, 2, 2, generator=g)
    want = (w * m, s * m)
    # one shared channels_last layout: views, the originals are written in place
    wc, mc, sc = _cl(w), _cl(m), _cl(s)
    layout.masked_apply_(ops, [wc, sc], [mc], [0, 0])
    assert torch.equal(wc, want[0]) and torch.equal(sc, want[1]) and wc.is_contiguous(memory_format=CL)
    # mixed: channels_last weight, contiguous mask, transposed state -> copies written back
    wc = _cl(w)
    st = s.transpose(2, 3).contiguous().transpose(2, 3)
    layout.masked_apply_(ops, [wc, st], [m.clone()], [0, 0])
    assert torch.equal(wc, want[0]) and torch.equal(st, want[1])


def _build(name, backend, channels_last, opt, steps, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    model = MODELS[name]().to(device)
    if channels_last:
        model = model.to(memory_format=CL)
    o = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) if opt == "sgd"
         else torch.optim.Adam(model.parameters(), lr=1e-2))
    chase = ChaseOptimizer(o, model, backend=backend, density=0.3, total_steps=steps, update_interval=4,
                           channel_sparsity=0.4, channel_end=0.5, example_inputs=example_input(name).to(device), **kw)
    return model, chase


def _steps(model, chase, steps, gen):
    for _ in range(steps):
        # the same gradients in every run (a real backward differs in float rounding
        # between layouts); each gradient in its parameter's layout, as autograd gives it
        for p in model.parameters():
            p.grad = layout.like(torch.randn(p.shape, generator=gen).to(p.device), p.detach())
        chase.step()


def _train(name, backend, channels_last, opt, steps=40, device="cpu", **kw):
    model, chase = _build(name, backend, channels_last, opt, steps, device=device, **kw)
    _steps(model, chase, steps, torch.Generator().manual_seed(1))
    return model, chase


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,opt,slim,kw", [
    ("vgg_small", "sgd", 2, {}),
    ("resnet_bottleneck", "adam", False, {}),
    # random growth scores are drawn contiguous: copied into the weights' layout for the op
    ("resnet_bottleneck", "sgd", False, dict(grow="random", scope="layer")),
])
def test_channels_last_training_equals_contiguous(device, backend, name, opt, slim, kw):
    ma, ca = _train(name, backend, False, opt, device=device, slim_during_training=slim, **kw)
    mb, cb = _train(name, backend, True, opt, device=device, slim_during_training=slim, **kw)
    assert ca.channel_report() == cb.channel_report()
    assert ca.slim_count == cb.slim_count and (ca.slim_count > 0) == bool(slim)
    for (n, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), n
        if pb.dim() == 4:
            assert pb.is_contiguous(memory_format=CL), f"{n} lost its layout"
        for k, v in ca.state[pa].items():
            assert torch.equal(v, cb.state[pb][k]), (n, k)
    for n in ca.masks:
        assert torch.equal(ca.masks[n], cb.masks[n]), n
        assert layout.same_layout(cb.masks[n], dict(mb.named_parameters())[n])
    # slimming keeps the layout too
    cb.slim_()
    for n, p in mb.named_parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=CL) and cb.state[p]
            assert all(layout.same_layout(v, p) for v in cb.state[p].values() if v.shape == p.shape)
    mb.eval()
    ma.eval()
    ca.slim_()
    x = example_input(name).to(device)
    # convs in two layouts: equal up to float rounding (in full float32: TF32 cuDNN convs
    # would differ by ~1e-3)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ya, yb = ma(x), mb(_cl(x))
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4 * float(ya.abs().max()))


def test_layout_changed_after_construction():
    """``model.to(memory_format=...)`` after ChaseOptimizer: masks follow the parameters."""
    torch.manual_seed(0)
    model = MODELS["vgg_small"]()
    o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = ChaseOptimizer(o, model, density=0.3, total_steps=40, update_interval=4)
    x = example_input("vgg_small")
    for i in range(6):
        if i == 3:
            model.to(memory_format=CL)
        chase.zero_grad()
        model(_cl(x) if i >= 3 else x).sum().backward()
        chase.step()
    for n, p in model.named_parameters():
        if n in chase.masks:
            m = chase.masks[n]
            assert layout.same_layout(m, p) and bool((p.detach()[~m] == 0).all()), n


def test_channels_last_resume_bit_exact():
    """Checkpoint of a channels_last run that slimmed, loaded into a fresh channels_last
    model: the continued run equals the uninterrupted one, layouts included."""
    kw = dict(slim_during_training=True)
    mA, cA = _train("resnet_bottleneck", BACKENDS[0], True, "sgd", steps=40, **kw)
    mB, cB = _build("resnet_bottleneck", BACKENDS[0], True, "sgd", 40, **kw)
    gen = torch.Generator().manual_seed(1)
    _steps(mB, cB, 20, gen)
    assert cB.slim_count > 0
    ck = {"model": mB.state_dict(), "optim": cB.state_dict()}
    mC, cC = _build("resnet_bottleneck", BACKENDS[0], True, "sgd", 40, seed=5, **kw)
    cC.load_state_dict(ck["optim"])
    mC.load_state_dict(ck["model"])
    _steps(mC, cC, 20, gen)
    for (n, a), b in zip(mA.named_parameters(), mC.parameters()):
        assert torch.equal(a, b) and layout.same_layout(a, b), n
        for k, v in cA.state[a].items():
            assert torch.equal(v, cC.state[b][k]), (n, k)
    for n in cA.masks:
        assert torch.equal(cA.masks[n], cC.masks[n]), n
