"""ChaseOptimizer end to end: budgets, schedules, channel events, optimizers, mixed
precision, checkpoints, errors, native == reference (SPEC §1-§5, §8)."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from chase_ext.channels import channel_floor, select_channels, target_live
from chase_ext.density import erk_counts, largest_remainder, uniform_counts
from chase_ext.optimizer import ChaseOptimizer
from chase_ext.schedules import cubic, is_channel_event, is_update_step, soft_bound
from chase_ext.sparsity import global_counts
from models import MODELS, example_input, mlp

try:
    import chase_ext._ops  # noqa: F401

    HAVE_NATIVE = True
except Exception:  # pragma: no cover - extension not built
    HAVE_NATIVE = False

BACKEND = "native" if HAVE_NATIVE else "reference"


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers
def mlp_task(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 20, generator=g)
    W = torch.randn(20, 5, generator=g)
    y = (X @ W).argmax(1)
    return X, y


def batch(name, i, bs=8):
    if name == "mlp":
        X, y = mlp_task()
        idx = torch.arange(i * bs, (i + 1) * bs) % X.shape[0]
        return X[idx], y[idx]
    x = example_input(name, batch=bs, seed=i)
    return x, torch.randint(0, 10, (bs,), generator=torch.Generator().manual_seed(i))


def make(name="mlp", opt="sgd", backend=BACKEND, seed=0, **kw):
    torch.manual_seed(seed)
    model = MODELS[name]()
    if opt == "sgd":
        o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    elif opt == "adam":
        o = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        o = opt(model.parameters())
    kw.setdefault("density", 0.3)
    kw.setdefault("total_steps", 120)
    kw.setdefault("update_interval", 10)
    if kw.get("channel_sparsity", 0) > 0:
        kw.setdefault("example_inputs", example_input(name))
    chase = ChaseOptimizer(o, model, backend=backend, **kw)
    return model, o, chase


def train_step(name, model, chase, i, scaler=None, autocast=None, dtype=None):
    x, y = batch(name, i)
    if dtype is not None:
        x = x.to(dtype)
    if autocast is not None:
        with torch.autocast("cpu", dtype=autocast):
            out = model(x)
    else:
        out = model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    chase.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(chase)
        scaler.update()
    else:
        loss.backward()
        chase.step()
    return float(loss.detach())


def states_like(chase):
    for n, p in zip(chase._names, chase._params):
        for k, v in chase.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                yield n, k, v


def check_masked(chase):
    for n, p in zip(chase._names, chase._params):
        m = chase.masks[n]
        assert m.dtype == torch.bool and m.shape == p.shape
        assert bool((p.detach()[~m] == 0).all()), f"masked weight of {n} not 0"
    for n, k, v in states_like(chase):
        assert bool((v[~chase.masks[n]] == 0).all()), f"state {k} of {n} not 0 at masked slots"


def expected_target(chase, t):
    cfg = chase.config
    L = sum(chase._live_numels())
    if t < cfg.t_explore_end_steps:
        d = soft_bound(t, cfg.t_explore_end_steps, cfg.soft_bound, cfg.soft_bound_end)
        return min(chase.budget + round(d * chase.total_sparse), L)
    return min(chase.budget, L)


def reader_width(m: nn.Module) -> int:
    """The input width of a layer, checked against its tensors."""
    if isinstance(m, nn.Linear):
        assert m.weight.shape[1] == m.in_features
        return m.in_features
    if isinstance(m, nn.modules.batchnorm._NormBase):
        assert m.weight is None or m.weight.shape[0] == m.num_features
        return m.num_features
    assert m.weight.shape[1] * m.groups == m.in_channels
    return m.in_channels


class Watcher:
    """Checks the invariants after every step."""

    def __init__(self, chase):
        self.chase = chase
        self.removed: set[tuple[int, int]] = set()
        self.events = []
        mods = dict(chase.model.named_modules())
        self.widths0 = {m: reader_width(mods[m]) + sum((chase._ch.channels[g] - len(chase._ch.present[g])) * r
                                                      for g, r, _ in segs)
                        for m, segs in getattr(chase, "_reader_segs", {}).items()}

    def after(self):
        ch = self.chase
        cfg = ch.config
        t = ch.t
        check_masked(ch)
        if ch.config.scope == "global" and is_update_step(t, cfg.update_steps, cfg.t_end_steps):
            assert ch.active_count() == expected_target(ch, t)
        if ch._ch is not None:
            rep = ch.channel_report()
            now = {(g, c) for g, a in enumerate(ch._ch.alive) for c in torch.nonzero(~a).flatten().tolist()}
            assert self.removed <= now, "a removed channel came back"
            self.removed = now
            for r, f in zip(rep, ch._floors):
                assert r["live"] >= f
            if is_channel_event(t, cfg.channel_interval_steps, cfg.update_steps) and (
                not self.events or self.events[-1][0] < cfg.last_channel_event
            ):
                live = sum(r["live"] for r in rep)
                self.events.append((t, live))
                tgt = target_live(t, cfg.channel_end_steps, cfg.channel_sparsity, ch._ch.total)
                at_floor = any(r["live"] == f for r, f in zip(rep, ch._floors))
                # round_to and grouped convs' blocks remove fewer rather than more
                if cfg.round_to is None and not at_floor and all(g.blocks == 1 for g in ch.groups):
                    assert live == tgt, (t, live, tgt)
                else:
                    assert live >= tgt
            # removed channels: producer rows and consumer columns are zero / inactive
            for i, n in enumerate(ch._names):
                r, c = ch._live_rows[i], ch._live_cols[i]
                w, m = ch._params[i].detach(), ch.masks[n]
                if r is not None:
                    assert not bool(m[~r].any()) and bool((w[~r] == 0).all())
                if c is not None:
                    assert not bool(m[:, ~c].any()) and bool((w[:, ~c] == 0).all())
            for b, bm in ch._bias_masks:
                assert bool((b.detach()[~bm] == 0).all())
            for g, grp in enumerate(ch.groups):
                if grp.blocks > 1:  # every conv group as wide; what a grouped conv reads is slimmed at once
                    alive = ch._ch.alive[g].view(grp.blocks, -1).sum(1)
                    assert bool((alive == alive[0]).all()), (grp.name, alive.tolist())
                    if any(c.groups > 1 for c in grp.consumers):
                        assert bool(ch._ch.physical_live(g).all()), grp.name
                if grp.offsets:  # read inside a concatenation: slimmed at once, the readers as wide as the spans
                    assert bool(ch._ch.physical_live(g).all()), grp.name
            mods = dict(ch.model.named_modules())
            for m, segs in ch._reader_segs.items():  # a concatenation's reader lost what its groups lost there
                lost = sum((ch._ch.channels[g] - len(ch._ch.present[g])) * r for g, r, _ in segs)
                assert reader_width(mods[m]) == self.widths0[m] - lost, m


def run(name, model, chase, steps, start=0, watch=True, **kw):
    w = Watcher(chase) if watch else None
    losses = []
    for i in range(start, start + steps):
        losses.append(train_step(name, model, chase, i, **kw))
        if w:
            w.after()
    return losses, w


# --------------------------------------------------------------------------- budgets
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 9), min_size=2, max_size=4), min_size=1, max_size=6),
    st.floats(0.01, 1.0),
)
def test_erk_and_uniform_counts_sum_exactly(shapes, d):
    N = sum(math.prod(s) for s in shapes)
    B = round(d * N)
    for ks in (erk_counts(shapes, B), uniform_counts(shapes, B)):
        assert sum(ks) == B
        assert all(0 <= k <= math.prod(s) for k, s in zip(ks, shapes))


def test_erk_dense_layers_and_ties():
    # a tiny layer gets ε·raw >= 1 and becomes dense; the rest is re-solved
    shapes = [(4, 3), (64, 64), (10, 64)]
    ks = erk_counts(shapes, 1000)
    assert ks[0] == 12 and sum(ks) == 1000
    # equal remainders: the lower index gets the extra one
    assert largest_remainder([1.5, 1.5, 1.0], [5, 5, 5], 4) == [2, 1, 1]
    assert uniform_counts([(2, 2), (4, 4)], 10, dense_first=True) == [4, 6]
    with pytest.raises(ValueError, match="dense_first_layer"):
        uniform_counts([(4, 4), (2, 2)], 5, dense_first=True)


def test_equal_shares_tie_to_the_lower_index():
    # ERK: layers 0 and 3 both have Σ dims = 12, so their shares are equal (10.5 each);
    # in floats one came out as 10.499999999999998 and the extra unit went to layer 3
    shapes = [(3, 9), (3, 6, 10, 7), (6, 9), (11, 1), (10, 5)]
    ks = erk_counts(shapes, 70)
    assert (ks[0], ks[3]) == (11, 10) and sum(ks) == 70
    # uniform: the share is d·n_l (SPEC: "every layer gets d"), not B/N·n_l
    assert uniform_counts([(6,), (39,), (52,)], round(0.387 * 97), density=0.387) == [3, 15, 20]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=2, max_size=3), st.integers(1, 5), st.floats(0.01, 0.9))
def test_erk_equal_sum_of_dims_layers_tie_to_the_lower_index(shape, copies, d):
    # layers with the same Σ dims that stay sparse get equal shares: counts may differ by
    # one unit at most, and the lower index never gets fewer
    shapes = [tuple(shape)] * copies + [(16, 16)] + [tuple(reversed(shape))] * copies
    N = sum(math.prod(s) for s in shapes)
    ks = erk_counts(shapes, round(d * N))
    same = [k for s, k in zip(shapes, ks) if s != (16, 16) and k < math.prod(s)]
    assert all(a >= b and a - b <= 1 for a, b in zip(same, same[1:]))


def test_embedding_tied_to_a_linear_head_is_never_masked():
    # SPEC §1: embeddings are never masked, also when a Linear head shares the weight
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.hidden = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.hidden(self.emb(x))))

    model = TiedLM()
    chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, density=0.5,
                           total_steps=4, update_interval=2, backend=BACKEND)
    assert chase._names == ["hidden.weight"]
    for _ in range(4):
        chase.zero_grad()
        model(torch.randint(0, 50, (8, 3))).sum().backward()
        chase.step()
    assert bool((model.emb.weight != 0).all())


def test_init_exact_and_reproducible():
    m1, _, c1 = make("vgg_small", total_steps=100)
    m2, _, c2 = make("vgg_small", total_steps=100)
    assert c1.active_count() == c1.budget == round(0.3 * c1.total_sparse)
    for n in c1.masks:
        assert torch.equal(c1.masks[n], c2.masks[n])
    # uniform + dense first layer
    _, _, c3 = make("vgg_small", init="uniform", dense_first_layer=True)
    first = c3._names[0]
    assert bool(c3.masks[first].all()) and c3.active_count() == c3.budget
    # biases, norms are never sparse; exclude keeps a weight dense and unmasked
    _, _, c4 = make("vgg_small", exclude=("classifier.3",))
    assert "classifier.3.weight" not in c4.masks and all(n.endswith("weight") for n in c4.masks)


def test_global_counts_phases():
    kw = dict(t_explore_end=80, t_end=100, soft_bound0=0.05, soft_bound_end=0.0, swap0=0.5, swap_end=0.005)
    # phase A: prune down to B, grow up to B + round(δN)
    p, g, tgt = global_counts(10, 120, 100, 1000, 1000, **kw)
    assert p == 20 and tgt == 100 + round(soft_bound(10, 80, 0.05, 0.0) * 1000) and tgt == 120 - p + g
    # phase B: prune excess + round(r·B), grow to exactly B
    p, g, tgt = global_counts(90, 110, 100, 1000, 1000, **kw)
    r = 0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * 90 / 100)) / 2
    assert p == 10 + round(r * 100) and tgt == 100
    # the live slots cannot hold the budget: every live slot active
    assert global_counts(90, 50, 100, 1000, 60, **kw)[2] == 60


# --------------------------------------------------------------------------- channel selection
def test_select_channels_floors_ties_round_to():
    sc = [[(0.1, 0), (0.5, 1), (0.1, 2), (0.9, 3)], [(0.1, 0), (0.2, 1)]]
    # ties: (layer, index) order -> layer 0 ch 0, layer 0 ch 2, layer 1 ch 0
    assert select_channels(sc, [4, 2], [1, 1], [4, 2], 3) == [[0, 2], [0]]
    # floor of layer 0 is 3: only one of its channels goes, the rest elsewhere
    assert select_channels(sc, [4, 2], [3, 1], [4, 2], 3) == [[0], [0]]
    # every layer at its floor: the target is not reached
    assert select_channels(sc, [4, 2], [3, 2], [4, 2], 3) == [[0], []]
    # round_to=2: layer 0 may go 4 -> 2 but not to 3 (removes fewer, never more)
    assert select_channels(sc, [4, 2], [1, 1], [4, 2], 1, round_to=2) == [[], []]
    assert select_channels(sc, [4, 2], [1, 1], [4, 2], 2, round_to=2) == [[0, 2], []]
    assert channel_floor(32, 0.5, 0.2) == 3 and channel_floor(32, 0.5, 0.2, round_to=8) == 8
    assert channel_floor(3, 0.9, 0.2) == 1 and channel_floor(5, 0.0, 1.0, round_to=8) == 5
    assert target_live(50, 100, 0.5, 64) == round((1 - cubic(50, 100, 0.5)) * 64)


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", ["mlp", "vgg_small", "resnet_bottleneck", "mobilenet_v2_small"])
def test_invariants_with_channels(name):
    steps = 100
    model, opt, chase = make(
        name, total_steps=steps, channel_sparsity=0.5, update_interval=10, channel_end=0.6,
        min_channel_ratio=0.1,
    )
    assert chase.groups, "no channel groups found"
    _, w = run(name, model, chase, steps)
    cfg = chase.config
    rep = chase.channel_report()
    C0 = sum(r["channels"] for r in rep)
    assert set(rep[0]) == {"group", "producers", "channels", "live"}
    # the schedule was followed (checked per event in Watcher) and reached S_c
    assert w.events and w.events[-1][0] == cfg.last_channel_event
    at_floor = any(r["live"] == f for r, f in zip(rep, chase._floors))
    assert sum(r["live"] for r in rep) == round((1 - 0.5) * C0) or at_floor
    # the freed weights were re-grown: back at the budget (or every live slot)
    assert chase.active_count() == min(chase.budget, sum(chase._live_numels()))
    # the public stats agree with the masks
    cs = chase.channel_stats()
    for n, m in chase.masks.items():
        assert int(cs[n][0].sum()) == int(m.sum())


def test_loss_falls_and_schedule_counts():
    steps = 300
    model, opt, chase = make("mlp", total_steps=steps, density=0.3, update_interval=20,
                             channel_sparsity=0.3, channel_end=0.5)
    losses, w = run("mlp", model, chase, steps)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    assert chase.t == steps


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda ps: torch.optim.SGD(ps, lr=0.05),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
        lambda ps: torch.optim.NAdam(ps, lr=1e-2),
        # not listed in chase_ext.grad_masking: plain steps mask weights and state after the step
        lambda ps: torch.optim.Rprop(ps, lr=1e-3),
        lambda ps: torch.optim.Adamax(ps, lr=1e-2),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1),
    ],
    ids=["sgd-nesterov-wd", "sgd-plain", "adam-amsgrad", "adamw", "rmsprop", "nadam", "rprop", "adamax",
         "adagrad-initial-accumulator"],
)
def test_optimizers_keep_state_masked(make_opt):
    model, opt, chase = make("mlp", opt=make_opt, total_steps=60, channel_sparsity=0.4, channel_end=0.5)
    run("mlp", model, chase, 60)
    assert any(True for _ in states_like(chase)) or isinstance(opt, torch.optim.SGD)


def test_layer_scope_and_random_growth():
    model, opt, chase = make("vgg_small", total_steps=80, scope="layer", grow="random",
                             channel_sparsity=0.3, channel_end=0.5)
    for i in range(80):
        train_step("vgg_small", model, chase, i)
        check_masked(chase)
        if is_update_step(chase.t, 10, 80):
            nnz = chase._nnz()
            L = chase._live_numels()
            assert nnz == [min(k, l) for k, l in zip(chase._k, L)]
    assert sum(chase._k) == min(chase.budget, sum(chase._live_numels()))


def test_layer_scope_resplits_by_erk_at_every_channel_event():
    # SPEC §3.4: after every channel event the k_l are re-split by ERK over the live
    # shapes, whatever init was, also when the event removed nothing
    model, opt, chase = make("vgg_small", total_steps=80, scope="layer", init="uniform",
                             channel_sparsity=0.001, channel_end=0.5)
    start = list(chase._k)
    assert start != erk_counts(chase._live_shapes(), chase.budget)
    i = 0
    while chase._ch.events == 0:
        train_step("vgg_small", model, chase, i)
        i += 1
    assert all(r["live"] == r["channels"] for r in chase.channel_report()), "the first event removed channels"
    assert chase._k == erk_counts(chase._live_shapes(), chase.budget)


def test_explicit_channel_groups_equal_traced_ones():
    # the traced groups of a chain, given back explicitly, drive the same run
    from chase_ext.graph import find_channel_groups, group_to_dict

    kw = dict(total_steps=60, channel_sparsity=0.4, channel_end=0.5, slim_during_training=True)
    m1, _, c1 = make("vgg_small", **kw)
    groups = [group_to_dict(g) for g in find_channel_groups(m1, example_input("vgg_small"))]
    run("vgg_small", m1, c1, 60)
    m2, _, c2 = make("vgg_small", channel_groups=groups, **kw)  # same seed, same init
    run("vgg_small", m2, c2, 60)
    assert c1.channel_report() == c2.channel_report()
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_uniform_init_no_channels_lr_scheduler():
    model, opt, chase = make("resnet_basic", init="uniform", total_steps=40)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(chase, T_max=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(40):
            train_step("resnet_basic", model, chase, i)
            sched.step()
    assert opt.param_groups[0]["lr"] < 1e-3
    assert chase.param_groups is opt.param_groups and chase.state is opt.state
    # last update at t=30 < T_m=32: phase A, B + round(δ(30)·N)
    assert chase.active_count() == expected_target(chase, 30) > chase.budget
    assert chase.channel_report() == []


# --------------------------------------------------------------------------- mixed precision
def test_grad_scaler_skipped_steps_do_not_count():
    model, opt, chase = make("mlp", total_steps=60, update_interval=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    skipped = 0
    for i in range(30):
        x, y = batch("mlp", i)
        loss = nn.functional.cross_entropy(model(x), y)
        if i in (4, 9, 17):
            loss = loss * float("inf")  # the scaler sees inf grads and skips the step
        before = {n: m.clone() for n, m in chase.masks.items()}
        t0 = chase.t
        chase.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(chase)
        scaler.update()
        if i in (4, 9, 17):
            skipped += 1
            assert chase.t == t0
            assert all(torch.equal(before[n], chase.masks[n]) for n in before)
        check_masked(chase)
        if chase.t % 5 == 0 and chase.t != t0:
            assert chase.active_count() == expected_target(chase, chase.t)
    assert chase.t == 30 - skipped


def test_bf16_autocast():
    model, opt, chase = make("vgg_small", total_steps=40, channel_sparsity=0.3, channel_end=0.5)
    run("vgg_small", model, chase, 40, autocast=torch.bfloat16)


def test_bf16_params():
    model, opt, chase = make("mlp", total_steps=40, channel_sparsity=0.3, channel_end=0.5)
    model.to(torch.bfloat16)
    run("mlp", model, chase, 40, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in chase._params)


# --------------------------------------------------------------------------- errors
def test_non_finite_raises_with_nothing_changed():
    model, opt, chase = make("mlp", total_steps=60, update_interval=5)
    for i in range(4):
        train_step("mlp", model, chase, i)
    x, y = batch("mlp", 4)
    loss = nn.functional.cross_entropy(model(x), y)
    chase.zero_grad()
    loss.backward()
    w = chase._params[1]
    with torch.no_grad():
        w.view(-1)[torch.nonzero(chase.masks[chase._names[1]].flatten())[0]] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    masks = {n: m.clone() for n, m in chase.masks.items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(FloatingPointError, match="non-finite"):
        chase.step()
    assert chase.t == 4
    assert all(torch.equal(a, b, ) or (a.isnan() == b.isnan()).all() for a, b in zip(params, model.parameters()))
    assert all(torch.equal(masks[n], chase.masks[n]) for n in masks)
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


@pytest.mark.parametrize("where", ["weight", "gradient"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_named_and_overflow_is_not(where, value):
    # the check sums each tensor first: every non-finite element must make it raise and be
    # named, and a sum that overflows on finite values must not
    model, opt, chase = make("mlp", total_steps=60, update_interval=5)
    for i in range(4):
        train_step("mlp", model, chase, i)
    x, y = batch("mlp", 4)
    chase.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    name, p = chase._names[0], chase._params[0]
    with torch.no_grad():
        p.grad.fill_(3e38)  # finite, but any float32 sum of two of them overflows
        (p if where == "weight" else p.grad).view(-1)[7] = value
    with pytest.raises(FloatingPointError, match=("weight" if where == "weight" else "gradient of") + f" {name!r}"):
        chase.step()
    assert chase.t == 4
    with torch.no_grad():
        (p if where == "weight" else p.grad).view(-1)[7] = 1.0
    chase.step()  # the overflowing sum alone is no error
    assert chase.t == 5


def test_step_that_makes_weights_non_finite_stops_the_update():
    # random growth does not check gradients before the step (SPEC §3.0): a NaN gradient
    # reaches the weights through the wrapped step; the update is refused, cleanly
    model, opt, chase = make("mlp", total_steps=60, update_interval=5, grow="random")
    for i in range(4):
        train_step("mlp", model, chase, i)
    x, y = batch("mlp", 4)
    chase.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    name, p, m = chase._names[0], chase._params[0], chase.masks[chase._names[0]]
    slot = int(torch.nonzero(m.flatten())[0])
    with torch.no_grad():
        p.grad.view(-1)[slot] = float("nan")
    masks = {n: v.clone() for n, v in chase.masks.items()}
    rng = chase._gen.get_state()
    with pytest.raises(FloatingPointError, match=f"step 5 made weight {name!r} non-finite"):
        chase.step()
    assert chase.t == 5  # the wrapped step was taken
    assert all(torch.equal(masks[n], chase.masks[n]) for n in masks)
    assert torch.equal(rng, chase._gen.get_state())


def test_event_with_non_finite_weights_removes_nothing():
    model, opt, chase = make("vgg_small", total_steps=80, channel_sparsity=0.5, channel_end=0.5)
    cfg = chase.config
    i = 0
    while not is_channel_event(chase.t + 1, cfg.channel_interval_steps, cfg.update_steps) or is_update_step(
        chase.t + 1, cfg.update_steps, cfg.t_end_steps
    ):
        train_step("vgg_small", model, chase, i)
        i += 1
    x, y = batch("vgg_small", i)
    chase.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    slot = int(torch.nonzero(chase.masks[chase._names[0]].flatten())[0])  # active: not zeroed
    with torch.no_grad():
        chase._params[0].view(-1)[slot] = float("inf")  # an event-only step: no finiteness check
    before = chase.channel_report()
    events = chase._ch.events
    with pytest.raises(FloatingPointError, match="non-finite channel scores"):
        chase.step()
    assert chase.channel_report() == before and chase._ch.events == events


def test_backend_argument():
    with pytest.raises(ValueError, match="backend"):
        make("mlp", backend="cuda")


@pytest.mark.skipif(not HAVE_NATIVE, reason="the native kernels are not built")
def test_weight_dtypes_the_kernels_cannot_take_fail_at_construction():
    m = mlp().double()
    with pytest.raises(TypeError, match=r"'.*weight' is torch.float64"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, density=0.5, total_steps=10)
    m = mlp()
    next(mod for mod in m.modules() if isinstance(mod, nn.Linear)).half()
    with pytest.raises(TypeError, match="share one dtype"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, density=0.5, total_steps=10)
    ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, density=0.5, total_steps=10, backend="reference")


def test_construction_errors_name_the_problem():
    m = mlp()
    with pytest.raises(TypeError, match="config must be a ChaseConfig"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, 0.1)
    other = mlp()
    with pytest.raises(ValueError, match=r"does not update 3 sparse weight\(s\) of the model \(0.weight, 3.weight, 5.weight\)"):
        ChaseOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), m, density=0.5, total_steps=10)
    first = next(mod for mod in m.modules() if isinstance(mod, nn.Linear))
    with pytest.raises(ValueError, match=r"does not update 2 sparse weight\(s\) of the model \(3.weight, 5.weight\)"):
        ChaseOptimizer(torch.optim.SGD(first.parameters(), lr=0.1), m, density=0.5, total_steps=10)


def test_channel_knobs_without_a_channel_part_warn():
    m = mlp()
    with pytest.warns(UserWarning, match="exclude_channels, round_to ignored"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, density=0.5, total_steps=100,
                       exclude_channels=("0",), round_to=8, backend=BACKEND)


def test_channel_sparsity_without_groups_warns():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.warns(UserWarning, match="no prunable channel group"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, density=0.5, total_steps=100,
                       channel_sparsity=0.5, example_inputs=torch.randn(2, 3, 4), backend=BACKEND)


def test_channel_part_needs_groups():
    torch.manual_seed(0)
    m = mlp()
    with pytest.raises(ValueError, match="example_inputs"):
        ChaseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, density=0.5, total_steps=100,
                       channel_sparsity=0.5)


# --------------------------------------------------------------------------- checkpoints
def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _resume_case(name, steps, **kw):
    # 2N straight
    mA, oA, cA = make(name, **kw)
    run(name, mA, cA, 2 * steps, watch=False)
    # N, save, fresh objects, load, N
    mB, oB, cB = make(name, **kw)
    run(name, mB, cB, steps, watch=False)
    buf = _save({"model": mB.state_dict(), "optim": cB.state_dict()})
    mC, oC, cC = make(name, seed=123, **kw)
    ck = torch.load(buf)  # the default weights_only=True loader must accept it
    cC.load_state_dict(ck["optim"])  # replays slims first, so the model state fits
    mC.load_state_dict(ck["model"])
    assert cC.t == steps
    run(name, mC, cC, steps, start=steps, watch=False)
    for (n, a), b in zip(mA.state_dict().items(), mC.state_dict().values()):
        assert torch.equal(a, b), n
    for n in cA.masks:
        assert torch.equal(cA.masks[n], cC.masks[n]), n
    assert cA.channel_report() == cC.channel_report()
    sa, sc = oA.state_dict()["state"], oC.state_dict()["state"]
    for k in sa:
        for kk in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][kk]), torch.as_tensor(sc[k][kk]))


def test_resume_bit_exact_random_growth_channels():
    _resume_case("mlp", 40, opt="adam", total_steps=80, grow="random", channel_sparsity=0.4, channel_end=0.6)


def test_resume_bit_exact_slim_during_training():
    _resume_case("resnet_bottleneck", 25, total_steps=50, update_interval=5, channel_sparsity=0.5,
                 channel_end=0.6, slim_during_training=True)


def test_mismatched_checkpoint_changes_nothing():
    m1, o1, c1 = make("mlp", total_steps=40)
    run("mlp", m1, c1, 10, watch=False)
    sd = c1.state_dict()
    m2, o2, c2 = make("mlp", total_steps=40, density=0.5)
    run("mlp", m2, c2, 3, watch=False)
    masks = {n: m.clone() for n, m in c2.masks.items()}
    ostate = o2.state_dict()
    with pytest.raises(ValueError, match="density"):
        c2.load_state_dict(sd)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    c3 = ChaseOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other, density=0.3, total_steps=40,
                        backend=BACKEND)
    with pytest.raises(ValueError, match="match"):
        c3.load_state_dict(sd)
    with pytest.raises(ValueError, match="chase"):
        c2.load_state_dict(o1.state_dict())
    assert c2.t == 3 and all(torch.equal(masks[n], c2.masks[n]) for n in masks)
    assert str(o2.state_dict()) == str(ostate)



def test_bad_rng_state_rejected_before_anything_changes():
    """The generator state is validated with the rest (a checkpoint mapped to another
    device, or damaged), so a bad one leaves a slimming run exactly as it was."""
    m1, o1, c1 = make("vgg_small", total_steps=40, channel_sparsity=0.5, channel_end=0.5,
                      slim_during_training=True, grow="random")
    run("vgg_small", m1, c1, 30, watch=False)
    sd = c1.state_dict()
    assert c1.slim_count > 0
    m2, o2, c2 = make("vgg_small", total_steps=40, channel_sparsity=0.5, channel_end=0.5,
                      slim_during_training=True, grow="random")
    shapes = [tuple(p.shape) for p in m2.parameters()]
    bad = dict(sd, chase=dict(sd["chase"], rng=torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="random-generator state"):
        c2.load_state_dict(bad)
    assert c2.t == 0 and c2.slim_count == 0 and shapes == [tuple(p.shape) for p in m2.parameters()]
    # the same state as another integer dtype (as a device copy might come back) loads
    ok = dict(sd, chase=dict(sd["chase"], rng=sd["chase"]["rng"].to(torch.int64)))
    c2.load_state_dict(ok)
    assert c2.t == 30 and c2.slim_count == c1.slim_count


def _corrupt(sd, path, value):
    """A copy of the state dict with sd[path[0]][path[1]]... set (or deleted for value=KeyError)."""
    out = dict(sd)
    node, parent = out, None
    for key in path[:-1]:
        parent, node = node, node[key]
        node = dict(node) if isinstance(node, dict) else list(node)
        if isinstance(parent, dict):
            parent[key] = node
        else:
            parent[key] = node
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return out


_BAD_CHECKPOINTS = {
    "t text": (("chase", "t"), "abc", "'t'"),
    "t negative": (("chase", "t"), -1, "'t'"),
    "t missing": (("chase", "t"), KeyError, "'t'"),
    "k none": (("chase", "k"), None, "'k'"),
    "k short": (("chase", "k"), lambda k: k[:-1], "'k'"),
    "k negative": (("chase", "k"), lambda k: [-5] + list(k[1:]), "'k'"),
    "mask float": (("chase", "masks", 0), lambda m: m.float(), "mask of"),
    "mask shape": (("chase", "masks", 1), lambda m: m[:-1], "mask of"),
    "alive short": (("chase", "channels", "alive"), lambda a: a[:-1], "'alive'"),
    "present out of range": (("chase", "channels", "present", 0), lambda p: p + 1000, "present channels"),
    "present unsorted": (("chase", "channels", "present", 0), lambda p: p.flip(0), "present channels"),
    "events text": (("chase", "channels", "events"), "x", "'events'"),
    "done text": (("chase", "channels", "done"), "x", "'done'"),
    "last record out of range": (("chase", "channels", "slim_records", -1), lambda r: [None if k is None else
                                 [i + 1000 for i in k] for k in r], "slim record"),
    "records disagree with present": (("chase", "channels", "slim_records"), lambda r: r[:-1], "disagree"),
    "no optimizer state": (("state",), KeyError, "'state'"),
    "round_to changed": (("chase", "settings", "round_to"), 8, "round_to"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CHECKPOINTS))
def test_corrupt_checkpoint_is_refused_with_nothing_changed(case):
    kw = dict(total_steps=40, channel_sparsity=0.5, channel_end=0.5, slim_during_training=True)
    m1, o1, c1 = make("vgg_small", **kw)
    run("vgg_small", m1, c1, 30, watch=False)
    assert c1.slim_count >= 2
    path, value, needle = _BAD_CHECKPOINTS[case]
    bad = _corrupt(c1.state_dict(), path, value)
    m2, o2, c2 = make("vgg_small", **kw)
    run("vgg_small", m2, c2, 3, watch=False)
    params = {n: p.detach().clone() for n, p in m2.named_parameters()}
    masks = {n: m.clone() for n, m in c2.masks.items()}
    ostate, report = str(o2.state_dict()), c2.channel_report()
    with pytest.raises(ValueError, match=needle):
        c2.load_state_dict(bad)
    assert c2.t == 3 and c2.slim_count == 0 and c2.channel_report() == report
    assert all(torch.equal(p.detach(), params[n]) for n, p in m2.named_parameters())
    assert all(torch.equal(masks[n], c2.masks[n]) for n in masks)
    assert str(o2.state_dict()) == ostate
    c2.load_state_dict(c1.state_dict())  # the intact checkpoint still loads afterwards
    assert c2.t == 30 and c2.slim_count == c1.slim_count


def test_checkpoint_of_another_optimizer_type_is_refused_with_nothing_changed():
    kw = dict(total_steps=40, channel_sparsity=0.5, channel_end=0.5, slim_during_training=True)
    m1, _, c1 = make("vgg_small", **kw)
    run("vgg_small", m1, c1, 30, watch=False)
    m2, o2, c2 = make("vgg_small", opt="adam", **kw)
    run("vgg_small", m2, c2, 3, watch=False)
    shapes, ostate = [tuple(p.shape) for p in m2.parameters()], str(o2.state_dict())
    with pytest.raises(ValueError, match="does not load into the wrapped Adam"):
        c2.load_state_dict(c1.state_dict())
    assert [tuple(p.shape) for p in m2.parameters()] == shapes and str(o2.state_dict()) == ostate
    run("vgg_small", m2, c2, 2, start=3, watch=False)  # still trains


def test_changed_schedule_settings_warn_on_resume():
    m1, _, c1 = make("mlp", total_steps=40, update_interval=10)
    run("mlp", m1, c1, 12, watch=False)
    m2, _, c2 = make("mlp", total_steps=40, update_interval=5)
    with pytest.warns(UserWarning, match="update_interval 10 -> 5"):
        c2.load_state_dict(c1.state_dict())
    assert c2.t == 12


def test_state_dict_hooks_run():
    m, _, c = make("mlp", total_steps=40)
    seen = []
    c.register_state_dict_pre_hook(lambda opt: seen.append("pre"))
    c.register_state_dict_post_hook(lambda opt, sd: dict(sd, extra=1))
    c.register_load_state_dict_pre_hook(lambda opt, sd: {k: v for k, v in sd.items() if k != "extra"})
    c.register_load_state_dict_post_hook(lambda opt: seen.append("loaded"))
    sd = c.state_dict()
    assert sd["extra"] == 1 and "chase" in sd
    c.load_state_dict(sd)
    assert seen == ["pre", "loaded"]


# --------------------------------------------------------------------------- backends
@pytest.mark.skipif(not HAVE_NATIVE, reason="chase_ext._ops cannot be imported")
def test_native_equals_reference():
    steps = 60
    out = {}
    for backend in ("native", "reference"):
        model, opt, chase = make("vgg_small", backend=backend, total_steps=steps, channel_sparsity=0.4,
                                 channel_end=0.5, slim_during_training=2)
        run("vgg_small", model, chase, steps, watch=False)
        out[backend] = (chase.masks, chase.channel_report(), list(model.parameters()))
    (ma, ra, pa), (mb, rb, pb) = out["native"], out["reference"]
    assert ra == rb
    for n in ma:
        assert torch.equal(ma[n], mb[n]), n
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b)


def test_slim_keeps_function_and_budget():
    model, opt, chase = make("vgg_small", total_steps=60, channel_sparsity=0.5, channel_end=0.5)
    run("vgg_small", model, chase, 60, watch=False)
    x = example_input("vgg_small")
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    n0 = chase.active_count()
    ids = [id(p) for p in model.parameters()]
    chase.slim_()
    with torch.no_grad():
        y1 = model(x)
    torch.testing.assert_close(y0, y1)
    assert chase.active_count() == n0 and ids == [id(p) for p in model.parameters()]
    assert sum(p.numel() for p in chase._params) < chase.total_sparse
    check_masked(chase)


@pytest.mark.parametrize("name", ["mlp", "resnet_bottleneck"])
def test_event_and_update_on_one_step_with_slimming(name):
    # channel_interval=4, update_interval=8: offset (8 // 2) % 4 = 0, so events at 4, 8, 12, ...
    # and every update (8, 16, ...) shares its step with an event that slims first
    kw = dict(total_steps=64, update_interval=8, channel_interval=4, channel_sparsity=0.5, channel_end=0.5)
    mA, _, cA = make(name, slim_during_training=True, **kw)
    _, w = run(name, mA, cA, 64)
    assert [t for t, _ in w.events] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert sum(p.numel() for p in cA._params) < cA.total_sparse  # slimmed during training
    if name != "mlp":
        return  # convs of other widths round differently; the runs drift apart in float
    mB, _, cB = make(name, **kw)
    run(name, mB, cB, 64)
    assert cA.channel_report() == cB.channel_report()
    # gradient growth reads the same (gathered) scores: the slim masks are the live part
    # of the masked-only run's masks
    for n, i in cB._index.items():
        mb = cB.masks[n]
        r, c = cB._live_rows[i], cB._live_cols[i]
        if r is not None:
            mb = mb[r]
        if c is not None:
            mb = mb[:, c]
        assert torch.equal(cA.masks[n], mb), n


@pytest.mark.parametrize(
    "name, kw",
    [
        ("resnet_basic", dict(coupled_channels=True)),
        ("vgg_small", dict(round_to=4, channel_score="active_fraction")),
        ("mobilenet_v2_small", dict(channel_score="active_mean", coupled_channels=True, slim_during_training=2)),
        ("vgg_small", dict(exclude_channels=("features.0",), scope="layer")),
        ("efficientnet_small", dict(gated_channels=True)),
        ("efficientnet_small", dict(gated_channels=True, coupled_channels=True, slim_during_training=2)),
        ("efficientnet_small", dict(gated_channels=True, channel_allocation="latency", latency_batch=2)),
        ("resnext_small", dict(grouped_channels=True)),
        ("resnext_small", dict(grouped_channels=True, coupled_channels=True, round_to=2, channel_score="active_mean")),
        ("resnext_small", dict(grouped_channels=True, channel_allocation="latency", latency_batch=2, scope="layer")),
    ],
    ids=["coupled", "round_to", "coupled-slim-active_mean", "exclude_channels-layer", "gated", "gated-coupled-slim",
         "gated-latency", "grouped", "grouped-coupled-round_to", "grouped-latency-layer"],
)
def test_channel_options(name, kw):
    model, opt, chase = make(name, total_steps=48, update_interval=8, channel_sparsity=0.5, channel_end=0.5, **kw)
    run(name, model, chase, 48)
    rep = chase.channel_report()
    assert sum(r["live"] for r in rep) < sum(r["channels"] for r in rep)
    if kw.get("round_to"):
        assert all(r["live"] % kw["round_to"] == 0 or r["live"] == r["channels"] for r in rep)
    if kw.get("grouped_channels"):  # the grouped convs' inputs and outputs shrink, every conv group alike
        inner = [r for r in rep if r["producers"][0].endswith((".conv1", ".conv2"))]
        assert len(inner) == 8 and any(r["live"] < r["channels"] for r in inner)
        assert all(r["live"] % (4 * kw.get("round_to", 1)) == 0 for r in inner)  # round_to per conv group
    if kw.get("coupled_channels"):
        assert any("+" in r["group"] for r in rep)
    if "exclude_channels" in kw:
        assert all(r["group"] != "features.0" for r in rep)
    if kw.get("gated_channels"):  # the squeeze-and-excitation gates lose the channels of the maps they scale
        gated = [r for r in rep if any(p.endswith(".fc2") for p in r["producers"])]
        assert len(gated) == 3 and any(r["live"] < r["channels"] for r in gated)
    check_masked(chase)


def resume_is_exact(name, kw, steps=48, cut=20):
    """A checkpoint taken at step ``cut`` (after the slims so far) loads into a fresh
    full-width model and the run goes on as the uninterrupted one does, bit for bit."""
    model, o, chase = make(name, **kw)
    run(name, model, chase, steps, watch=False)
    m1, o1, c1 = make(name, **kw)
    run(name, m1, c1, cut, watch=False)
    assert c1.slim_count > 0
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": c1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    m2, o2, c2 = make(name, **kw)
    c2.load_state_dict(ck["opt"])
    m2.load_state_dict(ck["model"])
    run(name, m2, c2, steps - cut, start=cut, watch=False)
    for (n, a), b in zip(model.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    for n in chase.masks:
        assert torch.equal(chase.masks[n], c2.masks[n]), n


def ema_follows_slims(name, kw, steps=48):
    """An EMA copy kept in step with ``chase_ext.ema.follow_slims`` has the model's shapes
    after every step of a run that slims, and runs."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from chase_ext.ema import follow_slims

    model, o, chase = make(name, **kw)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for i in range(steps):
        train_step(name, model, chase, i)
        follow_slims(ema, chase)
        ema.update_parameters(model)
        assert [p.shape for p in ema.module.parameters()] == [p.shape for p in model.parameters()]
    assert chase.slim_count > 0
    ema.module(example_input(name))


