"""masked_sgd_ (the one-pass plain step of a wrapped torch.optim.SGD, chase_ext.fused_sgd):
the native op against the reference and against torch.optim.SGD bit for bit, opcheck,
errors, and ChaseOptimizer runs with it against runs without it."""
from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chase_ext import ChaseOptimizer, fused_sgd
from chase_ext import reference as R
from models import MODELS, example_input

ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = [(0,), (1,), (7,), (33,), (5, 4), (4, 3, 3, 3), (16, 8, 3, 3), (2, 17, 1, 1), (1000,)]
# (weight_decay, momentum, dampening, nesterov, maximize)
SETTINGS = [(0.0, 0.0, 0.0, False, False), (5e-4, 0.9, 0.0, False, False), (5e-4, 0.9, 0.0, True, False),
            (1e-2, 0.8, 0.3, False, True), (0.0, 0.9, 0.1, False, False), (3e-3, 0.0, 0.0, False, True),
            (5e-4, 0.9, 0.0, True, True)]


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def _case(seed, shapes, ties, channels_last, momentum):
    g = torch.Generator().manual_seed(seed)

    def lay(t):
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    def vals(s):
        x = torch.randn(s, generator=g) * 3
        return torch.round(x) / 2 if ties else x  # ties: many equal values and signed zeros

    ms = [lay(torch.rand(s, generator=g) < float(torch.rand(1, generator=g))) for s in shapes]
    ps = [lay(vals(s)) * m for s, m in zip(shapes, ms)]
    gs = [lay(vals(s)) for s in shapes]
    bs = [lay(vals(s)) * m for s, m in zip(shapes, ms)] if momentum else []
    return ps, gs, bs, ms


def _run(fn, case, lr, s):
    ps, gs, bs, ms = (list(map(torch.clone, ts)) for ts in case)
    fn(ps, gs, bs, ms, lr, *s)
    return ps, gs, bs


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), si=st.integers(0, len(SETTINGS) - 1),
       ties=st.booleans(), cl=st.booleans(), lr=st.sampled_from([0.1, 0.0123, 1e-5, 3.0]))
def test_masked_sgd_matches_reference(seed, n, si, ties, cl, lr):
    s = SETTINGS[si]
    shapes = [SHAPES[(seed >> (3 * k)) % len(SHAPES)] for k in range(n)]
    case = _case(seed, shapes, ties, cl, s[1] != 0)
    got = _run(ops.masked_sgd_, case, lr, s)
    want = _run(R.masked_sgd_, case, lr, s)
    for a_list, b_list in zip(got, want):
        for a, b in zip(a_list, b_list):
            assert torch.equal(_bits(a), _bits(b))
            assert a.stride() == b.stride()
    # the gradients come out masked: 0 where masked, untouched elsewhere
    for g0, g1, m in zip(case[1], got[1], case[3]):
        assert not bool(g1[~m].any()) and torch.equal(g1[m], g0[m])


