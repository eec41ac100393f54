"""mask_update_ on tensors laid out otherwise than row-major (channels_last and any other
order of the dims after the first): masks, weights, states and counts are the
reference's on contiguous copies bit for bit (Σ|w| to rounding: it is summed in memory
order), and the tensors keep their layout; layouts the op cannot take are refused,
naming the argument, with nothing written."""
import os
import re
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chase_ext import layout as L
from chase_ext import reference as R
from test_ops import make_case, skip_unless_cpu_runs

ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(4, 3, 3, 3), (5, 2, 1, 3), (3, 4, 2), (6, 5), (2, 3, 2, 2, 2), (1, 3, 3, 3), (4, 1, 3, 3), (3, 2, 0, 2)]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def laid_out(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """A copy of ``x`` whose memory holds its dims in ``order`` (outermost first)."""
    return x.permute(order).clone(memory_format=torch.contiguous_format).permute([order.index(d) for d in range(x.dim())])


def rows_dense_order(shape, g) -> list[int]:
    """Dim 0 outermost, the others in a random order (channels_last among them)."""
    rest = list(range(1, len(shape)))
    perm = torch.randperm(len(rest), generator=g).tolist()
    return [0] + [rest[i] for i in perm]


def storage(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat view, in memory order."""
    return t.as_strided((t.numel(),), (1,))


def make(seed, n, dtype, ties, live, shapes=None, density=None):
    """test_ops' random case on rows-dense shapes, with a memory order for each tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or [SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))] for _ in range(n)]
    ws, ms, scores, lr, lc, g = make_case(seed, n, dtype, "cpu", ties, live, shapes=shapes, density=density)
    return ws, ms, scores, lr, lc, [rows_dense_order(s, g) for s in shapes], g


def counts_for(ms, lv, per_tensor, frac, grow_frac):
    if per_tensor:
        active = [int((m & l).sum()) for m, l in zip(ms, lv)]
        prune = [round(frac * a) for a in active]
        free = [int(l.sum()) - a + p for l, a, p in zip(lv, active, prune)]
        return prune, [round(grow_frac * f) for f in free]
    active = sum(int((m & l).sum()) for m, l in zip(ms, lv))
    free = sum(int(l.sum()) for l in lv) - active
    prune = round(frac * active)
    return [prune], [round(grow_frac * (free + prune))]


def odd_unit_strides(t: torch.Tensor) -> torch.Tensor:
    """The same tensor with other strides on its size-1 dims (never used to address it)."""
    return t.as_strided(t.shape, [st if n > 1 else 7 + d for d, (n, st) in enumerate(zip(t.shape, t.stride()))])


def run_both(ws, ms, scores, lr, lc, states, owner, prune, grow, orders, device="cpu"):
    """The native op on `device` on tensors in `orders`, the reference on contiguous CPU
    ones; both results (the native ones back on the CPU). Masks, scores and states of
    odd-numbered weights get other strides on their size-1 dims than the weight."""
    def lay(ts, own=None):
        out = []
        for i, t in enumerate(ts):
            o = i if own is None else own[i]
            x = laid_out(t, orders[o]).to(device)
            out.append(odd_unit_strides(x) if o % 2 and ts is not ws else x)
        return out

    a = (lay(ws), lay(ms), lay(scores), lay(states, owner))
    strides = [t.stride() for t in a[0] + a[1] + a[3]]
    cnt, sums = ops.mask_update_(a[0], a[1], a[2], [x.to(device) for x in lr], [x.to(device) for x in lc], a[3],
                                 owner, prune, grow)
    assert [t.stride() for t in a[0] + a[1] + a[3]] == strides  # written in place, layouts kept
    a = tuple([t.cpu() for t in ts] for ts in a)
    b = ([w.clone() for w in ws], [m.clone() for m in ms], [s.clone() for s in states])
    rc, rs = R.mask_update_(b[0], b[1], scores, lr, lc, b[2], owner, prune, grow)
    return a, b, (cnt.cpu(), sums.cpu()), (rc, rs)


def assert_same(a, b, out, ref):
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)
    for x, y in zip(a[0] + a[3], b[0] + b[2]):
        assert torch.equal(x, y)
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES), ties=st.booleans(),
       live=st.booleans(), per_tensor=st.booleans(), with_states=st.booleans(),
       frac=st.sampled_from([0.0, 0.3, 1.0]), grow_frac=st.sampled_from([0.0, 0.5, 1.0]))