def slim_keeps_function(model, chase, x):
    """``chase.slim_()`` leaves the eval-mode output and the active count as they were;
    returns the output."""
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    n0 = chase.active_count()
    chase.slim_()
    with torch.no_grad():
        y1 = model(x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert chase.active_count() == n0
    return y1


def test_gated_channels_slim_keeps_function():
    """A squeeze-and-excitation model with gated (and coupled) channel groups: the slim
    model computes what the masked one does, and a checkpoint of it resumes."""
    kw = dict(total_steps=40, update_interval=5, channel_sparsity=0.5, channel_end=0.5, gated_channels=True,
              coupled_channels=True)
    model, opt, chase = make("efficientnet_small", **kw)
    run("efficientnet_small", model, chase, 40, watch=False)
    x = example_input("efficientnet_small")
    y1 = slim_keeps_function(model, chase, x)
    # a map's removed channels left the gate's rows and the squeeze's columns too
    gated = [r for r in chase.channel_report() if r["producers"][-1].endswith(".fc2")]
    assert len(gated) == 3 and any(r["live"] < r["channels"] for r in gated)
    for r in gated:
        fmap, fc2 = (model.get_submodule(p) for p in r["producers"])
        fc1 = model.get_submodule(r["producers"][1].replace("fc2", "fc1"))
        assert fmap.out_channels == fc2.out_channels == fc1.in_channels == r["live"]
    check_masked(chase)
    sd = copy.deepcopy(chase.state_dict())
    m2, o2, c2 = make("efficientnet_small", **kw)
    c2.load_state_dict(sd)  # replays the slim on the fresh model, which then takes the weights
    assert [p.shape for p in m2.parameters()] == [p.shape for p in model.parameters()]
    m2.load_state_dict(model.state_dict())
    assert c2.channel_report() == chase.channel_report()
    m2.eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(x), y1, rtol=0, atol=0)


