"""A damaged ChaseOptimizer checkpoint is refused with a ``ValueError`` naming the entry,
and the refused load changes nothing (SPEC §8; ``chase_ext/checkpoint.py``).

Every entry ``load_state_dict`` reads is corrupted in turn (wrong type, wrong element
type, wrong tensor dtype / shape / layout / device, missing): the error must be a
``ValueError`` that names the entry (not a bare ``TypeError`` / ``KeyError`` /
``AttributeError`` / ``IndexError``), the model, masks, counters, RNG state, channel
state and wrapped optimizer state must be unchanged bit for bit, and the intact
checkpoint must still load afterwards.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from chase_ext.optimizer import ChaseOptimizer
from models import MODELS, example_input

try:
    import chase_ext._ops  # noqa: F401

    BACKEND = "native"
except Exception:  # pragma: no cover - extension not built
    BACKEND = "reference"

NAME = "vgg_small"
KNOBS = dict(density=0.3, total_steps=40, update_interval=5, channel_sparsity=0.5, channel_end=0.5,
             slim_during_training=True)
SAVED_AT = 30  # steps run before the checkpoint is written (several channel events and their slims)


pytestmark = pytest.mark.usefixtures("one_thread")


def _make(seed=0):
    torch.manual_seed(seed)
    model = MODELS[NAME]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    chase = ChaseOptimizer(opt, model, backend=BACKEND, example_inputs=example_input(NAME), **KNOBS)
    return model, opt, chase


def _run(model, chase, steps, start=0):
    for i in range(start, start + steps):
        x = example_input(NAME, batch=8, seed=i)
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i))
        chase.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        chase.step()


@pytest.fixture(scope="module")
def saved():
    """(state dict of a slimmed run, its ChaseOptimizer); the state dict is never modified."""
    m, _, c = _make()
    _run(m, c, SAVED_AT)
    sd = c.state_dict()
    assert c.slim_count >= 2 and len(sd["chase"]["channels"]["slim_records"]) >= 2
    assert any(k is not None for r in sd["chase"]["channels"]["slim_records"] for k in r)
    return sd, c


def _corrupt(sd, path, value):
    """A copy of ``sd`` with the entry at ``path`` replaced (``value(old)`` when callable, deleted
    when ``value is KeyError``); the containers along the path are copied, ``sd`` is untouched."""
    out = dict(sd)
    node = out
    for key in path[:-1]:
        child = node[key]
        child = dict(child) if isinstance(child, dict) else list(child)
        node[key] = child
        node = child
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return out


def _snapshot(model, opt, chase):
    """Everything a load could change, copied."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, p.detach().clone()) for n, p in model.named_parameters()],
        "optimizer": copy.deepcopy(opt.state_dict()),
        "masks": {n: m.clone() for n, m in chase.masks.items()},
        "t": chase.t,
        "k": list(chase._k),
        "gen": chase._gen.get_state().clone(),
        "channels": copy.deepcopy(chase._ch.state_dict()),
        "slim_count": chase.slim_count,
        "torch_rng": torch.get_rng_state(),
    }