def test_any_rows_dense_layout_matches_reference(device, seed, n, dtype, ties, live, per_tensor, with_states, frac,
                                                 grow_frac):
    ws, ms, scores, lr, lc, orders, g = make(seed, n, dtype, ties, live)
    lv = [R.live_slots(w, lr[i] if lr else None, lc[i] if lc else None) for i, w in enumerate(ws)]
    prune, grow = counts_for(ms, lv, per_tensor, frac, grow_frac)
    states = [torch.randn(w.shape, generator=g) for w in ws for _ in range(2)] if with_states else []
    owner = [i for i in range(len(ws)) for _ in range(2)] if with_states else []
    assert_same(*run_both(ws, ms, scores, lr, lc, states, owner, prune, grow, orders, device))


LARGE = {
    # rows of 1,152 and 4,608 slots (longer than the kernel's 2,048-slot blocks), 1x1 convs
    "channels_last": ([(256, 128, 3, 3), (6, 512, 3, 3), (40, 7, 5, 5), (96, 48, 1, 1)], [0, 2, 3, 1]),
    "w-h-c": ([(256, 128, 3, 3), (6, 512, 3, 3), (40, 7, 5, 5)], [0, 3, 2, 1]),
    "5-d": ([(128, 32, 4, 4, 4), (6, 100, 3, 1, 3)], [0, 2, 4, 1, 3]),
}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("layout", list(LARGE))
def test_large_bracketed_and_fallback(device, layout, ties, per_tensor, adversarial):
    # 4 x 65536 slots and more in several chunks, so the selections are bracketed from a
    # strided sample of memory (runs of 16 slots every 64); with `adversarial` the sampled
    # slots of the first tensor hold values unlike the rest, so the brackets miss and the
    # exact multi-pass select (walking rows in row-major order) takes over. Tie classes
    # straddle rows, chunks and the cutoff rows; per tensor, cutoffs fall in long rows.
    shapes, order = LARGE[layout]
    ws, ms, scores, lr, lc, _, g = make(3, len(shapes), torch.float32, ties, True, shapes=shapes, density=0.2)
    orders = [order] * len(shapes)
    if adversarial:
        wl, sl = laid_out(ws[0], orders[0]), laid_out(scores[0], orders[0])
        sampled = torch.arange(wl.numel()) % 64 < 16
        storage(wl)[sampled] = 100 + storage(wl)[sampled].abs()
        storage(sl)[sampled] = 1e-3 * storage(sl)[sampled]
        ws[0].copy_(wl)
        scores[0].copy_(sl)
        ws[0].mul_(ms[0])
    lv = [R.live_slots(w, r, c) for w, r, c in zip(ws, lr, lc)]
    prune, grow = counts_for(ms, lv, per_tensor, 0.25, 0.3)
    states = [torch.randn(w.shape, generator=g) for w in ws]
    assert_same(*run_both(ws, ms, scores, lr, lc, states, list(range(len(ws))), prune, grow, orders, device))


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 512, 3, 3)])
def test_ties_follow_row_major_order_not_memory(shape):
    # Every |w| and every score equal, the first half of the slots (row-major) active: the
    # prune takes the k lowest row-major indices and the grow the lowest inactive ones,
    # whatever the memory order. Rows of 4,608 slots span three of the kernel's blocks, so
    # the cutoffs also fall in blocks that start inside a row.
    n = torch.Size(shape).numel()
    m = torch.zeros(n, dtype=torch.bool)
    m[: n // 2] = True
    m = m.view(shape)
    w = torch.ones(shape) * m
    s = torch.ones(shape)
    half = n // 2
    for kp, kg in [(5, 0), (5, 3), (half, n), (1, 13), (0, 0), (half, 0), (half // 3, half // 2),
                   (half - 7, half + 5), (2100, 2500), (2300, 4700), (half - 2100, 2050)]:
        if kp > half or kg > n - half + kp:
            continue
        a, b, out, ref = run_both([w], [m], [s], [], [], [], [], [kp], [kg], [[0, 2, 3, 1]])
        assert_same(a, b, out, ref)
        want = torch.zeros(n, dtype=torch.bool)
        want[kp:half] = True  # the first kp active slots pruned
        candidates = list(range(kp)) + list(range(half, n))  # pruned slots may grow back
        want[candidates[:kg]] = True
        assert torch.equal(a[1][0].reshape(-1), want), (kp, kg)


@pytest.mark.error_path  # the ISAs this CPU cannot run are found by the op's error
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_isa_channels_last(isa, dtype):
    shapes = [(16, 8, 3, 3), (8, 16, 3, 3), (12, 5, 7, 7)]
    skip_unless_cpu_runs(isa)
    with mock.patch.dict(os.environ, {"CHASE_EXT_CPU_ISA": isa}):
        for ties in (False, True):
            ws, ms, scores, lr, lc, _, g = make(7, 3, dtype, ties, True, shapes=shapes, density=0.3)
            lv = [R.live_slots(w, r, c) for w, r, c in zip(ws, lr, lc)]
            prune, grow = counts_for(ms, lv, False, 0.3, 0.4)
            states = [torch.randn(w.shape, generator=g).to(dtype) for w in ws]
            assert_same(*run_both(ws, ms, scores, lr, lc, states, [0, 1, 2], prune, grow, [[0, 2, 3, 1]] * 3))


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _args():
    g = torch.Generator().manual_seed(1)
    w = _cl(torch.randn(4, 3, 2, 2, generator=g))
    m = _cl(torch.rand(4, 3, 2, 2, generator=g) < 0.5)
    w.mul_(m)
    return dict(weights=[w], masks=[m], scores=[_cl(torch.randn(4, 3, 2, 2, generator=g))], live_rows=[],
                live_cols=[], states=[_cl(torch.randn(4, 3, 2, 2, generator=g))], state_owner=[0],
                prune_counts=[2], grow_counts=[2])


BAD = [
    # (id, replaced arguments, the argument the message names)
    ("weight-dim0-inner", lambda a: dict(weights=[torch.randn(3, 4).t()], masks=[torch.ones(3, 4, dtype=torch.bool).t()],
                                         scores=[torch.randn(3, 4).t()], states=[]), "weights[0]"),
    ("weight-gappy", lambda a: dict(weights=[torch.randn(4, 6)[:, ::2]], masks=[torch.ones(4, 3, dtype=torch.bool)],
                                    scores=[torch.randn(4, 3)], states=[]), "weights[0]"),
    ("score-contiguous", lambda a: dict(scores=[a["scores"][0].contiguous()]), "scores[0]"),
    ("mask-contiguous", lambda a: dict(masks=[a["masks"][0].contiguous()]), "masks[0]"),
    ("state-contiguous", lambda a: dict(states=[a["states"][0].contiguous()]), "states[0]"),
    # two bad weights: both implementations check dtypes tensor by tensor before layouts
    ("dim0-inner-then-half", lambda a: dict(weights=[torch.randn(3, 4).t(), torch.randn(4, 3).half()],
                                            masks=[torch.ones(4, 3, dtype=torch.bool)] * 2,
                                            scores=[torch.randn(4, 3)] * 2, states=[]), "weights[1]"),
]


def _map(a, fn):
    """The arguments with fn applied to every tensor of every tensor list."""
    return {k: [fn(t) for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
            for k, v in a.items()}


def _to(a, device):
    return _map(a, lambda t: t.to(device))


@pytest.mark.error_path
@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_layouts_the_op_cannot_take_are_refused(device, backend, case):
    if backend == "reference" and device != "cpu":
        pytest.skip("the reference rows run once, on the CPU")
    impl = R if backend == "reference" else ops
    a = _args()
    a.update(case[1](a))
    a = _to(a, device)
    before = [t.clone() for k in ("weights", "masks", "states") for t in a[k]]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=re.escape(case[2])) as e:
        impl.mask_update_(**a)
    assert "mask_update_" in str(e.value)
    after = [t for k in ("weights", "masks", "states") for t in a[k]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.error_path
@pytest.mark.parametrize("bad", ["prune-too-big", "grow-too-big", "score-nan", "weight-inf"])
def test_errors_on_channels_last_write_nothing(device, bad):
    # on CUDA the op stages contiguous copies: a call that raises must not copy them back
    a = _args()
    if bad == "prune-too-big":
        a["prune_counts"] = [10**6]
    elif bad == "grow-too-big":
        a["grow_counts"] = [10**6]
    elif bad == "score-nan":
        a["scores"][0][1, 2, 1, 0] = float("nan")
    else:
        a["weights"][0][2, 0, 1, 1] = float("inf")
    a = _to(a, device)
    before = [t.clone() for k in ("weights", "masks", "states") for t in a[k]]
    with pytest.raises(RuntimeError, match="mask_update_"):
        ops.mask_update_(**a)
    after = [t for k in ("weights", "masks", "states") for t in a[k]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in after)


@pytest.mark.parametrize("scores_layout", ["like", "contiguous"])
def test_layout_wrapper_calls_the_op_in_place(scores_layout):
    # ChaseOptimizer's path: channels_last weights, masks and states go to the op as they
    # are (no copies); a score in another layout (random growth) is copied into the
    # weight's; the result equals the contiguous run.
    a = _args()
    if scores_layout == "contiguous":
        a["scores"] = [a["scores"][0].contiguous()]
    calls = []

    class Spy:
        @staticmethod
        def mask_update_(*args):
            calls.append([t.data_ptr() for t in args[0] + args[1] + args[5]])
            return ops.mask_update_(*args)

    ptrs = [t.data_ptr() for t in a["weights"] + a["masks"] + a["states"]]
    ref = _map(a, lambda t: t.contiguous().clone())
    L.mask_update_(Spy, *a.values())
    assert calls == [ptrs]
    R.mask_update_(**ref)
    for k in ("weights", "masks", "states"):
        assert all(torch.equal(x, y) for x, y in zip(a[k], ref[k]))
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in a[k])


def test_layout_wrapper_stages_what_the_op_cannot_take():
    # a transposed (dim 0 innermost) weight goes through contiguous copies, written back
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, generator=g)
    m = torch.rand(5, 4, generator=g) < 0.5
    w.mul_(m)
    s, st_ = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    wt, mt, stt = w.t().contiguous().t(), m.t().contiguous().t(), st_.t().contiguous().t()
    assert not L.rows_dense(wt)
    L.mask_update_(ops, [wt], [mt], [s], [], [], [stt], [0], [3], [4])
    R.mask_update_([w], [m], [s], [], [], [st_], [0], [3], [4])
    assert torch.equal(wt, w) and torch.equal(mt, m) and torch.equal(stt, st_)
    assert wt.stride() == (1, 5)


def test_opcheck_channels_last():
    a = _args()
    torch.library.opcheck(torch.ops.chase_ext.mask_update_.default, tuple(a.values()),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_call_on_channels_last_equals_eager():
    a, b = _args(), _args()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def update(ws, ms, sc, st):
        return torch.ops.chase_ext.mask_update_(ws, ms, sc, [], [], st, [0], [2], [2])

    got = update(a["weights"], a["masks"], a["scores"], a["states"])
    want = ops.mask_update_(b["weights"], b["masks"], b["scores"], [], [], b["states"], [0], [2], [2])
    for k in ("weights", "masks", "states"):
        assert torch.equal(a[k][0], b[k][0]) and a[k][0].stride() == b[k][0].stride()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
