"""channel_stats on tensors laid out otherwise than row-major (channels_last and any other
order of the dims after the first): counts and sums equal the op's on contiguous copies
bit for bit (rows are summed in row-major order whatever the memory order) and the
reference's; layouts it cannot take are refused, naming the argument."""
import os
import re
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from chase_ext import layout as L
from chase_ext import reference as R
from test_mask_update_layouts import DTYPES, FAST, SHAPES, laid_out, odd_unit_strides, rows_dense_order, storage
from test_ops import skip_unless_cpu_runs

ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")


def case(seed, shapes, dtype, density=0.4):
    g = torch.Generator().manual_seed(seed)
    ms = [torch.rand(s, generator=g) < density for s in shapes]
    # values over many binades (finite in every dtype), so that the order of the sum
    # reaches the float result
    span = 6 if dtype == torch.float16 else 20
    ws = [(torch.randn(s, generator=g) * torch.exp2(torch.randint(-span, span, s, generator=g).float())).to(dtype)
          for s in shapes]
    return ws, ms, [rows_dense_order(s, g) for s in shapes]


def check(ws, ms, orders, device):
    """The op on the tensors in `orders` (masks of odd-numbered tensors with other strides
    on size-1 dims) equals the op on contiguous copies bit for bit, and the reference."""
    a_w = [laid_out(w, o).to(device) for w, o in zip(ws, orders)]
    a_m = [laid_out(m, o).to(device) for m, o in zip(ms, orders)]
    a_m = [odd_unit_strides(m) if i % 2 else m for i, m in enumerate(a_m)]
    before = [(w.clone(), m.clone()) for w, m in zip(a_w, a_m)]
    got = ops.channel_stats(a_w, a_m)
    want = ops.channel_stats([w.contiguous().to(device) for w in ws], [m.to(device) for m in ms])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(w, w0) and torch.equal(m, m0) for (w, m), (w0, m0) in zip(zip(a_w, a_m), before))
    ref = R.channel_stats([w.cpu() for w in a_w], [m.cpu() for m in a_m])
    ref_contiguous = R.channel_stats(ws, ms)
    assert torch.equal(ref[0], ref_contiguous[0]) and torch.equal(ref[1], ref_contiguous[1])
    assert torch.equal(got[0].cpu(), ref[0])
    torch.testing.assert_close(got[1].cpu(), ref[1], rtol=1e-5, atol=0)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       density=st.sampled_from([0.0, 0.4, 1.0]))
def test_any_rows_dense_layout_matches_contiguous(device, seed, n, dtype, density):
    g = torch.Generator().manual_seed(seed)
    shapes = [SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))] for _ in range(n)]
    check(*case(seed, shapes, dtype, density), device)


@pytest.mark.parametrize("order", [[0, 2, 3, 1], [0, 3, 2, 1]], ids=["channels_last", "w-h-c"])
def test_long_rows(device, order):
    # rows of 4,608 and 1,152 slots (ResNet-50's widest 3x3 convs), 1x1 convs, 5x5
    shapes = [(6, 512, 3, 3), (64, 128, 3, 3), (96, 48, 1, 1), (40, 7, 5, 5)]
    ws, ms, _ = case(3, shapes, torch.float32)
    check(ws, ms, [order] * len(shapes), device)


@pytest.mark.error_path  # the ISAs this CPU cannot run are found by the op's error
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_isa_channels_last(isa, dtype):
    shapes = [(16, 8, 3, 3), (8, 64, 3, 3), (12, 5, 7, 7)]
    skip_unless_cpu_runs(isa)
    with mock.patch.dict(os.environ, {"CHASE_EXT_CPU_ISA": isa}):
        ws, ms, _ = case(5, shapes, dtype)
        check(ws, ms, [[0, 2, 3, 1]] * 3, "cpu")


