"""masked_sgd_ and masked_adam_ (the one-pass plain steps of a wrapped torch.optim.SGD and
Adam / AdamW(fused=True), chase_ext.fused_step): the native ops against the reference and
against the torch optimizers bit for bit, opcheck, errors, and ChaseOptimizer runs with
them against runs without them."""
from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chase_ext import ChaseOptimizer, fused_step
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
    """What fused_step checks before use, over every setting, layouts, lengths with and
    without a scalar tail, 1 and 2 threads: on this project's machines (AVX2 / AVX-512)
    the op must equal torch.optim.SGD after masking bit for bit."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("ATen's float32 kernels here may not fuse multiply-adds; fused_step then stays off")
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
            assert fused_step.sgd_matches_torch(ops, dict(zip(fused_step._SGD_SETTINGS, s)))
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
    """Masked weights and every same-shape state tensor (momentum; Adam's moments) are 0."""
    for n, p in zip(chase.sparse_names(), chase._params):
        off = ~chase.masks[n]
        assert not bool(p.detach()[off].any()), n
        for k, v in chase.optimizer.state[p].items():
            if k != "step":
                assert not bool(v[off].any()), (n, k)


def _two_groups(cls, **kw):
    """The usual split: every other weight in a group with weight decay, the other weights,
    biases and norms in one without and at another learning rate (sparse weights in both)."""
    def make(ps):
        ps = list(ps)
        ws = [p for p in ps if p.dim() > 1]
        rest = [p for p in ps if p.dim() <= 1]
        return cls([{"params": ws[::2], "weight_decay": 0.05},
                    {"params": ws[1::2] + rest, "weight_decay": 0.0, "lr": kw["lr"] * 2}], **kw)
    return make


SGDS = [
    ("momentum-wd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)),
    ("nesterov-maximize", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("dampening-foreach-off", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.2,
                                                         weight_decay=1e-3, foreach=False)),
    ("plain", lambda ps: torch.optim.SGD(ps, lr=0.05)),
    ("sgd-two-groups", _two_groups(torch.optim.SGD, lr=0.05, momentum=0.9)),
]


ADAMS = [
    ("adamw-fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05, fused=True)),
    ("adam-fused-amsgrad-wd", lambda ps: torch.optim.Adam(ps, lr=2e-3, weight_decay=1e-3, amsgrad=True, fused=True)),
    ("adamw-fused-maximize-beta", lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.3, 0.95), maximize=True,
                                                               fused=True)),
    ("adamw-fused-two-groups", _two_groups(torch.optim.AdamW, lr=1e-3, fused=True)),
]



@pytest.mark.parametrize("name,factory", SGDS + ADAMS, ids=[s[0] for s in SGDS + ADAMS])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_runs_equal_unfused_runs_bit_for_bit(name, factory, channels_last, monkeypatch):
    """40 steps with updates, channel events and slims (removed channels' biases masked):
    fused plain steps against CHASE_EXT_FUSED_STEP=0 (gradient masking, then the wrapped
    SGD or fused Adam), state and Adam's step counts included."""
    if name.startswith("adam"):
        _adam_width()
    runs = []
    for env in ("1", "0"):
        monkeypatch.setenv("CHASE_EXT_FUSED_STEP", env)
        model, chase = _chase(factory)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        _train(model, chase, 40, check=_masked_zero)
        runs.append((model, chase))
    (mA, cA), (mB, cB) = runs
    assert cA._fused_steps > 20 and cB._fused_steps == 0 and cA.slim_count > 0
    for (n, a), b in zip(mA.named_parameters(), mB.parameters()):
        assert torch.equal(_bits(a), _bits(b)), n
        assert torch.equal(_bits(a.grad), _bits(b.grad)), n
        for (k, x), y in zip(cA.optimizer.state[a].items(), cB.optimizer.state[b].values()):
            assert torch.equal(_bits(x), _bits(y)), (n, k)
    for n in cA.masks:
        assert torch.equal(cA.masks[n], cB.masks[n]), n


@pytest.mark.parametrize("name,factory", [SGDS[0], ADAMS[0]], ids=["sgd", "adamw-fused"])
def test_cycled_momentum_probes_once_per_kind_and_equals_unfused(name, factory, monkeypatch):
    """OneCycleLR moves SGD's momentum / Adam's beta1 (and lr) every step: the machine
    check runs once for the kind of setting, not once per value, and the runs still equal
    the unfused ones bit for bit."""
    sgd = not name.startswith("adam")
    probes_per_kind = 1 if sgd else 1 + (_adam_width() == 16)  # widths 8, then 16
    probe = "_sgd_probe" if sgd else "_adam_probe"
    real = getattr(fused_step, probe)
    runs = []
    for env in ("1", "0"):
        monkeypatch.setenv("CHASE_EXT_FUSED_STEP", env)
        fused_step._checked.clear()
        calls = []
        monkeypatch.setattr(fused_step, probe, lambda *a, calls=calls: calls.append(a) or real(*a))
        model, chase = _chase(factory)
        sched = torch.optim.lr_scheduler.OneCycleLR(chase, max_lr=0.05 if sgd else 2e-3, total_steps=41)
        values = set()

        def check(c):
            sched.step()
            g = c.param_groups[0]
            values.add(g["momentum"] if sgd else g["betas"][0])

        _train(model, chase, 40, check=check)
        runs.append((model, chase, calls, values))
    (mA, cA, callsA, values), (mB, cB, callsB, _) = runs
    assert len(values) > 30 and cA._fused_steps > 20 and cB._fused_steps == 0
    assert len(callsA) == probes_per_kind and not callsB
    for (n, a), b in zip(mA.named_parameters(), mB.parameters()):
        assert torch.equal(_bits(a), _bits(b)), n
        for (k, x), y in zip(cA.optimizer.state[a].items(), cB.optimizer.state[b].values()):
            assert torch.equal(_bits(x), _bits(y)), (n, k)
    fused_step._checked.clear()


def _plain_step_fused(chase, model) -> bool:
    x = example_input("resnet_bottleneck", batch=4)
    before = chase._fused_steps
    chase.zero_grad()
    model(x).sum().backward()
    chase.step()
    return chase._fused_steps > before


@pytest.mark.parametrize("why,factory,setup", [
    ("SGD foreach", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True), None),
    ("SGD lr tensor", lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.05), momentum=0.9), None),
    ("SGD step hook", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
     lambda chase: chase.optimizer.register_step_post_hook(lambda *a: None)),
    ("SGD subclass", lambda ps: type("MySGD", (torch.optim.SGD,), {})(ps, lr=0.05, momentum=0.9), None),
    ("SGD machine check fails", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
     lambda chase: mock.patch.object(fused_step, "_sgd_probe", lambda *a: False).start()),
    ("Adam without fused", lambda ps: torch.optim.Adam(ps, lr=1e-3), None),
    ("AdamW foreach, not fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), None),
    ("AdamW capturable", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True, capturable=True), None),
    ("AdamW lr tensor", lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3), fused=True), None),
    ("AdamW grad_scale set", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
     lambda chase: setattr(chase.optimizer, "grad_scale", torch.tensor(2.0))),
    ("AdamW subclass", lambda ps: type("MyAdamW", (torch.optim.AdamW,), {})(ps, lr=1e-3, fused=True), None),
    ("AdamW machine check fails", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
     lambda chase: mock.patch.object(fused_step, "_adam_probe", lambda *a: False).start()),
    ("turned off", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
     lambda chase: mock.patch.dict("os.environ", {"CHASE_EXT_FUSED_STEP": "0"}).start()),
])
def test_unfused_where_equality_is_not_known(why, factory, setup):
    fused_step._checked.clear()
    try:
        try:
            model, chase = _chase(factory, update_interval=1000, channel_sparsity=0.0)
        except (RuntimeError, ValueError) as e:  # e.g. a torch that refuses the combination
            pytest.skip(f"torch refuses {why}: {e}")
        if setup is not None:
            setup(chase)
        for _ in range(3):
            try:
                fused = _plain_step_fused(chase, model)
            except (RuntimeError, ValueError) as e:
                pytest.skip(f"torch refuses a step with {why}: {e}")
            assert not fused, why
        _masked_zero(chase)
    finally:
        mock.patch.stopall()
        fused_step._checked.clear()


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
    assert chase._fused_steps == 1 and torch.equal(first.detach(), before)
    model16, chase16 = _chase(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), update_interval=1000,
                              channel_sparsity=0.0)
    model16.bfloat16()  # converted after wrapping: a kernel dtype, but not the fused op's
    x16 = example_input("resnet_bottleneck", batch=4).bfloat16()
    for _ in range(3):
        chase16.zero_grad()
        model16(x16).sum().backward()
        chase16.step()
    assert chase16._fused_steps == 0
    _masked_zero(chase16)


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
    assert chase._fused_steps == 1
    for p, g, m in zip(chase._params, raw, chase.masks.values()):
        assert not bool(p.grad[~m].any()) and torch.equal(p.grad[m], g[m])


