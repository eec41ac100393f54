"""chase_ext.grad_masking and what ChaseOptimizer does with it: plain steps of listed
optimizers mask the gradients before the wrapped step (bit for bit the weights and state
of masking them after it), unlisted ones keep the post-step masking; update steps hand
the gradients over uncopied only when the wrapped step leaves them alone; the active
count is carried on the host from update to update."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import chase_ext.optimizer as chase_optimizer
from chase_ext import ChaseOptimizer
from chase_ext.grad_masking import keeps_zero_slots, leaves_gradients_alone
from models import MODELS, example_input

O = torch.optim
# (id, factory) of every listed optimizer, with the options that change its update rule
SAFE = [
    ("sgd", lambda ps: O.SGD(ps, lr=0.1)),
    ("sgd-momentum-wd-dampening", lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    ("sgd-nesterov-maximize", lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("sgd-nesterov-foreach", lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                               foreach=True)),
    ("adam", lambda ps: O.Adam(ps, lr=1e-2)),
    ("adam-amsgrad-wd-maximize", lambda ps: O.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-2, maximize=True)),
    ("adam-foreach", lambda ps: O.Adam(ps, lr=1e-2, weight_decay=1e-2, foreach=True)),
    ("adamw-amsgrad", lambda ps: O.AdamW(ps, lr=1e-2, amsgrad=True)),
    ("nadam-decoupled", lambda ps: O.NAdam(ps, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
    ("radam", lambda ps: O.RAdam(ps, lr=1e-2, weight_decay=1e-2)),
    ("rmsprop-centered-momentum", lambda ps: O.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2)),
    ("adadelta", lambda ps: O.Adadelta(ps, weight_decay=1e-2)),
    ("adagrad", lambda ps: O.Adagrad(ps, lr=1e-2, lr_decay=1e-3, weight_decay=1e-2)),
]


class SGDSubclass(O.SGD):  # may override step: not assumed to be SGD
    pass


# (id, factory, does a zero slot really move?) of optimizers that must fall back
UNSAFE = [
    ("rprop", lambda ps: O.Rprop(ps, lr=1e-2), True),
    ("adamax", lambda ps: O.Adamax(ps, lr=1e-2), True),
    ("adagrad-initial-accumulator", lambda ps: O.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1), True),
    ("adam-eps-0", lambda ps: O.Adam(ps, lr=1e-2, eps=0.0), True),
    ("sgd-subclass", lambda ps: SGDSubclass(ps, lr=0.1), False),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).clone().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _zero_slot_run(factory, steps=3):
    """A parameter whose masked slots hold weight 0, gradient 0 and (after the first
    step) state 0; returns (masked weight values, masked values of each same-shape state)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(40, 30, generator=g) < 0.3
    # +0.0 at masked slots, as masked_apply_ writes them (randn * mask would give -0.0 too)
    w = torch.nn.Parameter(torch.where(mask, torch.randn(40, 30, generator=g), 0.0))
    opt = factory([w])
    for _ in range(steps):
        w.grad = torch.where(mask, torch.randn(40, 30, generator=g), 0.0)
        opt.step()
    states = [v for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.shape == w.shape]
    return opt, w.detach()[~mask], [s[~mask] for s in states]


@pytest.mark.parametrize("name,factory", SAFE, ids=[s[0] for s in SAFE])
def test_listed_optimizers_keep_a_zero_slot_exactly_zero(name, factory):
    opt, w, states = _zero_slot_run(factory)
    assert keeps_zero_slots(opt)
    assert not bool(_bits(w).any()), "a masked weight moved (or became -0.0)"
    assert states or name == "sgd", "the optimizer keeps no same-shape state here"
    for s in states:  # numerically 0 (with maximize a momentum buffer starts as -0.0)
        assert not bool((s != 0).any())