@pytest.mark.error_path  # the ISAs this CPU cannot run are found by the op's error
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_sum_order_is_row_major_not_memory(isa):
    # Rows holding 2^53, 2^29, 1 and 1 at random places: their float32 sum depends on the
    # order of the double additions (2^53 + 2^29 + 1 + 1 rounds to the float32 tie 2^53,
    # 1 + 1 + 2^53 + 2^29 above it). Summed in memory order, many rows of a channels_last
    # tensor come out otherwise than the contiguous tensor's; the op gives the latter.
    shape = (256, 128, 3, 3)
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(shape[0], 128 * 9)
    for r in range(shape[0]):
        w[r, torch.randperm(w.shape[1], generator=g)[:4]] = torch.tensor([2.0**53, 2.0**29, 1.0, 1.0])
    w = w.view(shape)
    m = torch.ones(shape, dtype=torch.bool)
    wl, ml = _cl(w), _cl(m)
    in_memory_order = (storage(wl).view(shape), storage(ml).view(shape))  # contiguous tensors
    skip_unless_cpu_runs(isa)
    with mock.patch.dict(os.environ, {"CHASE_EXT_CPU_ISA": isa}):
        want = ops.channel_stats([w], [m])[1]
        other = ops.channel_stats([in_memory_order[0]], [in_memory_order[1]])[1]
        got = ops.channel_stats([wl], [ml])[1]
    assert (other != want).sum() > 10  # the order shows in these rows
    assert torch.equal(got, want)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


BAD = [
    # (id, weights, masks, the argument the message names)
    ("weight-dim0-inner", [torch.randn(3, 4).t()], [torch.ones(3, 4, dtype=torch.bool).t()], "weights[0]"),
    ("weight-gappy", [torch.randn(4, 6)[:, ::2]], [torch.ones(4, 3, dtype=torch.bool)], "weights[0]"),
    ("mask-contiguous", [_cl(torch.randn(4, 3, 2, 2))], [torch.ones(4, 3, 2, 2, dtype=torch.bool)], "masks[0]"),
    ("mask-channels-last", [torch.randn(4, 3, 2, 2)], [_cl(torch.ones(4, 3, 2, 2, dtype=torch.bool))], "masks[0]"),
    # both implementations check dtypes tensor by tensor before layouts
    ("dim0-inner-then-half", [torch.randn(3, 4).t(), torch.randn(4, 3).half()],
     [torch.ones(4, 3, dtype=torch.bool)] * 2, "weights[1]"),
]


@pytest.mark.error_path
@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("bad", BAD, ids=[c[0] for c in BAD])
def test_layouts_the_op_cannot_take_are_refused(device, backend, bad):
    if backend == "reference" and device != "cpu":
        pytest.skip("the reference rows run once, on the CPU")
    impl = R if backend == "reference" else ops
    ws, ms = [w.to(device) for w in bad[1]], [m.to(device) for m in bad[2]]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=re.escape(bad[3])) as e:
        impl.channel_stats(ws, ms)
    assert "channel_stats" in str(e.value)
    if bad[3].startswith("masks"):
        assert "each mask must be laid out in memory like its weight" in str(e.value)


def test_empty_tensors_take_any_strides(device):
    # torch calls every empty tensor contiguous: an empty channels_last weight and a
    # default mask are one layout
    w = _cl(torch.empty(0, 3, 2, 2)).to(device)
    m = torch.zeros(w.shape, dtype=torch.bool, device=device)
    calls = [lambda: ops.channel_stats([w], [m]), lambda: L.channel_stats(ops, [w], [m])]
    if device == "cpu":
        calls.append(lambda: R.channel_stats([w], [m]))
    for call in calls:
        counts, sums = call()
        assert counts.numel() == 0 and sums.numel() == 0


def test_layout_wrapper_calls_the_op_in_place():
    # ChaseOptimizer's path at channel events: channels_last weights and masks go to the
    # op as they are (no copies); a transposed Linear weight goes through copies
    ws, ms, _ = case(4, [(8, 4, 3, 3), (6, 5)], torch.float32)
    a_w, a_m = [_cl(ws[0]), ws[1]], [_cl(ms[0]), ms[1]]
    calls = []

    class Spy:
        @staticmethod
        def channel_stats(w, m):
            calls.append([t.data_ptr() for t in w + m])
            return ops.channel_stats(w, m)

    got = L.channel_stats(Spy, a_w, a_m)
    assert calls == [[t.data_ptr() for t in a_w + a_m]]
    want = ops.channel_stats(ws, ms)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    t_w, t_m = [ws[0], ws[1].t().contiguous().t()], [ms[0], ms[1].t().contiguous().t()]
    got = L.channel_stats(Spy, t_w, t_m)
    assert calls[1][1] != t_w[1].data_ptr()  # staged
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_opcheck_channels_last():
    ws, ms, _ = case(6, [(8, 4, 3, 3), (4, 8, 1, 1)], torch.float32)
    torch.library.opcheck(torch.ops.chase_ext.channel_stats.default,
                          ([_cl(w) for w in ws], [_cl(m) for m in ms]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