# ---------------------------------------------------------------- masked_adam_
# (beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay): the op's order
ADAM_SETTINGS = [(0.9, 0.999, 0.0, 1e-8, False, False, False), (0.9, 0.999, 0.05, 1e-8, False, False, True),
                 (0.9, 0.99, 1e-2, 1e-6, True, False, False), (0.8, 0.999, 0.1, 1e-8, True, True, True),
                 (0.3, 0.95, 0.0, 1e-3, False, True, False), (0.95, 0.999, 5e-4, 1e-8, False, False, False)]


ADAM_NAMES = ("beta1", "beta2", "weight_decay", "eps", "amsgrad", "maximize", "decoupled_weight_decay")


def _adam_width() -> int:
    """The vector width with which masked_adam_ equals torch's fused Adam here (skips where
    none does: torch builds whose kernel rounds otherwise keep the unfused path)."""
    s = dict(zip(ADAM_NAMES, ADAM_SETTINGS[1]))
    w = fused_step.adam_width(ops, torch.optim.AdamW, s)
    if w is None:
        pytest.skip("torch's fused CPU Adam rounds otherwise on this build; fused_step keeps it unfused")
    return w


def _adam_case(seed, shapes, ties, channels_last, amsgrad, step=3.0, step_dtype=torch.float32):
    ps, gs, bs, ms = _case(seed, shapes, ties, channels_last, True)
    g = torch.Generator().manual_seed(seed + 1)

    def state(s, m):
        t = torch.rand(s, generator=g) * 0.1
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t * m

    vs = [state(s, m) for s, m in zip(shapes, ms)]
    xs = [torch.maximum(v, state(s, m)) for v, s, m in zip(vs, shapes, ms)] if amsgrad else []
    steps = [torch.tensor(step, dtype=step_dtype) for _ in shapes]
    return ps, gs, bs, vs, xs, steps, ms