@pytest.mark.parametrize("name,factory,moves", UNSAFE, ids=[u[0] for u in UNSAFE])
def test_unlisted_optimizers_are_detected(name, factory, moves):
    opt, w, states = _zero_slot_run(factory)
    assert not keeps_zero_slots(opt)
    if moves:  # the reason it is not listed: its weight or state leaves 0 (or goes NaN)
        assert any(bool((s != 0).any()) for s in states + [w])


def test_a_group_setting_can_make_a_listed_class_unsafe():
    w1, w2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = O.Adam([{"params": [w1]}, {"params": [w2], "eps": 0.0}])
    assert not keeps_zero_slots(opt)
    opt.param_groups[1]["eps"] = 1e-8
    assert keeps_zero_slots(opt)


# ------------------------------------------------------------------ ChaseOptimizer
def _chase(factory, name="vgg_small", **kw):
    torch.manual_seed(0)
    model = MODELS[name]()
    kw = {"density": 0.3, "total_steps": 40, "update_interval": 6, **kw}
    if kw.setdefault("channel_sparsity", 0.5) > 0:
        kw = {"channel_end": 0.5, "min_channel_ratio": 0.1, "slim_during_training": 2,
              "example_inputs": example_input(name), **kw}
    chase = ChaseOptimizer(factory(model.parameters()), model, **kw)
    return model, chase


def _train(model, chase, steps, name="vgg_small", check=None):
    for i in range(steps):
        x = example_input(name, batch=8, seed=i)
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        chase.zero_grad()
        loss.backward()
        chase.step()
        if check:
            check(chase)


def _masked_slots_zero(chase):
    masks = chase.masks
    for n, p in zip(chase.sparse_names(), chase._params):
        off = ~masks[n]
        assert not bool(p.detach()[off].any()), n
        for k, v in chase.optimizer.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert not bool(v[off].any()), (n, k)
    for b, bm in chase._bias_masks:  # removed channels' bias entries and their state (SPEC §4)
        assert not bool(b.detach()[~bm].any())
        for v in chase.optimizer.state[b].values():
            if isinstance(v, torch.Tensor) and v.shape == b.shape:
                assert not bool(v[~bm].any())


class _Count:
    """Wraps ChaseOptimizer._mask_gradients, counting the plain steps that masked gradients."""

    def __init__(self):
        self.masked = 0
        self.orig = ChaseOptimizer._mask_gradients

    def __call__(self, chase, sparse=True):
        done = self.orig(chase, sparse)
        self.masked += bool(done)
        return done


@pytest.mark.parametrize("name,factory", [SAFE[1], SAFE[3], SAFE[5], SAFE[7], SAFE[10], SAFE[12]],
                         ids=["sgd-momentum", "sgd-nesterov-foreach", "adam-amsgrad", "adamw", "rmsprop", "adagrad"])
def test_gradient_masking_equals_post_step_masking_bit_for_bit(name, factory):
    """Two runs with events, updates and slims: one masks gradients on plain steps, the
    other (forced) masks weights and state after every step. Same weights, state and
    masks, bit for bit; masked weights and state 0 after every step of both."""
    counter = _Count()
    mA, cA = _chase(factory)
    with mock.patch.object(ChaseOptimizer, "_mask_gradients", lambda self, sparse=True: counter(self, sparse)):
        _train(mA, cA, 40, check=_masked_slots_zero)
    assert counter.masked > 20 and cA.slim_count > 0
    mB, cB = _chase(factory)
    with mock.patch.object(chase_optimizer, "keeps_zero_slots", lambda *a: False):
        _train(mB, cB, 40, check=_masked_slots_zero)
    for (n, a), b in zip(mA.named_parameters(), mB.parameters()):
        assert torch.equal(_bits(a), _bits(b)), n
        for (k, x), y in zip(cA.optimizer.state[a].items(), cB.optimizer.state[b].values()):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), (n, k)
    for n in cA.masks:
        assert torch.equal(cA.masks[n], cB.masks[n]), n