def test_masked_sgd_equals_torch_sgd_on_this_machine():
    """What fused_sgd checks before use, over every setting, layouts, lengths with and
    without a scalar tail, 1 and 2 threads: on this project's machines (AVX2 / AVX-512)
    the op must equal torch.optim.SGD after masking bit for bit."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("ATen's float32 kernels here may not fuse multiply-adds; fused_sgd then stays off")
    old = torch.get_num_threads()
    try:
        for threads, s, cl in itertools.product((1, 2), SETTINGS, (False, True)):
            torch.set_num_threads(threads)
            case = _case(7, [(1,), (7,), (33,), (16, 8, 3, 3), (40_003,)], False, cl, s[1] != 0)
            ps, gs, bs = _run(ops.masked_sgd_, case, 0.05, s)
            tp = [p.clone() for p in case[0]]
            for p, g, m in zip(tp, case[1], case[3]):
                p.grad = torch.where(m, g, torch.zeros(()))
            sgd = torch.optim.SGD(tp, lr=0.05, weight_decay=s[0], momentum=s[1], dampening=s[2], nesterov=s[3],
                                  maximize=s[4])
            for p, b in zip(tp, case[2]):
                sgd.state[p]["momentum_buffer"] = b.clone()
            sgd.step()
            for p, q in zip(ps, tp):
                assert torch.equal(_bits(p), _bits(q)), (threads, s, cl)
            for b, q in zip(bs, tp):
                assert torch.equal(_bits(b), _bits(sgd.state[q]["momentum_buffer"])), (threads, s, cl)
            assert fused_sgd.matches_torch(ops, dict(zip(fused_sgd._SETTINGS, s)))
    finally:
        torch.set_num_threads(old)


def test_opcheck_masked_sgd():
    ps, gs, bs, ms = _case(3, [(4, 3, 2, 2), (5, 4)], False, True, True)
    torch.library.opcheck(torch.ops.chase_ext.masked_sgd_.default,
                          (ps, gs, bs, ms, 0.1, 1e-4, 0.9, 0.0, False, False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.error_path
@pytest.mark.parametrize("impl", [ops.masked_sgd_, R.masked_sgd_], ids=["native", "reference"])
def test_masked_sgd_errors_name_the_argument_and_write_nothing(impl):
    def fresh(**over):
        ps, gs, bs, ms = _case(1, [(6, 4), (3, 3, 3, 3)], False, False, True)
        kw = dict(params=ps, grads=gs, momentum_buffers=bs, masks=ms)
        kw.update(over)
        return kw

    m0 = fresh()["masks"]
    cases = [
        (dict(grads=[torch.randn(6, 4)]), "one tensor each per weight"),
        (dict(momentum_buffers=[]), "needs one momentum buffer per weight"),
        (dict(params=[torch.randn(6, 4, dtype=torch.float64) * m0[0], torch.zeros(3, 3, 3, 3)]), "float32"),
        (dict(masks=[m0[0].float(), m0[1]]), "must be bool"),
        (dict(grads=[torch.randn(4, 6).t(), torch.randn(3, 3, 3, 3)]), "laid out in memory like its mask"),
        (dict(grads=[torch.randn(6, 5), torch.randn(3, 3, 3, 3)]), "shape"),
    ]
    for over, msg in cases:
        kw = fresh(**over)
        before = [t.clone() for t in kw["params"] + kw["grads"] + kw["momentum_buffers"]]
        with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
            impl(kw["params"], kw["grads"], kw["momentum_buffers"], kw["masks"], 0.1, 0.0, 0.9, 0.0, False, False)
        after = kw["params"] + kw["grads"] + kw["momentum_buffers"]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), msg
    kw = fresh()
    shared = kw["params"][0]
    with pytest.raises((RuntimeError, ValueError), match="shares memory"):
        impl([shared, kw["params"][1]], [shared, kw["grads"][1]], kw["momentum_buffers"], kw["masks"], 0.1, 0.0,
             0.9, 0.0, False, False)
    with pytest.raises((RuntimeError, ValueError), match="nesterov needs momentum > 0 and dampening 0"):
        impl(kw["params"], kw["grads"], kw["momentum_buffers"], kw["masks"], 0.1, 0.0, 0.9, 0.5, True, False)
    with pytest.raises((RuntimeError, ValueError), match="momentum 0 takes no momentum buffers"):
        impl(kw["params"], kw["grads"], kw["momentum_buffers"], kw["masks"], 0.1, 0.0, 0.0, 0.0, False, False)


# ---------------------------------------------------------------- ChaseOptimizer
def _chase(opt_factory, **kw):
    torch.manual_seed(0)
    model = MODELS["resnet_bottleneck"]()
    kw = {"density": 0.3, "total_steps": 40, "update_interval": 6, "channel_sparsity": 0.5, "channel_end": 0.5,
          "min_channel_ratio": 0.1, "slim_during_training": 2, "example_inputs": example_input("resnet_bottleneck"),
          **kw}
    return model, ChaseOptimizer(opt_factory(model.parameters()), model, **kw)


def _train(model, chase, steps, check=None):
    g = torch.Generator().manual_seed(1)
    x = example_input("resnet_bottleneck", batch=8)
    for _ in range(steps):
        y = torch.randint(0, 10, (8,), generator=g)
        chase.zero_grad()
        torch.nn.functional.cross_entropy(model(x * (1 + 0.1 * torch.randn(x.shape, generator=g))), y).backward()
        chase.step()
        if check is not None:
            check(chase)


def _masked_zero(chase):
    for n, p in zip(chase.sparse_names(), chase._params):
        off = ~chase.masks[n]
        buf = chase.optimizer.state[p].get("momentum_buffer")
        assert not bool(p.detach()[off].any()) and (buf is None or not bool(buf[off].any())), n


SGDS = [
    ("momentum-wd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)),
    ("nesterov-maximize", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("dampening-foreach-off", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.2,
                                                         weight_decay=1e-3, foreach=False)),
    ("plain", lambda ps: torch.optim.SGD(ps, lr=0.05)),
]


@pytest.mark.parametrize("name,factory", SGDS, ids=[s[0] for s in SGDS])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_runs_equal_unfused_runs_bit_for_bit(name, factory, channels_last, monkeypatch):
    """40 steps with updates, channel events and slims (removed channels' biases masked):
    fused plain steps against CHASE_EXT_FUSED_SGD=0 (gradient masking, then SGD)."""
    runs = []
    for env in ("1", "0"):
        monkeypatch.setenv("CHASE_EXT_FUSED_SGD", env)
        model, chase = _chase(factory)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        _train(model, chase, 40, check=_masked_zero)
        runs.append((model, chase))
    (mA, cA), (mB, cB) = runs
    assert cA._fused_sgd_steps > 20 and cB._fused_sgd_steps == 0 and cA.slim_count > 0
    for (n, a), b in zip(mA.named_parameters(), mB.parameters()):
        assert torch.equal(_bits(a), _bits(b)), n
        assert torch.equal(_bits(a.grad), _bits(b.grad)), n
        for (k, x), y in zip(cA.optimizer.state[a].items(), cB.optimizer.state[b].values()):
            assert torch.equal(_bits(x), _bits(y)), (n, k)
    for n in cA.masks:
        assert torch.equal(cA.masks[n], cB.masks[n]), n


def _plain_step_fused(chase, model) -> bool:
    x = example_input("resnet_bottleneck", batch=4)
    before = chase._fused_sgd_steps
    chase.zero_grad()
    model(x).sum().backward()
    chase.step()
    return chase._fused_sgd_steps > before


@pytest.mark.parametrize("why,factory,setup", [
    ("foreach", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True), None),
    ("lr tensor", lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.05), momentum=0.9), None),
    ("step hook", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
     lambda chase: chase.optimizer.register_step_post_hook(lambda *a: None)),
    ("another optimizer", lambda ps: torch.optim.Adam(ps, lr=1e-3), None),
    ("machine check fails", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
     lambda chase: mock.patch.object(fused_sgd, "_probe", lambda ops, s: False).start()),
])
def test_unfused_where_equality_is_not_known(why, factory, setup):
    fused_sgd._checked.clear()
    try:
        model, chase = _chase(factory, update_interval=1000, channel_sparsity=0.0)
        if setup is not None:
            setup(chase)
        for _ in range(3):
            assert not _plain_step_fused(chase, model), why
        _masked_zero(chase)
    finally:
        mock.patch.stopall()
        fused_sgd._checked.clear()


def test_unfused_when_a_sparse_weight_has_no_gradient_or_is_not_float32():
    model, chase = _chase(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), update_interval=1000,
                          channel_sparsity=0.0)
    assert not _plain_step_fused(chase, model) and _plain_step_fused(chase, model)
    x = example_input("resnet_bottleneck", batch=4)
    chase.zero_grad()
    model(x).sum().backward()
    first = chase._params[0]
    first.grad = None  # e.g. a layer frozen for a while: SGD skips it, so must the step
    before = first.detach().clone()
    chase.step()
    assert chase._fused_sgd_steps == 1 and torch.equal(first.detach(), before)
    model64, chase64 = _chase(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), update_interval=1000,
                              channel_sparsity=0.0)
    model64.double()
    x64 = example_input("resnet_bottleneck", batch=4).double()
    for _ in range(3):
        chase64.zero_grad()
        model64(x64).sum().backward()
        chase64.step()
    assert chase64._fused_sgd_steps == 0
    _masked_zero(chase64)


def test_fused_from_the_second_step_and_grad_masked():
    """The first step creates the momentum buffers (left to SGD); later plain steps are
    fused and leave .grad 0 at masked slots and untouched elsewhere, as the unfused path."""
    model, chase = _chase(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), update_interval=1000,
                          channel_sparsity=0.0)
    assert not _plain_step_fused(chase, model)
    x = example_input("resnet_bottleneck", batch=4)
    chase.zero_grad()
    model(x).sum().backward()
    raw = [p.grad.clone() for p in chase._params]
    chase.step()
    assert chase._fused_sgd_steps == 1
    for p, g, m in zip(chase._params, raw, chase.masks.values()):
        assert not bool(p.grad[~m].any()) and torch.equal(p.grad[m], g[m])
