"""A checkpoint written by an earlier version still resumes (SPEC §8 checkpoints).

``tests/fixtures/chase_mlp_slimmed.pt`` was written by commit b8fe6d3 (before
``optimizer.py`` was split into modules) with ``python tests/test_old_checkpoint.py``:
an MLP under Adam, 18 steps of the run below, two channel events and the slims that
followed them, saved as ``{"chase": chase.state_dict(), "model": model.state_dict()}``.

The test loads it into a freshly built full-width model (the load replays the slims) and
compares with a fresh replay of the same 18 steps: counters, masks, channel records and
the RNG state must be equal exactly; weights and optimizer moments too, up to float
rounding (CPU float kernels differ by CPU model; on the machine that wrote the fixture
they are equal bit for bit). Both then run on past another update step and channel
event and must take the same decisions.

Two entries are compared for shape only: the bias of the linear layer that feeds the
batch norm, and that norm's running mean. The norm takes the mean out in training, so
that bias's gradient is zero up to rounding, and Adam divides it by its own root mean
square: each step moves the bias by about lr in the direction of the rounding noise.
Under torch 2.11 the noise has other signs than under 2.13 (same CPU), and after 18
steps the bias differs by 7e-3 while every other weight agrees within 3e-8.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from torch import nn

from chase_ext.optimizer import ChaseOptimizer
from models import example_input, mlp

try:
    import chase_ext._ops  # noqa: F401

    BACKEND = "native"
except Exception:  # pragma: no cover - extension not built
    BACKEND = "reference"

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "chase_mlp_slimmed.pt"
SAVED_AT = 18  # steps run before the fixture was written
KNOBS = dict(density=0.3, total_steps=40, update_interval=4, channel_sparsity=0.5, channel_interval=6,
             channel_end=0.6, slim_during_training=True, seed=3)


def build(seed: int):
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    chase = ChaseOptimizer(opt, model, backend=BACKEND, example_inputs=example_input("mlp"), **KNOBS)
    return model, opt, chase


def batch(i: int, bs: int = 16):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(bs, 20, generator=g)
    return x, (x[:, :5] * 3 + x[:, 5:10]).argmax(1)


def run(model, chase, start: int, stop: int) -> None:
    for i in range(start, stop):
        x, y = batch(i)
        chase.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        chase.step()


# set by the rounding noise of a gradient that is zero in exact arithmetic (docstring)
NOISE_ONLY = {"0.bias", "1.running_mean"}


def _close(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


def _compare(model_a, chase_a, model_b, chase_b):
    assert chase_a.t == chase_b.t
    assert chase_a._k == chase_b._k
    for n in chase_a.masks:
        assert torch.equal(chase_a.masks[n], chase_b.masks[n]), n
    assert chase_a.channel_report() == chase_b.channel_report()
    assert torch.equal(chase_a._gen.get_state(), chase_b._gen.get_state())
    sa, sb = chase_a._ch.state_dict(), chase_b._ch.state_dict()
    assert sa["slim_records"] == sb["slim_records"] and sa["events"] == sb["events"]
    for key in ("alive", "present"):
        assert all(torch.equal(x, y) for x, y in zip(sa[key], sb[key])), key
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        if n in NOISE_ONLY:
            assert a.shape == b.shape, n
        else:
            _close(a, b, n)
    oa, ob = chase_a.optimizer.state_dict()["state"], chase_b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        for kk in oa[k]:
            _close(torch.as_tensor(oa[k][kk]), torch.as_tensor(ob[k][kk]), f"state {k} {kk}")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_old_checkpoint_resumes_like_a_fresh_replay():
    ck = torch.load(FIXTURE)  # the default weights_only loader must accept it
    model, _, chase = build(seed=99)  # full width, other initial weights
    full = [tuple(p.shape) for p in chase._params]
    chase.load_state_dict(ck["chase"])
    model.load_state_dict(ck["model"])
    assert [tuple(p.shape) for p in chase._params] != full, "the fixture should hold a slimmed model"

    # what was loaded is what was saved, exactly
    again = chase.state_dict()["chase"]
    old = ck["chase"]["chase"]
    for key in ("t", "k", "names", "orig_shapes", "total_sparse", "budget", "config", "groups"):
        assert again[key] == old[key], key
    # settings recorded since then are the values the old run had
    from chase_ext.checkpoint import _SETTINGS_ADDED_LATER

    assert again["settings"] == {**old["settings"], **_SETTINGS_ADDED_LATER}
    assert all(torch.equal(a, b) for a, b in zip(again["masks"], old["masks"]))
    assert torch.equal(again["rng"], old["rng"])
    for (n, a), b in zip(model.state_dict().items(), ck["model"].values()):
        assert torch.equal(a, b), n

    ref_model, _, ref = build(seed=0)
    run(ref_model, ref, 0, SAVED_AT)
    assert ref._ch.slim_records, "the replay should have slimmed"
    _compare(ref_model, ref, model, chase)

    run(ref_model, ref, SAVED_AT, 30)
    run(model, chase, SAVED_AT, 30)
    _compare(ref_model, ref, model, chase)


if __name__ == "__main__":  # (re)write the fixture with the code in this tree
    torch.set_num_threads(1)
    m, _, c = build(seed=0)
    run(m, c, 0, SAVED_AT)
    FIXTURE.parent.mkdir(exist_ok=True)
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE
    torch.save({"chase": c.state_dict(), "model": m.state_dict()}, out)
    print(f"wrote {out}: t={c.t}, slim records {len(c._ch.slim_records)}, events {c._ch.events}")