def test_plain_step_leaves_masked_gradients_zero_and_active_ones_alone():
    model, chase = _chase(SAFE[1][1], update_interval=1000, channel_sparsity=0.0)
    x, y = example_input("vgg_small", batch=8), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in chase._params]
    chase.step()
    for p, g, m in zip(chase._params, before, chase.masks.values()):
        assert not bool(p.grad[~m].any()) and torch.equal(p.grad[m], g[m])


@pytest.mark.parametrize("name,factory,moves", UNSAFE[:3] + UNSAFE[4:], ids=["rprop", "adamax", "adagrad-init",
                                                                              "sgd-subclass"])
def test_unsafe_optimizers_fall_back_and_keep_the_invariants(name, factory, moves):
    counter = _Count()
    model, chase = _chase(factory)
    with mock.patch.object(ChaseOptimizer, "_mask_gradients", lambda self, sparse=True: counter(self, sparse)):
        _train(model, chase, 30, check=_masked_slots_zero)
    assert counter.masked == 0 and chase.slim_count > 0


def _closure_run(factory, use_closure, steps=30):
    """A run with updates, events and slims whose steps get the loss from a closure (as
    Lightning's automatic optimization) or are called after a plain backward."""
    model, chase = _chase(factory)
    losses = []
    for i in range(steps):
        x = example_input("vgg_small", batch=8, seed=i)
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i))

        def closure():
            chase.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if use_closure:
            losses.append(chase.step(closure))
        else:
            losses.append(closure())
            chase.step()
        _masked_slots_zero(chase)
    return model, chase, losses


@pytest.mark.parametrize("name,factory", [SAFE[1], SAFE[5]], ids=[SAFE[1][0], SAFE[5][0]])
def test_plain_steps_with_a_closure_mask_gradients_as_without(name, factory):
    """The closure runs before the wrapped step, so plain steps with one mask gradients
    like closure-free ones, and the runs are equal bit for bit (losses included)."""
    counter = _Count()
    with mock.patch.object(ChaseOptimizer, "_mask_gradients", lambda self, sparse=True: counter(self, sparse)):
        mA, cA, lA = _closure_run(factory, True)
    assert counter.masked > 10 and cA.slim_count > 0
    if name.startswith("sgd") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert cA._fused_steps > 10  # the one-op SGD step (chase_ext.fused_step) takes closures too
    mB, cB, lB = _closure_run(factory, False)
    assert [float(a.detach()) for a in lA] == [float(b.detach()) for b in lB]
    for (n, a), b in zip(mA.named_parameters(), mB.parameters()):
        assert torch.equal(a, b), n
        for (k, x), y in zip(cA.optimizer.state[a].items(), cB.optimizer.state[b].values()):
            assert torch.equal(x, y), (n, k)


def test_a_wrapped_step_that_runs_the_closure_again_masks_after_it():
    """Should a listed optimizer evaluate the closure again inside its step (new,
    unmasked gradients), the step masks weights and state after it instead."""
    orig = O.Adam.step  # Adam without fused: the unfused path, which hands the closure over

    def twice(self, closure=None):
        if closure is not None:
            closure()  # the first loss
            closure()  # a rerun: new gradients, unmasked
        return orig(self)

    with mock.patch.object(O.Adam, "step", twice):
        model, chase, _ = _closure_run(SAFE[4][1], True, steps=12)  # checks the invariant each step
    assert chase._t == 12


def test_a_gradient_laid_out_unlike_its_mask_falls_back():
    model, chase = _chase(SAFE[1][1], update_interval=1000, channel_sparsity=0.0)
    p = chase._params[1]
    assert p.dim() == 4
    p.grad = torch.randn_like(p).contiguous(memory_format=torch.channels_last)
    for q in chase._params[:1] + chase._params[2:]:
        q.grad = torch.randn_like(q)
    g0 = p.grad.clone()
    assert not chase._mask_gradients()
    assert torch.equal(p.grad, g0)  # nothing changed
    chase.step()
    _masked_slots_zero(chase)


