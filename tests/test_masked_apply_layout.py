"""masked_apply_ over flat storage: any dense layout (channels_last, other dim orders),
with each tensor laid out like its mask, equals the reference on contiguous copies; the
layout wrapper hands such tensors over without copies; bad layouts are refused, naming
the argument, with nothing written."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chase_ext import layout, reference as R

ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = [(5, 3, 2, 2), (4, 6, 1, 1), (3, 2, 3, 2, 2), (0, 3, 2, 2), (6, 5), (2, 0, 3), (7, 1, 9), (4099,), (1,)]
# every width masked_apply_ zeroes: 1 (float8), 2, 4 and 8 bytes
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn]


def dense_in_order(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """A copy of ``values`` in a dense layout whose dims run ``order`` outermost first."""
    inv = sorted(range(len(order)), key=order.__getitem__)
    return values.permute(order).clone(memory_format=torch.contiguous_format).permute(inv)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values and strides, starting ``offset`` elements into a larger buffer (a
    data pointer that is not 16-byte aligned takes the kernels' unaligned path)."""
    if offset == 0 or t.numel() == 0:
        return t
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)
    out = buf[offset:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES),
       states=st.integers(0, 2), data=st.data(), density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       offset=st.sampled_from([0, 0, 1, 3]))
def test_any_dense_layout_matches_reference(device, seed, shape, dtype, states, data, density, offset):
    order = data.draw(st.permutations(range(len(shape))), label="dim order")
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < density
    vals = [torch.randn(shape, generator=g).to(dtype) for _ in range(1 + states)]
    # the same random values twice (two masks): one owner per tensor and a shared mask
    masks = [dense_in_order(m, order).to(device), dense_in_order(~m, order).to(device)]
    owner = [0] * len(vals) + [1]
    ts = [at_offset(dense_in_order(v, order).to(device), offset) for v in vals] + \
         [dense_in_order(vals[0], order).to(device)]
    want = [t.cpu().contiguous() for t in ts]
    R.masked_apply_(want, [x.cpu().contiguous() for x in masks], owner)
    strides = [t.stride() for t in ts]
    ops.masked_apply_(ts, masks, owner)
    for t, w, s in zip(ts, want, strides):
        assert t.stride() == s  # in place, layout kept
        assert torch.equal(_bits(t), _bits(w))
    # and the reference takes the same layouts
    rs = [dense_in_order(v, order) for v in vals] + [dense_in_order(vals[0], order)]
    R.masked_apply_(rs, [x.cpu() for x in masks], owner)
    for r, w in zip(rs, want):
        assert torch.equal(_bits(r), _bits(w))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The values as bytes, row-major (equality of every bit, -0.0 and NaN included)."""
    return t.cpu().reshape(-1).clone().view(torch.uint8)  # reshape: empty tensors keep odd strides


def test_channels_last_model_tensors_go_to_the_op_as_they_are(device):
    """A channels_last weight, its mask and its momentum reach the op as the very tensors
    (no permuted views, no copies), and are masked in place."""
    w = torch.randn(8, 4, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    one = torch.randn(8, 4, 1, 1, device=device).contiguous(memory_format=torch.channels_last)
    mw = layout.like(torch.rand(8, 4, 3, 3) < 0.3, w).to(device)
    mo = (torch.rand(8, 4, 1, 1) < 0.3).to(device)  # contiguous strides; same flat layout as `one`
    mom = torch.randn_like(w)
    tensors, masks, owner = [w, mom, one], [mw, mo], [0, 0, 1]
    want = [(t * masks[o]).contiguous() for t, o in zip(tensors, owner)]
    seen = {}

    class Recorder:
        @staticmethod
        def masked_apply_(ts, ms, ow):
            seen["same"] = all(a is b for a, b in zip(ts + ms, tensors + masks))
            ops.masked_apply_(ts, ms, ow)

    layout.masked_apply_(Recorder, tensors, masks, owner)
    assert seen["same"]
    for t, x in zip(tensors, want):
        assert torch.equal(t.contiguous(), x)
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_layout_wrapper_copies_only_what_differs(device):
    """A tensor laid out unlike its mask (and a mask with gaps) still works through the
    wrapper: copies in the mask's layout, written back."""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(4, 3, 2, 2, generator=g) < 0.5
    w = torch.randn(4, 3, 2, 2, generator=g)
    want = w * m
    wt = dense_in_order(w, [3, 2, 1, 0]).to(device)
    gappy = torch.zeros(4, 3, 2, 4, dtype=torch.bool, device=device)[..., ::2]
    gappy.copy_(m)
    layout.masked_apply_(ops, [wt], [gappy], [0])
    assert torch.equal(wt.cpu(), want) and wt.stride() == dense_in_order(w, [3, 2, 1, 0]).stride()


@pytest.mark.error_path
def test_layouts_the_op_refuses(device):
    """A gappy mask, and a tensor laid out unlike its mask: errors naming the argument,
    raised before anything is written (both backends)."""
    m = (torch.rand(4, 3, 2, 2) < 0.5).to(device)
    w = torch.randn(4, 3, 2, 2, device=device)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    gappy = torch.ones(4, 3, 2, 4, dtype=torch.bool, device=device)[..., ::2]
    cases = [
        ([w.clone(), w_cl.clone()], [m], [0, 0], r"tensors\[1\] has strides .* but masks\[0\] has strides"),
        ([w.clone()], [gappy], [0], r"masks\[0\] must cover its memory densely"),
    ]
    for ts, ms, ow, needle in cases:
        before = [t.clone() for t in ts]
        with pytest.raises(RuntimeError, match=needle):
            ops.masked_apply_(ts, ms, ow)
        with pytest.raises(ValueError, match=needle):
            R.masked_apply_([t.cpu() for t in ts], [x.cpu() for x in ms], ow)
        assert all(torch.equal(a, b) for a, b in zip(ts, before))


def test_opcheck_channels_last(device):
    w = torch.randn(6, 4, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    m = layout.like((torch.rand(6, 4, 3, 3) < 0.5).to(device), w)
    s = torch.randn_like(w)
    torch.library.opcheck(torch.ops.chase_ext.masked_apply_.default, ([w, s], [m], [0, 0]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