def _run_adam(fn, case, lr, s, width):
    ps, gs, ea, es, xs, steps, ms = (list(map(torch.clone, ts)) for ts in case)
    fn(ps, gs, ea, es, xs, steps, ms, lr, *s, width)
    return ps, gs, ea, es, xs, steps


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), si=st.integers(0, len(ADAM_SETTINGS) - 1),
       ties=st.booleans(), cl=st.booleans(), lr=st.sampled_from([0.1, 0.0123, 1e-5]),
       step=st.sampled_from([1.0, 2.0, 37.0, 10_000.0]), f64=st.booleans())
def test_masked_adam_matches_reference(seed, n, si, ties, cl, lr, step, f64):
    """The native op against the reference (masking, then torch's own fused kernel) bit
    for bit, with the vector width this machine's check found; float32 or float64 steps."""
    width = _adam_width()
    s = ADAM_SETTINGS[si]
    shapes = [SHAPES[(seed >> (3 * k)) % len(SHAPES)] for k in range(n)]
    case = _adam_case(seed, shapes, ties, cl, s[4], step, torch.float64 if f64 else torch.float32)
    got = _run_adam(ops.masked_adam_, case, lr, s, width)
    want = _run_adam(R.masked_adam_, case, lr, s, width)
    for a_list, b_list in zip(got, want):
        for a, b in zip(a_list, b_list):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert torch.equal(a.view(torch.int64 if a.dtype == torch.float64 else torch.int32),
                               b.view(torch.int64 if b.dtype == torch.float64 else torch.int32))
    for g0, g1, m in zip(case[1], got[1], case[6]):
        assert not bool(g1[~m].any()) and torch.equal(g1[m], g0[m])
    for s0, s1 in zip(case[5], got[5]):
        assert float(s1) == float(s0) + 1


