"""Every native op against chase_ext.reference (hypothesis), opcheck, compile, errors."""
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chase_ext import reference as R

ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0, 3), (1, 1), (3, 0), (5, 4), (4, 3, 3, 3), (7, 2, 1), (2, 5, 2, 2), (1,), (6,)]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_case(seed, n_tensors, dtype, device, ties, live, shapes=None, density=None):
    """Random weights/scores/masks; `ties` quantises values so many keys are equal."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or [SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))] for _ in range(n_tensors)]
    d = density if density is not None else float(torch.rand(1, generator=g))

    def values(shape):
        x = torch.randn(shape, generator=g)
        if ties:
            x = torch.round(x * 2) / 2  # a handful of distinct values, +-0 included
        return x.to(dtype).to(device)

    ws = [values(s) for s in shapes]
    ms = [(torch.rand(s, generator=g) < d).to(device) for s in shapes]
    for w, m in zip(ws, ms):
        w.mul_(m)
    scores = [values(s) for s in shapes]
    lr, lc = [], []
    if live and all(len(s) >= 2 for s in shapes):
        lr = [(torch.rand(s[0], generator=g) < 0.8).to(device) for s in shapes]
        lc = [(torch.rand(s[1], generator=g) < 0.8).to(device) for s in shapes]
    return ws, ms, scores, lr, lc, g


def clone(ts):
    return [t.clone() for t in ts]


def count(cands):
    return int(sum(int(c.sum()) for c in cands))


def live_list(ws, lr, lc):
    return [R.live_slots(w, lr[i] if lr else None, lc[i] if lc else None) for i, w in enumerate(ws)]


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       ties=st.booleans(), live=st.booleans(), largest=st.booleans(), absolute=st.booleans(),
       mask_value=st.booleans(), kpos=st.sampled_from(["zero", "all", "one", "mid"]))
def test_select_threshold_matches_reference(device, seed, n, dtype, ties, live, largest, absolute, mask_value, kpos):
    ws, ms, _, lr, lc, g = make_case(seed, n, dtype, device, ties, live)
    cand = count([(m == mask_value) & l for m, l in zip(ms, live_list(ws, lr, lc))])
    k = {"zero": 0, "all": cand, "one": min(1, cand), "mid": cand // 2}[kpos]
    got = ops.select_threshold(ws, ms, lr, lc, mask_value, k, largest, absolute)
    want = R.select_threshold([w.cpu() for w in ws], [m.cpu() for m in ms], [x.cpu() for x in lr],
                              [x.cpu() for x in lc], mask_value, k, largest, absolute)
    assert got.tolist() == want.tolist()


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       ties=st.booleans(), live=st.booleans(), per_tensor=st.booleans(), with_states=st.booleans(),
       frac=st.sampled_from([0.0, 0.3, 1.0]), grow_frac=st.sampled_from([0.0, 0.5, 1.0]))
def test_mask_update_matches_reference(device, seed, n, dtype, ties, live, per_tensor, with_states, frac, grow_frac):
    ws, ms, scores, lr, lc, g = make_case(seed, n, dtype, device, ties, live)
    lv = live_list(ws, lr, lc)
    if per_tensor:
        active = [int((m & l).sum()) for m, l in zip(ms, lv)]
        prune = [round(frac * a) for a in active]
        free = [int(l.sum()) - a + p for l, a, p in zip(lv, active, prune)]
        grow = [round(grow_frac * f) for f in free]
    else:
        active = count([m & l for m, l in zip(ms, lv)])
        prune = [round(frac * active)]
        grow = [round(grow_frac * (count(lv) - active + prune[0]))]
    states = [torch.randn(w.shape, generator=g).to(device) for w in ws for _ in range(2)] if with_states else []
    owner = [i for i in range(len(ws)) for _ in range(2)] if with_states else []
    a = (clone(ws), clone(ms), clone(states))
    b = ([w.cpu() for w in ws], [m.cpu() for m in ms], [s.cpu() for s in states])
    cnt, sums = ops.mask_update_(a[0], a[1], scores, lr, lc, a[2], owner, prune, grow)
    rc, rs = R.mask_update_(b[0], b[1], [s.cpu() for s in scores], [x.cpu() for x in lr], [x.cpu() for x in lc],
                            b[2], owner, prune, grow)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x.cpu(), y)
    for x, y in zip(a[0] + a[2], b[0] + b[2]):
        assert torch.equal(x.cpu(), y)
    assert torch.equal(cnt.cpu(), rc)
    torch.testing.assert_close(sums.cpu(), rs, rtol=1e-5, atol=1e-5)
    # the active count is exactly what was asked for
    if not per_tensor:
        assert count([m & l for m, l in zip(a[1], lv)]) == active - prune[0] + grow[0]


def test_mask_update_keeps_value_of_pruned_and_regrown(device):
    # slot 0 has the smallest |w| (pruned) and the largest score (grown back): it keeps its
    # value and state. Slot 3 was inactive and is grown: it starts at exactly 0.
    for impl in (ops, R):
        w = torch.tensor([[0.1, 2.0, 3.0, 7.0]], device=device)  # slot 3 breaks the invariant on purpose
        m = torch.tensor([[True, True, True, False]], device=device)
        s = torch.tensor([[9.0, 0.0, 0.0, 5.0]], device=device)
        st_ = torch.tensor([[1.0, 1.0, 1.0, 4.0]], device=device)
        impl.mask_update_([w], [m], [s], [], [], [st_], [0], [2], [2])
        # pruned: slots 0 (0.1) and 1 (2.0); grown: slot 0 (9.0) and slot 3 (5.0)
        assert m.tolist() == [[True, False, True, True]]
        assert w.tolist() == [[pytest.approx(0.1), 0.0, 3.0, 0.0]]
        assert st_.tolist() == [[1.0, 0.0, 1.0, 0.0]]


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES))
def test_channel_stats_matches_reference(device, seed, n, dtype):
    ws, ms, *_ = make_case(seed, n, dtype, device, ties=False, live=False)
    c, s = ops.channel_stats(ws, ms)
    rc, rs = R.channel_stats([w.cpu() for w in ws], [m.cpu() for m in ms])
    assert torch.equal(c.cpu(), rc)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-5, atol=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES))
def test_masked_apply_matches_reference(device, seed, n, dtype):
    ws, ms, scores, *_ = make_case(seed, n, dtype, device, ties=False, live=False)
    ts = [torch.randn_like(w) for w in ws] + [s.float() for s in scores]
    owner = list(range(len(ws))) * 2
    a, b = clone(ts), [t.cpu() for t in ts]
    ops.masked_apply_(a, ms, owner)
    R.masked_apply_(b, [m.cpu() for m in ms], owner)
    for x, y in zip(a, b):
        assert torch.equal(x.cpu(), y)


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(6, 4), (5, 3, 2, 2), (4, 7), (3, 1), (1, 5, 3)]),
       dim=st.integers(0, 1), dtype=st.sampled_from(DTYPES), keep_frac=st.sampled_from([0.0, 0.5, 1.0]))
def test_gather_channels_matches_reference(device, seed, shape, dim, dtype, keep_frac):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype).to(device)
    C = shape[dim]
    keep = torch.randperm(C, generator=g)[: round(keep_frac * C)].sort().values
    a, b = t.clone(), t.cpu().clone()
    ops.gather_channels_(a, keep, dim)
    R.gather_channels_(b, keep, dim)
    assert torch.equal(a.cpu(), b)
    m = t.numel() // C * len(keep)
    assert torch.equal(a.flatten()[:m].cpu(), t.cpu().index_select(dim, keep).flatten())


def test_gather_channels_keeps_storage(device):
    t = torch.arange(24.0, device=device).view(4, 6)
    ptr = t.data_ptr()
    ops.gather_channels_(t, torch.tensor([1, 4]), 1)
    assert t.data_ptr() == ptr
    assert t.flatten()[:8].tolist() == [1, 4, 7, 10, 13, 16, 19, 22]


# ---------------------------------------------------------------- CPU == CUDA, bit for bit
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ties=st.booleans(), live=st.booleans())
def test_cpu_equals_cuda(seed, ties, live):
    ws, ms, scores, lr, lc, _ = make_case(seed, 3, torch.float32, "cpu", ties, live,
                                          shapes=[(16, 8, 3, 3), (32, 16), (8, 4, 1, 1)])
    lv = live_list(ws, lr, lc)
    active = count([m & l for m, l in zip(ms, lv)])
    prune, grow = [active // 3], [active // 3 + 5]
    cuda = ([w.cuda() for w in ws], [m.cuda() for m in ms])
    ops.mask_update_(cuda[0], cuda[1], [s.cuda() for s in scores], [x.cuda() for x in lr], [x.cuda() for x in lc],
                     [], [], prune, grow)
    ops.mask_update_(ws, ms, scores, lr, lc, [], [], prune, grow)
    for x, y in zip(ms + ws, cuda[1] + cuda[0]):
        assert torch.equal(x, y.cpu())


@pytest.mark.error_path
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_is_refused():
    """The CUDA ops other than masked_apply_ read results back on the host, which a graph
    cannot replay: capturing one is a clear error, and nothing is written. (masked_apply_,
    the plain step's op, may be captured: tests/test_capture.py.)"""
    w = torch.randn(64, device="cuda")
    m = torch.rand(64, device="cuda") < 0.5
    w0, m0 = w.clone(), m.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            ops.channel_stats([w.view(8, 8)], [m.view(8, 8)])
    torch.cuda.synchronize()
    assert torch.equal(w, w0) and torch.equal(m, m0)


@pytest.fixture
def cuda_select():
    """``with cuda_select(mode):`` runs a block under one CUDA selection mode."""
    return lambda name: mock.patch.dict(os.environ, {"CHASE_EXT_CUDA_SELECT": name})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES), ties=st.booleans(),
       live=st.booleans(), with_states=st.booleans(), big=st.booleans(),
       frac=st.sampled_from([0.0, 0.01, 0.3, 1.0]), grow_frac=st.sampled_from([0.0, 0.02, 0.5, 1.0]),
       per_tensor=st.booleans())