def _assert_same(a, b, where="state"):
    """``a`` and ``b`` equal bit for bit (tensors: dtype, shape, device and every bit)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        x, y = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        if x.dtype.is_floating_point and x.numel():
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _first(n):
    """Replace the first of a list with ``n``."""
    return lambda xs: [n] + list(xs[1:])


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


C, CH = ("chase",), ("chase", "channels")

# case: (path, corrupt value / function of the old value / KeyError to delete, needle of the message)
BAD = {
    # --- the corruptions from the audit
    "names int": (C + ("names",), 5, "'names'"),
    "orig_shapes flat": (C + ("orig_shapes",), [1, 2, 3], "'orig_shapes'"),
    "groups None": (C + ("groups",), None, "'groups'"),
    "settings None": (C + ("settings",), None, "'settings'"),
    "slim_records int": (CH + ("slim_records",), 5, "'slim_records'"),
    "channel counts int": (CH + ("channels",), 5, "'channels'"),
    # --- the rest of the chase entries
    "not a dict": ((), None, "'chase'"),
    "chase int": (C, 5, "'chase'"),
    "version missing": (C + ("version",), KeyError, "'version'"),
    "version text": (C + ("version",), "1", "version"),
    "version None": (C + ("version",), None, "version"),
    "version tensor": (C + ("version",), torch.tensor([1, 1]), "version"),
    "names missing": (C + ("names",), KeyError, "'names'"),
    "names None": (C + ("names",), None, "'names'"),
    "names text": (C + ("names",), "abc", "'names'"),
    "names dict": (C + ("names",), lambda ns: {n: 0 for n in ns}, "'names'"),
    "names of ints": (C + ("names",), lambda ns: list(range(len(ns))), "'names'"),
    "orig_shapes None": (C + ("orig_shapes",), None, "'orig_shapes'"),
    "orig_shapes text": (C + ("orig_shapes",), "abc", "'orig_shapes'"),
    "orig_shapes of text": (C + ("orig_shapes",), lambda ss: ["abc" for _ in ss], "'orig_shapes'"),
    "orig_shapes negative": (C + ("orig_shapes",), lambda ss: [[-1] + list(ss[0][1:])] + list(ss[1:]),
                             "'orig_shapes'"),
    "orig_shapes of floats": (C + ("orig_shapes",), lambda ss: [[float(d) for d in s] for s in ss],
                              "'orig_shapes'"),
    "config None": (C + ("config",), None, "'config'"),
    "config list": (C + ("config",), [1, 2], "'config'"),
    "config tensor value": (C + ("config", "density"), torch.tensor([0.3, 0.3]), "density"),
    "total_sparse None": (C + ("total_sparse",), None, "'total_sparse'"),
    "total_sparse text": (C + ("total_sparse",), "12", "'total_sparse'"),
    "budget tensor": (C + ("budget",), lambda b: torch.tensor([b, b]), "'budget'"),
    "groups int": (C + ("groups",), 5, "'groups'"),
    "groups of ints": (C + ("groups",), lambda gs: list(range(len(gs))), "'groups'"),
    "settings list": (C + ("settings",), [1, 2], "'settings'"),
    "settings round_to tensor": (C + ("settings", "round_to"), torch.tensor([8, 8]), "round_to"),
    "t None": (C + ("t",), None, "'t'"),
    "t float": (C + ("t",), 1.5, "'t'"),
    "t tensor": (C + ("t",), torch.tensor(3), "'t'"),
    "t bool": (C + ("t",), True, "'t'"),
    "k int": (C + ("k",), 5, "'k'"),
    "k of text": (C + ("k",), lambda k: [str(x) for x in k], "'k'"),
    "k None": (C + ("k",), None, "'k'"),
    "rng None": (C + ("rng",), None, "random-generator state"),
    "rng list": (C + ("rng",), lambda r: r.tolist(), "random-generator state"),
    "rng meta": (C + ("rng",), _meta, "random-generator state"),
    "rng float short": (C + ("rng",), lambda r: r[:10].float(), "random-generator state"),
    "masks None": (C + ("masks",), None, "'masks'"),
    "masks int": (C + ("masks",), 5, "'masks'"),
    "masks dict": (C + ("masks",), lambda ms: dict(enumerate(ms)), "'masks'"),
    "mask None": (C + ("masks",), _first(None), "mask of"),
    "mask list": (C + ("masks", 0), lambda m: m.tolist(), "mask of"),
    "mask uint8": (C + ("masks", 0), lambda m: m.to(torch.uint8), "mask of"),
    "mask meta": (C + ("masks", 0), _meta, "mask of"),
    "mask sparse": (C + ("masks", 0), lambda m: m.to_sparse(), "mask of"),
    "mask shape": (C + ("masks", 1), lambda m: m[:-1], "mask of"),
    # --- the channel state
    "channels None": (CH, None, "channel state"),
    "channels int": (CH, 5, "channel state"),
    "channels list": (CH, lambda d: list(d.values()), "channel state"),
    "channel state missing alive": (CH + ("alive",), KeyError, "'alive'"),
    "channel counts None": (CH + ("channels",), None, "'channels'"),
    "channel counts text": (CH + ("channels",), lambda cs: [str(c) for c in cs], "'channels'"),
    "channel counts tensor": (CH + ("channels",), lambda cs: torch.tensor(cs), "'channels'"),
    "events None": (CH + ("events",), None, "'events'"),
    "done None": (CH + ("done",), None, "'done'"),
    "done int": (CH + ("done",), 1, "'done'"),
    "alive None": (CH + ("alive",), None, "'alive'"),
    "alive tensor": (CH + ("alive",), lambda a: a[0], "'alive'"),
    "alive item None": (CH + ("alive",), _first(None), "alive channels"),
    "alive item int64": (CH + ("alive", 0), lambda a: a.long(), "alive channels"),
    "alive item meta": (CH + ("alive", 0), _meta, "alive channels"),
    "present None": (CH + ("present",), None, "'present'"),
    "present item list": (CH + ("present", 0), lambda p: p.tolist(), "present channels"),
    "present item float": (CH + ("present", 0), lambda p: p.float(), "present channels"),
    "present item 2-d": (CH + ("present", 0), lambda p: p[None], "present channels"),
    "present item meta": (CH + ("present", 0), _meta, "present channels"),
    "slim_records None": (CH + ("slim_records",), None, "'slim_records'"),
    "slim_records text": (CH + ("slim_records",), "abc", "'slim_records'"),
    "slim_records dict": (CH + ("slim_records",), lambda rs: dict(enumerate(rs)), "'slim_records'"),
    "slim record int": (CH + ("slim_records",), _first(5), "slim record 0"),
    "slim record short": (CH + ("slim_records", 0), lambda r: r[:-1], "slim record 0"),
    "slim record keep int": (CH + ("slim_records", -1), lambda r: [0 if k is not None else None for k in r],
                             "slim record"),
    "slim record keep text": (CH + ("slim_records", -1), lambda r: ["abc" if k is not None else None for k in r],
                              "slim record"),
    "slim record keep floats": (CH + ("slim_records", -1),
                                lambda r: [None if k is None else [float(i) for i in k] for k in r], "slim record"),
    "slim record keep of None": (CH + ("slim_records", -1),
                                 lambda r: [None if k is None else [None] * len(k) for k in r], "slim record"),
    "slim record keep nested": (CH + ("slim_records", -1),
                                lambda r: [None if k is None else [k] for k in r], "slim record"),
    # --- the wrapped optimizer's part
    "state None": (("state",), None, "'state'"),
    "param_groups None": (("param_groups",), None, "param_groups"),
    "param_groups of ints": (("param_groups",), lambda gs: [5 for _ in gs], "param_groups"),
    "param_groups params int": (("param_groups", 0), lambda g: dict(g, params=5), "param_groups"),
    "param_groups params None": (("param_groups", 0), lambda g: dict(g, params=None), "param_groups"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_damaged_checkpoint_is_refused_naming_the_entry_with_nothing_changed(case, saved):
    sd, c1 = saved
    path, value, needle = BAD[case]
    bad = value if path == () else _corrupt(sd, path, value)
    m2, o2, c2 = _make()
    _run(m2, c2, 3)
    before = _snapshot(m2, o2, c2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=re.escape(needle)) as info:
            c2.load_state_dict(bad)
    assert "checkpoint" in str(info.value) or "state dict" in str(info.value)
    assert not [w for w in seen if "changed settings" in str(w.message)]  # refused before any warning
    _assert_same(_snapshot(m2, o2, c2), before)
    # the intact checkpoint still loads afterwards, and trains on
    c2.load_state_dict(sd)
    assert c2.t == SAVED_AT and c2.slim_count == c1.slim_count
    assert all(torch.equal(c2.masks[n], c1.masks[n]) for n in c1.masks)
    assert c2.channel_report() == c1.channel_report()
    _run(m2, c2, 1, start=SAVED_AT)


def test_damaged_checkpoint_with_changed_settings_warns_only_when_it_loads(saved):
    sd, _ = saved
    changed = _corrupt(sd, C + ("settings", "update_interval"), 10)
    m2, o2, c2 = _make()
    before = _snapshot(m2, o2, c2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="'t'"):
            c2.load_state_dict(_corrupt(changed, C + ("t",), None))
    assert not [w for w in seen if "changed settings" in str(w.message)]
    _assert_same(_snapshot(m2, o2, c2), before)
    with pytest.warns(UserWarning, match="update_interval 10 -> 5"):
        c2.load_state_dict(changed)
    assert c2.t == SAVED_AT


def test_slim_records_as_tuples_load_as_lists(saved):
    # a checkpoint whose records came back as tuples (another serializer) still loads,
    # and the records kept are plain lists, as the ones this model writes
    sd, c1 = saved
    tup = _corrupt(sd, CH + ("slim_records",),
                   lambda rs: [tuple(None if k is None else tuple(k) for k in r) for r in rs])
    m2, _, c2 = _make()
    c2.load_state_dict(tup)
    assert c2._ch.slim_records == c1._ch.slim_records
    assert all(type(k) is list for r in c2._ch.slim_records for k in r if k is not None)
    c2.load_state_dict(sd)  # an equal history: nothing to replay, loads
    assert c2.slim_count == c1.slim_count