def test_masked_adam_equals_torch_adam_on_this_machine():
    """Against torch.optim.Adam / AdamW(fused=True) themselves, every setting, layouts,
    1 and 2 threads, lengths around the vector width; and the other width must differ
    (the check can tell them apart, so it picks the right one)."""
    width = _adam_width()
    old = torch.get_num_threads()
    try:
        for threads, s, cl in itertools.product((1, 2), ADAM_SETTINGS, (False, True)):
            torch.set_num_threads(threads)
            shapes = [(1,), (7,), (9,), (17,), (16, 8, 3, 3), (40_003,)]
            case = _adam_case(5, shapes, False, cl, s[4])
            got = _run_adam(ops.masked_adam_, case, 0.01, s, width)
            tp = [p.clone() for p in case[0]]
            for p, g, m in zip(tp, case[1], case[6]):
                p.grad = torch.where(m, g, torch.zeros(()))
            cls = torch.optim.AdamW if s[6] else torch.optim.Adam
            opt = cls(tp, lr=0.01, betas=s[:2], weight_decay=s[2], eps=s[3], amsgrad=s[4], maximize=s[5], fused=True)
            for i, p in enumerate(tp):
                opt.state[p].update(step=case[5][i].clone(), exp_avg=case[2][i].clone(), exp_avg_sq=case[3][i].clone(),
                                    **({"max_exp_avg_sq": case[4][i].clone()} if s[4] else {}))
            opt.step()
            for i, p in enumerate(tp):
                st_ = opt.state[p]
                assert torch.equal(_bits(got[0][i]), _bits(p)), (threads, s, cl, i)
                assert torch.equal(_bits(got[2][i]), _bits(st_["exp_avg"])), (threads, s, cl, i)
                assert torch.equal(_bits(got[3][i]), _bits(st_["exp_avg_sq"])), (threads, s, cl, i)
                if s[4]:
                    assert torch.equal(_bits(got[4][i]), _bits(st_["max_exp_avg_sq"])), (threads, s, cl, i)
                assert float(got[5][i]) == float(st_["step"])
            assert fused_step.adam_width(ops, cls, dict(zip(ADAM_NAMES, s))) == width
    finally:
        torch.set_num_threads(old)
    other = 24 - width  # 8 <-> 16
    case = _adam_case(5, [(15,)] * 60, False, False, False)  # 8 slots each round one way or the other
    a = _run_adam(ops.masked_adam_, case, 0.01, ADAM_SETTINGS[1], width)
    b = _run_adam(ops.masked_adam_, case, 0.01, ADAM_SETTINGS[1], other)
    assert any(not torch.equal(_bits(x), _bits(y)) for x, y in zip(a[3], b[3]))