# ------------------------------------------------------------------ growth scores
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("factory", [
    lambda ps, fe: O.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, maximize=True, foreach=fe),
    lambda ps, fe: O.SGD(ps, lr=0.1, foreach=fe),
    lambda ps, fe: O.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-2, maximize=True, foreach=fe),
    lambda ps, fe: O.AdamW(ps, lr=1e-2, weight_decay=1e-2, foreach=fe),
], ids=["sgd-momentum", "sgd", "adam", "adamw"])
def test_listed_optimizers_leave_gradients_alone(factory, foreach):
    w = torch.nn.Parameter(torch.randn(20, 10))
    opt = factory([w], foreach)
    assert leaves_gradients_alone(opt)
    for _ in range(3):
        w.grad = torch.randn(20, 10)
        g, v = w.grad.clone(), w.grad._version
        opt.step()
        assert torch.equal(w.grad, g) and w.grad._version == v


def test_nesterov_foreach_writes_gradients_so_it_is_not_listed():
    w = torch.nn.Parameter(torch.randn(20, 10))
    opt = O.SGD([w], lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    assert not leaves_gradients_alone(opt)
    for _ in range(2):
        w.grad = torch.randn(20, 10)
        v = w.grad._version
        opt.step()
    assert w.grad._version != v


def test_update_steps_share_or_copy_gradients_and_give_the_same_run():
    """Uncopied scores (SGD) and copies (forced) give the same run; a wrapped step that
    writes a shared gradient anyway is caught by its version counter."""
    runs = []
    for share in (True, False):
        model, chase = _chase(SAFE[1][1], update_interval=3)
        with mock.patch.object(chase_optimizer, "leaves_gradients_alone", lambda opt: share):
            _train(model, chase, 24, check=_masked_slots_zero)
        runs.append((model, chase))
    (mA, cA), (mB, cB) = runs
    for a, b in zip(mA.parameters(), mB.parameters()):
        assert torch.equal(a, b)
    model, chase = _chase(lambda ps: O.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=True),
                          update_interval=3, channel_sparsity=0.0)
    with mock.patch.object(chase_optimizer, "leaves_gradients_alone", lambda opt: True):
        with pytest.raises(RuntimeError, match="changed the gradients of .* in place during step 3"):
            _train(model, chase, 3)
    assert chase.t == 3  # the step was taken, the update was not


def test_a_step_hook_makes_the_scores_copies():
    model, chase = _chase(SAFE[1][1], update_interval=1)

    def halve_gradients(opt, args, kwargs):
        for p in chase._params:
            if p.grad is not None:
                p.grad.mul_(0.5)

    chase.optimizer.register_step_pre_hook(halve_gradients)
    _train(model, chase, 2, check=_masked_slots_zero)  # no version error: the scores were copied


# ------------------------------------------------------------------ carried counts
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_carried_active_counts_equal_counting(scope):
    model, chase = _chase(SAFE[5][1], update_interval=2, scope=scope)
    counted = []

    def check(c):
        carried = (c._nnz_sum, None if c._nnz_per is None else list(c._nnz_per))
        c._forget_counts()
        fresh = c._nnz()
        if carried[0] is not None:
            assert carried[0] == sum(fresh)
            counted.append(c.t)
        if carried[1] is not None:
            assert carried[1] == fresh
        c._nnz_sum, c._nnz_per = carried  # put back what was carried: the run goes on with it

    _train(model, chase, 40, check=check)
    assert len(counted) > 10 and chase.slim_count > 0


# ------------------------------------------------------------------ finiteness check
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_finiteness_check_names_every_kind_on_device(device, value):
    """The update steps' check (one reduction per tensor on the CPU, one multi-tensor
    launch on CUDA): a non-finite weight or gradient is named, a reduction that only
    overflows on finite values is not."""
    model, chase = _chase(SAFE[1][1], channel_sparsity=0.0)
    model.to(device)
    for p in chase._params:
        p.grad = torch.full_like(p, 3e38)  # finite; any float32 sum of two of them overflows
    assert chase._nonfinite(grads=True) == []
    n0, n1 = chase.sparse_names()[0], chase.sparse_names()[2]
    with torch.no_grad():
        chase._params[0].view(-1)[3] = value
        chase._params[2].grad.view(-1)[5] = value
    assert chase._nonfinite(grads=True) == [f"weight {n0!r}", f"gradient of {n1!r}"]
    assert chase._nonfinite(grads=False) == [f"weight {n0!r}"]