def test_random_growth_scores_are_one_draw_in_tensor_order(monkeypatch):
    # one draw for the whole model (one host-to-device copy) gives every tensor the numbers
    # a draw per tensor, in order, would give: runs and checkpoints stay reproducible
    from chase_ext import layout

    model, opt, chase = make("vgg_small", total_steps=60, update_interval=5, grow="random")
    for i in range(4):
        train_step("vgg_small", model, chase, i)
    seen = []
    real = layout.mask_update_
    monkeypatch.setattr(layout, "mask_update_", lambda ops, w, m, s, *a: (seen.append(s), real(ops, w, m, s, *a))[1])
    g = torch.Generator()
    g.set_state(chase._gen.get_state())
    train_step("vgg_small", model, chase, 4)
    assert len(seen) == 1 and len(seen[0]) == len(chase._params) > 3
    for s, p in zip(seen[0], chase._params):
        assert torch.equal(s, torch.rand(p.numel(), generator=g).view(p.shape))


def test_masks_follow_a_layout_change_before_any_step():
    model, opt, chase = make("vgg_small")
    model.to(memory_format=torch.channels_last)
    for n, p in zip(chase._names, chase._params):
        if p.dim() == 4:
            assert chase.masks[n].stride() == p.stride(), n


def test_sparse_weights_on_two_devices_are_refused():
    model = MODELS["mlp"]()
    with torch.no_grad():
        model[0].weight = nn.Parameter(torch.empty_like(model[0].weight, device="meta"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"on several devices \(cpu, meta\)"):
        ChaseOptimizer(opt, model, density=0.3, total_steps=10, backend=BACKEND)


class _Int8StateSGD(torch.optim.SGD):
    """SGD that also keeps an integer tensor shaped like each parameter (as 8-bit
    optimizers keep quantised moments) and a float one."""

    def step(self, closure=None):
        loss = super().step(closure)
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                st.setdefault("codes", torch.full_like(p, 7, dtype=torch.uint8))
                st.setdefault("ema", torch.ones_like(p))
        return loss


def test_integer_optimizer_state_is_left_alone_with_one_warning():
    model, opt, chase = make("mlp", opt=lambda ps: _Int8StateSGD(ps, lr=0.05), total_steps=40,
                             update_interval=5)
    with pytest.warns(UserWarning, match=r"optimizer state 'codes' of '\d\.weight' \(torch\.uint8 on cpu\) "
                                         r"is not masked") as rec:
        for i in range(12):
            train_step("mlp", model, chase, i)
    assert sum("'codes' of '0.weight'" in str(w.message) for w in rec) == 1  # once, not per step
    for n, p in zip(chase._names, chase._params):
        st = chase.state[p]
        assert bool((st["codes"] == 7).all()), n  # untouched
        assert bool((st["ema"][~chase.masks[n]] == 0).all()), n  # float state still masked
        assert bool((p.detach()[~chase.masks[n]] == 0).all()), n