def test_cuda_selection_modes_match_reference(cuda_select, seed, n, dtype, ties, live, with_states, big, frac,
                                              grow_frac, per_tensor):
    """Every CUDA selection mode (radix; compacting, with its fallback; bracketed with its
    fallback, global scope only) equals the reference, in global and per-tensor scope;
    `big` adds tensors past one sample (65536 slots), tiles and row segments."""
    shapes = None
    if big:
        g = torch.Generator().manual_seed(seed)
        shapes = [SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))] for _ in range(n)]
        shapes += [(300, 257), (3, 40000)] if not live else [(300, 257), (3, 4, 100, 100)]
    ws, ms, scores, lr, lc, g = make_case(seed, n, dtype, "cpu", ties, live, shapes=shapes)
    if live and not all(len(w.shape) >= 2 for w in ws):
        lr, lc = [], []
    lv = live_list(ws, lr, lc)
    scopes = [[m] for m in range(len(ws))] if per_tensor else [list(range(len(ws)))]
    active = [count([ms[t] & lv[t] for t in ts]) for ts in scopes]
    prune = [round(frac * a) for a in active]
    grow = [round(grow_frac * (count([lv[t] for t in ts]) - a + p)) for ts, a, p in zip(scopes, active, prune)]
    states = [torch.randn(w.shape, generator=g) for w in ws] if with_states else []
    owner = list(range(len(ws))) if with_states else []
    want = (clone(ws), clone(ms), clone(states))
    rc, _ = R.mask_update_(want[0], want[1], scores, lr, lc, want[2], owner, prune, grow)
    for mode in ("radix", "compact", "bracket"):
        a = ([w.cuda() for w in ws], [m.cuda() for m in ms], [x.cuda() for x in states])
        with cuda_select(mode):
            cnt, _ = ops.mask_update_(a[0], a[1], [x.cuda() for x in scores], [x.cuda() for x in lr],
                                      [x.cuda() for x in lc], a[2], owner, prune, grow)
        for x, y in zip(a[1] + a[0] + a[2], want[1] + want[0] + want[2]):
            assert torch.equal(x.cpu(), y), mode
        assert torch.equal(cnt.cpu(), rc), mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("adversarial", [False, True])