# ------------------------------------------------------------------ update steps leave masking to the op
def _one_update_step(chase, model, grad_fill=None):
    x, y = example_input("vgg_small", batch=8), torch.randint(0, 10, (8,))
    chase.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    if grad_fill:
        grad_fill()
    chase.step()


def test_update_step_masks_through_the_op_and_an_overflowed_masked_slot_is_no_error():
    """On an update step the weights are masked by the mask update itself; a masked slot
    that the wrapped step overflows is zeroed, not refused (as when masking came first)."""
    model, chase = _chase(lambda ps: O.SGD(ps, lr=10.0), update_interval=1, channel_sparsity=0.0)
    masks = chase.masks
    i = next(i for i, n in enumerate(chase.sparse_names()) if not bool(masks[n].all()))  # one with masked slots
    p = chase._params[i]
    slot = int(torch.nonzero(~masks[chase.sparse_names()[i]].flatten())[0])

    def huge():  # finite, but w - lr * g overflows there
        p.grad.view(-1)[slot] = 3e38

    _one_update_step(chase, model, huge)
    assert chase.t == 1
    _masked_slots_zero(chase)


def test_an_update_step_that_fails_still_leaves_masked_slots_zero():
    model, chase = _chase(SAFE[1][1], update_interval=1, channel_sparsity=0.0)
    with mock.patch.object(ChaseOptimizer, "_update", side_effect=RuntimeError("planted")):
        with pytest.raises(RuntimeError, match="planted"):
            _one_update_step(chase, model)
    assert chase.t == 1
    _masked_slots_zero(chase)


def test_an_eps_that_float16_rounds_to_zero_is_not_zero_safe():
    """Adam's default eps 1e-8 (Adagrad's 1e-10) is 0 in float16, where the single-tensor
    rules add it: 0 / (sqrt(0) + 0) = NaN. Such a step masks weights and state after it."""
    w = torch.nn.Parameter(torch.zeros(3))
    for opt in (O.Adam([w]), O.Adagrad([w]), O.RMSprop([w])):
        assert keeps_zero_slots(opt) and keeps_zero_slots(opt, torch.bfloat16)
        assert not keeps_zero_slots(opt, torch.float16), type(opt).__name__
    assert keeps_zero_slots(O.Adam([w], eps=1e-4), torch.float16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).half()
    chase = ChaseOptimizer(O.Adam(model.parameters(), lr=1e-3), model, density=0.3, total_steps=50,
                           update_interval=25, t_explore_end=0.5)
    x = torch.randn(16, 8).half()
    for _ in range(3):
        chase.zero_grad()
        model(x).float().square().mean().backward()
        chase.step()
    for n, p in zip(chase.sparse_names(), chase._params):  # NaN reads as non-zero here
        assert not bool(p.detach()[~chase.masks[n]].any()), n  # (active slots: torch's own fp16 Adam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_eps_survival_is_the_dtypes_rounding(dtype):
    """The check is arithmetic on torch.finfo (no tensor, so plain steps read no scalar);
    it agrees with converting the number to a tensor of the dtype, around the boundary too."""
    from chase_ext.grad_masking import _survives

    fi = torch.finfo(dtype)
    sub = fi.tiny * fi.eps  # the smallest positive subnormal
    for v in (sub / 4, sub / 2, sub / 2 * (1 + 2**-20), sub * 0.75, sub, 1e-10, 1e-8, 1e-4, 1.0, 1e300):
        assert _survives(v, dtype) == (float(torch.tensor(v, dtype=dtype)) > 0), v