def test_opcheck_masked_adam():
    ps, gs, ea, es, xs, steps, ms = _adam_case(3, [(4, 3, 2, 2), (5, 4)], False, True, True)
    torch.library.opcheck(torch.ops.chase_ext.masked_adam_.default,
                          (ps, gs, ea, es, xs, steps, ms, 1e-3, 0.9, 0.999, 0.01, 1e-8, True, False, True, 8),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.error_path
@pytest.mark.parametrize("impl", [ops.masked_adam_, R.masked_adam_], ids=["native", "reference"])
def test_masked_adam_errors_name_the_argument_and_write_nothing(impl):
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "masks")

    def fresh(**over):
        kw = dict(zip(names, _adam_case(1, [(6, 4), (3, 3, 3, 3)], False, False, True)))
        kw.update(over)
        return kw

    def call(kw, amsgrad=True, width=8):
        impl(*(kw[k] for k in names), 1e-3, 0.9, 0.999, 0.01, 1e-8, amsgrad, False, True, width)

    m0 = fresh()["masks"]
    cases = [
        (dict(grads=[torch.randn(6, 4)]), "one tensor each per weight", {}),
        (dict(max_exp_avg_sqs=[]), "amsgrad needs one max_exp_avg_sq per weight", {}),
        (dict(), "max_exp_avg_sqs are taken only with amsgrad", dict(amsgrad=False)),
        (dict(), "vector_width must be positive", dict(width=0)),
        (dict(exp_avgs=[torch.zeros(6, 4, dtype=torch.float64), torch.zeros(3, 3, 3, 3)]), "float32", {}),
        (dict(masks=[m0[0].float(), m0[1]]), "must be bool", {}),
        (dict(exp_avg_sqs=[torch.rand(4, 6).t(), torch.rand(3, 3, 3, 3)]), "laid out in memory like its mask", {}),
        (dict(grads=[torch.randn(6, 5), torch.randn(3, 3, 3, 3)]), "shape", {}),
        (dict(state_steps=[torch.tensor([1.0, 2.0]), torch.tensor(1.0)]), "state_steps\\[0\\] must be one float32",
         {}),
        (dict(state_steps=[torch.tensor(1), torch.tensor(1.0)]), "state_steps\\[0\\] must be one float32", {}),
    ]
    for over, msg, kw_call in cases:
        kw = fresh(**over)
        before = [t.clone() for k in names[:6] for t in kw[k]]
        with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
            call(kw, **kw_call)
        after = [t for k in names[:6] for t in kw[k]]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), msg
    kw = fresh()
    kw["exp_avgs"] = [kw["exp_avg_sqs"][0], kw["exp_avgs"][1]]
    with pytest.raises((RuntimeError, ValueError), match="shares memory"):
        call(kw)



def test_fused_adam_from_the_second_step():
    """The first step creates Adam's state (left to Adam); later plain steps are fused,
    count the step and leave .grad 0 at masked slots."""
    _adam_width()
    model, chase = _chase(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), update_interval=1000,
                          channel_sparsity=0.0)
    assert not _plain_step_fused(chase, model)
    assert _plain_step_fused(chase, model) and _plain_step_fused(chase, model)
    for p in chase._params:
        assert float(chase.optimizer.state[p]["step"]) == 3
    for p in chase.model.parameters():
        if p.grad is not None:
            assert float(chase.optimizer.state[p]["step"]) == 3
    for p, m in zip(chase._params, chase.masks.values()):
        assert not bool(p.grad[~m].any())
    _masked_zero(chase)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the slow sqrt is MKL's")
def test_default_cpu_adam_rule_is_hinted_once_at_construction():
    import warnings

    from chase_ext import ChaseOptimizer

    def build(opt_fn):
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ChaseOptimizer(opt_fn(m.parameters()), m, density=0.5, total_steps=100)
        return [str(x.message) for x in w if "fused=True" in str(x.message)]

    class MyAdam(torch.optim.Adam):
        pass

    for cls in (torch.optim.Adam, torch.optim.AdamW):
        got = build(lambda ps: cls(ps, lr=1e-3))
        assert len(got) == 1 and f"torch.optim.{cls.__name__} without fused=True" in got[0], got
        assert build(lambda ps: cls(ps, lr=1e-3, fused=True)) == []
    assert build(lambda ps: torch.optim.SGD(ps, lr=0.1)) == []
    assert build(lambda ps: MyAdam(ps, lr=1e-3)) == []  # a subclass may have its own rule