def test_cuda_bracketed_select_sampled_and_fallback(cuda_select, adversarial):
    """Same result both ways; the path taken is what the plant decides: an ordinary
    sample brackets both thresholds, a planted one misses and hands over to the radix
    select."""
    before = ops.cuda_select_stats()
    with cuda_select("bracket"):
        _sampled_case("cuda", adversarial)
    after = ops.cuda_select_stats()
    took = "bracket_fallback" if adversarial else "bracket_fast"
    assert after[took] == before[took] + 1, (before, after)


def _compact_case(scores: str, per_tensor: bool, seed: int = 7):
    """Two tensors (one past a tile, one spanning several tiles and row segments), density
    0.3; grow scores "normal", "ties" (quantised: runs of equal keys inside the bin the
    k-th falls in) or "equal" (all 1.0 but a few: one bin holds nearly every candidate,
    the lists would be too large)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 257), (64, 3, 20, 20)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    ms = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    ws = [w * m for w, m in zip(ws, ms)]
    raw = [torch.randn(s, generator=g) for s in shapes]
    ss = {"normal": raw, "ties": [torch.round(x * 16) / 16 for x in raw],
          "equal": [torch.where(x.abs() > 2.5, x, torch.ones(())) for x in raw]}[scores]
    act = [int(m.sum()) for m in ms]
    if per_tensor:
        prune, grow = [a // 20 for a in act], [a // 20 + 3 for a in act]
    else:
        prune, grow = [sum(act) // 20], [sum(act) // 20 + 3]
    return ws, ms, ss, prune, grow


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("scores", ["normal", "ties", "equal"])
def test_cuda_compacting_select_and_fallback(cuda_select, scores, per_tensor):
    """CHASE_EXT_CUDA_SELECT=compact equals the reference; the path taken is what the
    scores decide: both selections compacted, or (equal scores) the grow selection
    handed to the radix select."""
    ws, ms, ss, prune, grow = _compact_case(scores, per_tensor)
    before = ops.cuda_select_stats()
    a = ([w.cuda() for w in ws], [m.cuda() for m in ms])
    with cuda_select("compact"):
        cnt, sums = ops.mask_update_(a[0], a[1], [x.cuda() for x in ss], [], [], [], [], prune, grow)
    after = ops.cuda_select_stats()
    b = ([w.clone() for w in ws], [m.clone() for m in ms])
    rc, rs = R.mask_update_(b[0], b[1], ss, [], [], [], [], prune, grow)
    for x, y in zip(a[1] + a[0], b[1] + b[0]):
        assert torch.equal(x.cpu(), y)
    assert torch.equal(cnt.cpu(), rc)
    made = after["compact"] - before["compact"]
    fell = after["compact_fallback"] - before["compact_fallback"]
    assert (made, fell) == ((1, 1) if scores == "equal" else (2, 0)), (before, after)


@pytest.mark.error_path
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_selection_mode_errors(cuda_select):
    w, m = [torch.randn(8, device="cuda")], [torch.ones(8, dtype=torch.bool, device="cuda")]
    w0 = w[0].clone()
    with cuda_select("fastest"), pytest.raises(RuntimeError, match="CHASE_EXT_CUDA_SELECT=fastest"):
        ops.mask_update_(w, m, [torch.rand(8, device="cuda")], [], [], [], [], [2], [2])
    assert torch.equal(w[0], w0) and bool(m[0].all())
    # the other paths raise the radix path's errors, before writing anything
    bad = torch.rand(8, device="cuda")
    bad[3] = float("nan")
    for mode in ("bracket", "compact"):
        with cuda_select(mode), pytest.raises(RuntimeError, match="prune_counts=9 is out of range"):
            ops.mask_update_(w, m, [torch.rand(8, device="cuda")], [], [], [], [], [9], [0])
        with cuda_select(mode), pytest.raises(RuntimeError, match="scores has non-finite"):
            ops.mask_update_(w, m, [bad], [], [], [], [], [2], [2])
        with cuda_select(mode), pytest.raises(RuntimeError, match=r"grow_counts\[1\]=3 is out of range"):
            ops.mask_update_(w + [w[0].clone()], m + [m[0].clone()], [bad.nan_to_num()] * 2, [], [], [], [],
                             [0, 0], [0, 3])
        assert torch.equal(w[0], w0) and bool(m[0].all()), mode


# ---------------------------------------------------------------- opcheck and compile
def _opcheck_cases(device):
    ws, ms, scores, lr, lc, g = make_case(3, 2, torch.float32, device, ties=True, live=True,
                                          shapes=[(4, 3, 2, 2), (5, 4)], density=0.5)
    states = [torch.randn_like(w) for w in ws]
    lv = live_list(ws, lr, lc)
    active = count([m & l for m, l in zip(ms, lv)])
    return [
        (torch.ops.chase_ext.select_threshold.default, (ws, ms, lr, lc, True, 3, False, True)),
        (torch.ops.chase_ext.mask_update_.default,
         (clone(ws), clone(ms), scores, lr, lc, states, [0, 1], [active // 2], [active // 2])),
        (torch.ops.chase_ext.channel_stats.default, (ws, ms)),
        (torch.ops.chase_ext.masked_apply_.default, (clone(scores), ms, [0, 1])),
        (torch.ops.chase_ext.gather_channels_.default, (torch.randn(6, 4, device=device), torch.tensor([0, 2, 5]), 0)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(device, i):
    op, args = _opcheck_cases(device)[i]
    # the data-dependent selection cannot be differentiated; skip autograd registration check
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph(device):
    ws, ms, *_ = make_case(5, 2, torch.float32, device, ties=False, live=False, shapes=[(4, 3, 3, 3), (6, 4)])
    owner = [0, 1]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ws, ms):
        c, s = torch.ops.chase_ext.channel_stats(ws, ms)
        torch.ops.chase_ext.masked_apply_(ws, ms, owner)
        return c, s * 2

    a = clone(ws)
    c, s = step(a, ms)
    rc, rs = R.channel_stats([w.cpu() for w in ws], [m.cpu() for m in ms])
    assert torch.equal(c.cpu(), rc)
    torch.testing.assert_close(s.cpu(), rs * 2)


# ---------------------------------------------------------------- errors
def _snapshot(*lists):
    return [[t.clone() for t in ts] for ts in lists]


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _unchanged(before, *lists):
    """Bit-for-bit equality (NaN included)."""
    return all(torch.equal(_bits(x), _bits(y)) for b, ts in zip(before, lists) for x, y in zip(b, ts))


@pytest.mark.error_path
def test_errors_name_the_argument_and_write_nothing(device):
    ws, ms, scores, lr, lc, _ = make_case(7, 2, torch.float32, device, ties=False, live=False,
                                          shapes=[(4, 3), (5, 2)], density=0.5)
    states = [torch.randn_like(w) for w in ws]
    before = _snapshot(ws, ms, states)
    active = count(ms)
    cases = [
        (dict(prune=[active + 1], grow=[0]), "prune_counts"),
        (dict(prune=[0], grow=[10**6]), "grow_counts"),
        (dict(prune=[1, 2, 3], grow=[1, 2, 3]), "prune_counts"),
        (dict(prune=[-1], grow=[0]), "prune_counts"),
        (dict(masks=[m.float() for m in ms]), "masks[0]"),
        (dict(scores=[scores[0], scores[1][:2]]), "scores[1]"),
        (dict(states=[states[0][:1]], owner=[0]), "states[0]"),
        (dict(states=states, owner=[0, 5]), "state_owner[1]"),
        (dict(live_rows=[torch.ones(3, dtype=torch.bool, device=device)] * 2), "live_rows[0]"),
        (dict(weights_dtype=torch.int32), "weights[0]"),
    ]
    for kw, needle in cases:
        w = [x.to(kw["weights_dtype"]) for x in ws] if "weights_dtype" in kw else ws
        with pytest.raises(RuntimeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            ops.mask_update_(w, kw.get("masks", ms), kw.get("scores", scores), kw.get("live_rows", []), [],
                             kw.get("states", states), kw.get("owner", [0, 1]),
                             kw.get("prune", [1]), kw.get("grow", [1]))
        assert _unchanged(before, ws, ms, states), needle


@pytest.mark.error_path
def test_non_finite_raises_and_writes_nothing(device):
    ws, ms, scores, *_ = make_case(8, 2, torch.float32, device, ties=False, live=False,
                                   shapes=[(4, 3), (5, 2)], density=0.5)
    for bad, needle in (("w", "weights"), ("s", "scores")):
        w, s = clone(ws), clone(scores)
        (w if bad == "w" else s)[1][2, 1] = float("nan") if bad == "w" else float("inf")
        before = _snapshot(w, ms)
        with pytest.raises(RuntimeError, match=f"{needle} has non-finite"):
            ops.mask_update_(w, ms, s, [], [], [], [], [1], [1])
        assert _unchanged(before, w, ms)
        with pytest.raises(ValueError, match=f"{needle}"):
            R.mask_update_(clone(w), clone(ms), s, [], [], [], [], [1], [1])


@pytest.mark.error_path
def test_gather_errors(device):
    t = torch.randn(4, 3, device=device)
    before = t.clone()
    for keep, dim, needle in ((torch.tensor([2, 1]), 0, "strictly increasing"), (torch.tensor([0, 4]), 0, "keep\\[1\\]"),
                              (torch.tensor([0]), 2, "dim"), (torch.tensor([0.0]), 0, "int64")):
        with pytest.raises(RuntimeError, match=needle):
            ops.gather_channels_(t, keep, dim)
        assert torch.equal(t, before)


def test_gather_keep_may_be_a_view_of_the_tensor(device):
    # the moves overwrite the tensor's storage; keep is read from a copy
    t = torch.arange(12, dtype=torch.int64, device=device).view(3, 4)
    keep = t.view(-1)[2:4]  # values [2, 3]
    expect = t.clone()
    R.gather_channels_(expect, keep.clone(), 1)
    ops.gather_channels_(t, keep, 1)
    assert torch.equal(t.view(-1)[:6], expect.view(-1)[:6])


@pytest.mark.error_path
def test_aliased_written_arguments_are_refused(device):
    ws, ms, scores, *_ = make_case(4, 2, torch.float32, device, ties=False, live=False,
                                   shapes=[(5, 4), (5, 4)], density=0.5)
    before = [clone(ws), clone(ms)]
    cases = [
        (dict(states=[ws[1]], owner=[0]), r"states\[0\] shares memory with weights\[1\]|weights\[1\] shares memory with states\[0\]"),
        (dict(states=[scores[1]], owner=[0]), "shares memory"),
        (dict(masks=[ms[0], ms[0]]), "masks"),
        (dict(weights=[ws[0], ws[0].view(-1)[:20].view(5, 4)]), "shares memory"),
    ]
    for kw, needle in cases:
        w, m = kw.get("weights", ws), kw.get("masks", ms)
        args = (w, m, scores, [], [], kw.get("states", []), kw.get("owner", []), [2], [2])
        with pytest.raises(RuntimeError, match=needle):
            ops.mask_update_(*args)
        with pytest.raises(ValueError, match=needle):
            R.mask_update_(*args)
        assert _unchanged(before, ws, ms)
    t = torch.randn(5, 4, device=device)
    t0 = t.clone()
    with pytest.raises(RuntimeError, match=r"tensors\[1\] shares memory with tensors\[0\]"):
        ops.masked_apply_([t, t], [ms[0]], [0, 0])
    with pytest.raises(ValueError, match=r"tensors\[1\] shares memory with tensors\[0\]"):
        R.masked_apply_([t, t], [ms[0]], [0, 0])
    assert torch.equal(t, t0)
    # read-only arguments may share memory: the same scores twice, one mask for two tensors
    ops.mask_update_(clone(ws), clone(ms), [scores[0], scores[0]], [], [], [], [], [2], [2])
    ops.masked_apply_([t, t0], [ms[0]], [0, 0])


def test_a_meta_tensor_among_real_ones_is_refused(device):
    # Meta outranks CPU/CUDA in dispatch: the fake kernel would run instead of the real one
    ws, ms, scores, *_ = make_case(5, 1, torch.float32, device, ties=False, live=False, shapes=[(4, 3)], density=0.5)
    meta_rows = [torch.ones(4, dtype=torch.bool, device="meta")]
    w0 = clone(ws)
    with pytest.raises(RuntimeError, match=r"live_rows\[0\] is on meta"):
        ops.mask_update_(ws, ms, scores, meta_rows, [], [], [], [1], [1])
    assert torch.equal(ws[0], w0[0])
    with pytest.raises(RuntimeError, match=r"masks\[1\] is on meta"):
        ops.masked_apply_(ws, [ms[0], torch.ones(2, dtype=torch.bool, device="meta")], [0])
    with pytest.raises(RuntimeError, match=r"masks\[0\] is on meta"):
        ops.channel_stats(ws, [torch.ones(4, 3, dtype=torch.bool, device="meta")])
    with pytest.raises(RuntimeError, match=r"keep\[0\] is on meta|meta tensor"):
        ops.gather_channels_(ws[0], torch.tensor([0, 1], device="meta"), 0)
    assert torch.equal(ws[0], w0[0])


@pytest.mark.error_path
def test_autograd_sees_the_in_place_ops(device):
    w = torch.randn(4, 3, device=device, requires_grad=True)
    m = torch.rand(4, 3, device=device) < 0.5
    w0 = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] requires grad; the op is not differentiable"):
        ops.masked_apply_([w], [m], [0])
    with pytest.raises(RuntimeError, match=r"weights\[0\] requires grad"):
        ops.channel_stats([w], [m])
    assert torch.equal(w.detach(), w0)
    x = w * 2  # saved by the multiplication below, then overwritten in place
    y = (x * x).sum()
    with torch.no_grad():  # the optimizer's path
        v = x._version
        ops.masked_apply_([x], [m], [0])
        assert x._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    t = torch.randn(6, 4, device=device)
    with torch.no_grad():
        v = t._version
        ops.gather_channels_(t, torch.tensor([0, 2]), 0)
        assert t._version > v
    with torch.inference_mode():
        inf = torch.randn(4, 3, device=device)
        ops.masked_apply_([inf.clone()], [m], [0])  # inside inference mode: fine
    inf0 = inf.clone()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is an inference tensor"):
        ops.masked_apply_([inf], [m], [0])
    assert torch.equal(inf, inf0)


@pytest.mark.error_path
def test_select_threshold_k_out_of_range(device):
    ws, ms, *_ = make_case(9, 1, torch.float32, device, ties=False, live=False, shapes=[(4, 3)], density=0.5)
    with pytest.raises(RuntimeError, match="k=100"):
        ops.select_threshold(ws, ms, [], [], True, 100, False, True)
    with pytest.raises(ValueError, match="k=100"):
        R.select_threshold(ws, ms, [], [], True, 100, False, True)


def test_empty_lists():
    assert ops.select_threshold([], [], [], [], True, 0, True, True).tolist() == [2**32 - 1, 0]
    assert ops.mask_update_([], [], [], [], [], [], [], [0], [0])[0].numel() == 0
    assert ops.channel_stats([], [])[0].numel() == 0
    ops.masked_apply_([], [], [])


def test_build_info():
    info = ops.build_info()
    assert set(info) - {"cuda_skipped"} == {"version", "has_cuda", "cuda_version", "cuda_archs"}
    assert ("cuda_skipped" in info) == (not info["has_cuda"])
    import chase_ext
    assert info["version"] == chase_ext.__version__


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_mask_update_large_multi_chunk(device, ties, per_tensor):
    # big enough that the kernels split the work into many chunks / blocks, with tie
    # classes that straddle chunk boundaries
    shapes = [(300, 200), (64, 32, 3, 3), (10, 1000), (128, 64, 1, 1)]
    ws, ms, scores, lr, lc, g = make_case(11, 4, torch.float32, device, ties, live=True, shapes=shapes, density=0.2)
    lv = live_list(ws, lr, lc)
    if per_tensor:
        act = [int((m & l).sum()) for m, l in zip(ms, lv)]
        prune, grow = [a // 4 for a in act], [a // 4 + 3 for a in act]
    else:
        act = count([m & l for m, l in zip(ms, lv)])
        prune, grow = [act // 4], [act // 4 + 100]
    a = (clone(ws), clone(ms))
    ops.mask_update_(a[0], a[1], scores, lr, lc, [], [], prune, grow)
    b = ([w.cpu() for w in ws], [m.cpu() for m in ms])
    R.mask_update_(b[0], b[1], [s.cpu() for s in scores], [x.cpu() for x in lr], [x.cpu() for x in lc], [], [],
                   prune, grow)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x.cpu(), y)
    cand = count([m & l for m, l in zip(ms, lv)])
    for k in (0, 1, 7, cand // 3, cand):
        got = ops.select_threshold(ws, ms, lr, lc, True, k, True, True)
        want = R.select_threshold([w.cpu() for w in ws], [m.cpu() for m in ms], [x.cpu() for x in lr],
                                  [x.cpu() for x in lc], True, k, True, True)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("adversarial", [False, True])
def test_mask_update_sampled_bracket_and_fallback(device, adversarial):
    _sampled_case(device, adversarial)


def _sampled_case(device, adversarial):
    # > 65536 slots, so the kernels bracket the thresholds from a strided sample. With
    # `adversarial`, the sampled positions (every 4th slot) hold values unlike the rest,
    # so the bracket misses and the exact multi-pass path must take over.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 512, generator=g)
    s = torch.randn(512, 512, generator=g)
    if adversarial:
        flat_w, flat_s = w.view(-1), s.view(-1)
        flat_w[::4] = 100 + flat_w[::4].abs()
        flat_s[::4] = 1e-3 * flat_s[::4]
    m = torch.rand(512, 512, generator=g) < 0.3
    w = w * m
    act = int(m.sum())
    prune, grow = [act // 3], [act // 3 + 11]
    a = ([w.clone().to(device)], [m.clone().to(device)])
    ops.mask_update_(a[0], a[1], [s.to(device)], [], [], [], [], prune, grow)
    b = ([w.clone()], [m.clone()])
    R.mask_update_(b[0], b[1], [s], [], [], [], [], prune, grow)
    assert torch.equal(a[1][0].cpu(), b[1][0]) and torch.equal(a[0][0].cpu(), b[0][0])


def _cpu_isas():
    """Instruction sets the CPU mask update can be forced to on this machine."""
    out = []
    for isa in ("baseline", "avx2", "avx512"):
        with mock.patch.dict(os.environ, {"CHASE_EXT_CPU_ISA": isa}):
            try:
                ops.mask_update_([torch.ones(1)], [torch.ones(1, dtype=torch.bool)], [torch.ones(1)], [], [], [], [],
                                 [0], [0])
                out.append(isa)
            except RuntimeError as e:
                assert "cannot run" in str(e)
    return out


def skip_unless_cpu_runs(isa: str) -> None:
    """Skips the calling test when this CPU cannot run instruction set `isa` (found by the
    op's error: callers are marked error_path)."""
    if isa not in _cpu_isas():
        pytest.skip(f"this CPU cannot run {isa}")


@pytest.mark.error_path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_mask_update_every_cpu_isa_matches_reference(monkeypatch, dtype, ties):
    # the loops are compiled per instruction set and chosen at run time: each one the CPU
    # runs must give the reference's result, on bracketed (> 65536 slots) and small cases,
    # with float16 subnormals, signed zeros and vector-tail lengths
    isas = _cpu_isas()
    assert "baseline" in isas
    assert ops.cpu_isa() == isas[-1]  # the widest one by default
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 250), (37, 5, 3, 3), (13, 7), (1, 1), (0, 4)]
    base = []
    for s in shapes:
        w = torch.randn(s, generator=g)
        if ties:
            w = torch.round(w * 4) / 4
        if dtype == torch.float16:
            w[..., :1] *= 1e-6  # subnormal halves
        m = torch.rand(s, generator=g) < 0.3
        base.append(((w * m).to(dtype), m, torch.randn(s, generator=g).to(dtype)))
    ws, ms, ss = map(list, zip(*base))
    act = count(ms)
    prune, grow = [act // 5], [act // 5 + 17]
    states = [torch.randn(w.shape, generator=g) for w in ws]
    owner = list(range(len(ws)))
    want = (clone(ws), clone(ms), clone(states))
    rc, rs = R.mask_update_(*want[:2], ss, [], [], want[2], owner, prune, grow)
    for isa in isas:
        monkeypatch.setenv("CHASE_EXT_CPU_ISA", isa)
        got = (clone(ws), clone(ms), clone(states))
        cnt, sums = ops.mask_update_(*got[:2], ss, [], [], got[2], owner, prune, grow)
        for x, y in zip(got[0] + got[1] + got[2], want[0] + want[1] + want[2]):
            assert torch.equal(x, y), isa
        assert torch.equal(cnt, rc), isa
        torch.testing.assert_close(sums, rs, rtol=1e-5, atol=1e-5)
        # per-tensor scope goes through the same loops
        got = (clone(ws), clone(ms))
        ops.mask_update_(*got, ss, [], [], [], [], [int(m.sum()) // 2 for m in ms], [int(m.sum()) // 2 for m in ms])
        ref = (clone(ws), clone(ms))
        R.mask_update_(*ref, ss, [], [], [], [], [int(m.sum()) // 2 for m in ms], [int(m.sum()) // 2 for m in ms])
        for x, y in zip(got[0] + got[1], ref[0] + ref[1]):
            assert torch.equal(x, y), isa
    # removed channels: per-slot liveness from live_cols (1 and 9 slots per column),
    # dead rows, and active slots left in dead channels, on the bracketed path too
    gl = torch.Generator().manual_seed(4)
    lr = [torch.rand(s[0], generator=gl) >= 0.3 for s in shapes]
    lc = [torch.rand(s[1], generator=gl) >= 0.3 for s in shapes]
    live_act = count([m & l for m, l in zip(ms, R._live_list(ws, lr, lc))])
    kp, kg = [live_act // 4], [live_act // 4 + 5]
    want = (clone(ws), clone(ms), clone(states))
    rc, rs = R.mask_update_(*want[:2], ss, lr, lc, want[2], owner, kp, kg)
    for isa in isas:
        monkeypatch.setenv("CHASE_EXT_CPU_ISA", isa)
        got = (clone(ws), clone(ms), clone(states))
        cnt, sums = ops.mask_update_(*got[:2], ss, lr, lc, got[2], owner, kp, kg)
        for x, y in zip(got[0] + got[1] + got[2], want[0] + want[1] + want[2]):
            assert torch.equal(x, y), isa
        assert torch.equal(cnt, rc), isa
        torch.testing.assert_close(sums, rs, rtol=1e-5, atol=1e-5)
    # non-finite input is caught by every instruction set, with nothing written
    for isa in isas:
        monkeypatch.setenv("CHASE_EXT_CPU_ISA", isa)
        bad = clone(ws)
        bad[0].view(-1)[12345] = float("inf")
        before = clone(bad)
        m2 = clone(ms)
        with pytest.raises(RuntimeError, match="weights has non-finite values"):
            ops.mask_update_(bad, m2, ss, [], [], [], [], prune, grow)
        assert all(torch.equal(x, y) for x, y in zip(bad + m2, before + ms))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                   torch.float8_e4m3fn])
def test_masked_apply_every_cpu_isa_matches_reference(monkeypatch, dtype):
    # the zeroing loop is compiled per instruction set and element width (1, 2, 4, 8 bytes);
    # several tensors share each mask, lengths cross the 4096-slot pieces and leave tails;
    # negative values and -0.0 must come out as +0.0 where the mask is clear
    g = torch.Generator().manual_seed(5)
    shapes = [(70001,), (300, 41), (3,), (0, 5)]
    ms = [torch.rand(s, generator=g) < 0.1 for s in shapes]
    ms[2] = torch.tensor([False, True, False])
    ts = []
    for m in ms:
        for _ in range(2):
            t = torch.randn(m.shape, generator=g)
            t.view(-1)[:1] = -0.0
            ts.append(t.to(dtype))
    ts.append(torch.randn(ms[1].shape, generator=g).double())  # another width on the same mask
    owner = [0, 0, 1, 1, 2, 2, 3, 3, 1]
    want = clone(ts)
    R.masked_apply_(want, ms, owner)
    for isa in _cpu_isas():
        monkeypatch.setenv("CHASE_EXT_CPU_ISA", isa)
        got = clone(ts)
        ops.masked_apply_(got, ms, owner)
        for x, y in zip(got, want):
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            assert torch.equal(x.view(bits), y.view(bits)), isa


@pytest.mark.error_path
def test_cpu_isa_override_errors(monkeypatch):
    monkeypatch.setenv("CHASE_EXT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="CHASE_EXT_CPU_ISA must be baseline, avx2 or avx512; got 'sse9'"):
        ops.mask_update_([torch.ones(1)], [torch.ones(1, dtype=torch.bool)], [torch.ones(1)], [], [], [], [], [0], [0])
