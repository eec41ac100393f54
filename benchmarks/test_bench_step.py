"""What a ChaseOptimizer step costs on top of the optimizer it wraps (issue 15).

ResNet-50 (built in code, 25.5 M sparse weights, density 0.1), SGD with momentum 0.9 and
weight decay, the same gradients in every model (one real backward, copied), parameters
contiguous or channels_last. Variants, interleaved in rotating rounds:

* ``sgd_step``: the plain ``torch.optim.SGD`` step;
* ``chase_plain_step``: ``ChaseOptimizer.step`` when no update or channel event is due
  (the step a training loop takes almost always; on the CPU the masking and the SGD step
  of the sparse weights are one op there, ``chase_ext.fused_step``);
* ``chase_plain_step_unfused``: the same with ``CHASE_EXT_FUSED_STEP=0``: the gradients
  masked, then the wrapped SGD step (what the plain step was before the fused op);
* ``chase_plain_step_closure``: the plain step called as ``step(closure)``, as Lightning's
  automatic optimization calls it (the closure returns a loss and leaves the gradients
  alone, so the step itself is timed);
* ``chase_update_step``: a step that is a parameter update (``update_interval=1``:
  finiteness check, the wrapped step, the fused mask update), channel part off;
* ``reference_update_step``: the same update step with ``backend="reference"``, i.e. the
  whole step with the vectorized PyTorch ops (issue 15's yardstick: >= 20x);
* ``*_fallback``: the same Chase steps around a subclass of SGD with nothing overridden,
  which ``chase_ext.grad_masking`` does not list: plain steps mask weights and momentum
  after the step, update steps copy the gradients (the path before gradient masking,
  measured in the same rounds).

Recorded per device and layout: medians, ``chase_plain_over_sgd`` (target <= 1.2 on the
CPU), the plain-step overhead in ms (target <= 0.3 ms on an H200), ``chase_update_step``
(target <= 5 ms there) and ``reference_over_chase_update`` (target >= 20). After the
timing, masked weights and momentum must still be exactly 0 in both Chase models.

``test_adam_step_cost_side_by_side``: the plain step with ``torch.optim.AdamW``
(weight decay 0.05), same model and gradients, contiguous:

* ``adamw_step`` / ``adamw_fused_step``: AdamW's step on the dense model, torch's default
  rule (single-tensor on the CPU, multi-tensor on CUDA) and ``fused=True``;
* ``adamw_step_masked_model``: the default rule on a copy whose weights, gradients and
  state are 0 where Chase's masks are clear (what any masked sparse training pays; on the
  CPU, MKL's ``sqrt`` is several times slower on zeros);
* ``chase_plain_step_adamw`` / ``chase_plain_step_adamw_fused``: ChaseOptimizer around
  each (the fused one runs ``masked_adam_``, ``chase_ext.fused_step``), and
  ``chase_plain_step_adamw_fused_unfused`` with ``CHASE_EXT_FUSED_STEP=0``.

``CHASE_BENCH_QUICK=1``: width / 8, 64x64 inputs, one round, nothing saved.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from chase_ext import ChaseOptimizer
from chase_ext.measure import default_threads
from chase_ext.training import pick_backend

from conftest import QUICK, RESULTS, machine_name
from models import resnet50
from timing import interleaved, save_results

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
LAYOUTS = ["contiguous", "channels_last"]
DENSITY = 0.1
THREADS = int(os.environ.get("CHASE_BENCH_THREADS", 0)) or default_threads()
RESULTS_FILE = os.path.join(RESULTS, machine_name() + ".json")


class UnlistedSGD(torch.optim.SGD):
    """SGD under another name: not in chase_ext.grad_masking's lists, so the fallback runs."""


def _sgd(model, cls=torch.optim.SGD):
    return cls(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def build(device: str, memory_format: str) -> dict:
    """Copies of one ResNet-50 with the same gradients, and their optimizers."""
    torch.manual_seed(0)
    size = 64 if QUICK else 224
    base = resnet50(width_div=8 if QUICK else 1).to(device)
    if memory_format == "channels_last":
        base = base.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, size, size, device=device)
    F.cross_entropy(base(x), torch.randint(0, 1000, (2,), device=device)).backward()
    keys = ("sgd", "plain", "plain_unfused", "plain_closure", "plain_fb", "update", "update_fb", "reference")
    models = {k: copy.deepcopy(base) for k in keys + (("update_compact",) if device == "cuda" else ())}
    for m in models.values():  # the same gradients everywhere, in the parameters' layout
        for p, q in zip(base.parameters(), m.parameters()):
            q.grad = p.grad.clone()
    backend = pick_backend(device)
    opt = {"sgd_step": _sgd(models["sgd"])}
    # updates every 100k steps: every timed step is a plain step
    for name, key, cls in (("chase_plain_step", "plain", torch.optim.SGD),
                           ("chase_plain_step_unfused", "plain_unfused", torch.optim.SGD),
                           ("chase_plain_step_closure", "plain_closure", torch.optim.SGD),
                           ("chase_plain_step_fallback", "plain_fb", UnlistedSGD)):
        opt[name] = ChaseOptimizer(_sgd(models[key], cls), models[key], density=DENSITY, total_steps=10**6,
                                   update_interval=100_000, backend=backend)
    for name, key, be, cls in (("chase_update_step", "update", backend, torch.optim.SGD),
                               ("chase_update_step_fallback", "update_fb", backend, UnlistedSGD),
                               ("reference_update_step", "reference", "reference", torch.optim.SGD)):
        opt[name] = ChaseOptimizer(_sgd(models[key], cls), models[key], density=DENSITY, total_steps=10**6,
                                   update_interval=1, backend=be)
    if device == "cuda":  # the same update step with the compacting select (CHASE_EXT_CUDA_SELECT=compact)
        opt["chase_update_step_compact_select"] = ChaseOptimizer(
            _sgd(models["update_compact"]), models["update_compact"], density=DENSITY, total_steps=10**6,
            update_interval=1, backend=backend)
    for o in opt.values():
        o.step()  # momentum buffers exist from here on
    return {"opt": opt, "backend": backend, "n_sparse": opt["chase_plain_step"].total_sparse}


def _stepper(name: str, opt):
    """opt.step, under CHASE_EXT_CUDA_SELECT=compact or CHASE_EXT_FUSED_STEP=0 for the
    variants named so, and with a closure for ``*_closure``."""
    env = {"_compact_select": {"CHASE_EXT_CUDA_SELECT": "compact"},
           "_unfused": {"CHASE_EXT_FUSED_STEP": "0"}}
    if name.endswith("_closure"):
        loss = torch.zeros(())
        return lambda: opt.step(lambda: loss)
    extra = next((v for k, v in env.items() if name.endswith(k)), None)
    if extra is None:
        return opt.step

    def step():
        with mock.patch.dict(os.environ, extra):
            opt.step()
    return step


def _run_facts(device: str, backend: str) -> dict:
    """Where and when a step-cost figure was measured."""
    return {"backend": backend, "threads": THREADS if device == "cpu" else None,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "quick": QUICK,
            "load_avg_1m_at_start": os.getloadavg()[0]}


def _masked_slots_zero(chase: ChaseOptimizer) -> bool:
    for n, p in zip(chase.sparse_names(), chase._params):
        off = ~chase.masks[n]
        buf = chase.optimizer.state[p].get("momentum_buffer")
        if bool(p.detach()[off].any()) or (buf is not None and bool(buf[off].any())):
            return False
    return True


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_step_cost_side_by_side(device, memory_format):
    case = build(device, memory_format)
    opt = case["opt"]
    rounds = 1 if QUICK else (25 if device == "cuda" else 7)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        if device == "cuda":  # warm-up: first launches and the caching allocator
            for o in opt.values():
                o.step()
        times = interleaved({k: (lambda: (), _stepper(k, o)) for k, o in opt.items()}, rounds, device)
    finally:
        torch.set_num_threads(old)
    for k in opt:
        if k != "sgd_step":
            assert _masked_slots_zero(opt[k]), k
    assert opt["chase_plain_step_unfused"]._fused_steps == 0
    if device == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert opt["chase_plain_step"]._fused_steps > 0  # the fused op ran (tests/test_fused_step.py)
    med = {k: statistics.median(v) for k, v in times.items()}
    payload = {
        "model": "resnet50", "optimizer": "SGD(momentum=0.9, weight_decay=5e-4)", "density": DENSITY,
        "memory_format": memory_format, "sparse_values": case["n_sparse"], "rounds": rounds,
        "median_s": med,
        "chase_plain_over_sgd": med["chase_plain_step"] / med["sgd_step"],
        "chase_plain_unfused_over_sgd": med["chase_plain_step_unfused"] / med["sgd_step"],
        "chase_plain_closure_over_sgd": med["chase_plain_step_closure"] / med["sgd_step"],
        "fused_plain_steps": opt["chase_plain_step"]._fused_steps,
        "chase_plain_overhead_ms": 1e3 * (med["chase_plain_step"] - med["sgd_step"]),
        "chase_update_over_sgd": med["chase_update_step"] / med["sgd_step"],
        "fallback_plain_over_sgd": med["chase_plain_step_fallback"] / med["sgd_step"],
        "fallback_update_over_sgd": med["chase_update_step_fallback"] / med["sgd_step"],
        "reference_over_chase_update": med["reference_update_step"] / med["chase_update_step"],
        **({"compact_select_update_over_sgd": med["chase_update_step_compact_select"] / med["sgd_step"],
            "compact_select_update_ms": 1e3 * med["chase_update_step_compact_select"]}
           if "chase_update_step_compact_select" in med else {}),
        **_run_facts(device, case["backend"]),
    }
    key = f"step_cost_{device}_{memory_format}" + (f"_{THREADS}t" if device == "cpu" else "")
    print(key, payload)
    if not QUICK:
        save_results(RESULTS_FILE, key, payload)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_apply_side_by_side(device):
    """The pass a step adds, alone, on ResNet-50 shapes (float32, density 0.1), through
    ``chase_ext.layout`` as ChaseOptimizer calls it, contiguous and channels_last:
    weights + momentum with masked slots holding values (the fallback path after a dense
    step: every masked slot is written), the same already masked (nothing to write), and
    the gradients alone (the gradient-masking path). Inputs are fresh copies each round
    (copying is not timed); the floor is one pass at the copy bandwidth measured in the
    same rounds (read + write of each tensor, the mask read once)."""
    ops = pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")
    from chase_ext import layout
    from shapes import resnet50_weight_shapes
    from timing import copy_variant

    g = torch.Generator().manual_seed(0)
    shapes = resnet50_weight_shapes(width_div=8 if QUICK else 1)
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    base = {}
    for name, mf in fmt.items():
        def lay(t, mf=mf):
            return t.to(device).contiguous(memory_format=mf) if t.dim() == 4 else t.to(device)
        ms = [lay(torch.rand(s, generator=g) < DENSITY) for s in shapes]
        ws = [lay(torch.randn(s, generator=g)) for s in shapes]
        bs = [lay(torch.randn(s, generator=g)) for s in shapes]
        base[name] = (ms, ws, bs)
    n = sum(m.numel() for m in base["contiguous"][0])
    owner2 = list(range(len(shapes))) * 2

    def apply(ts, ms, owner):
        layout.masked_apply_(ops, ts, ms, owner)

    variants = {}
    for name in fmt:
        ms, ws, bs = base[name]
        clean = [w * m for w, m in zip(ws, ms)] + [b * m for b, m in zip(bs, ms)]
        variants[f"w_momentum_dirty_{name}"] = (
            lambda ms=ms, ws=ws, bs=bs: ([t.clone(memory_format=torch.preserve_format) for t in ws + bs], ms, owner2),
            apply)
        variants[f"w_momentum_clean_{name}"] = (lambda ms=ms, clean=clean: (clean, ms, owner2), apply)
        variants[f"gradients_{name}"] = (
            lambda ms=ms, ws=ws: ([t.clone(memory_format=torch.preserve_format) for t in ws], ms,
                                  list(range(len(shapes)))), apply)
    variants["copy"], moved = copy_variant(device)
    rounds = 1 if QUICK else (25 if device == "cuda" else 7)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        med = {k: statistics.median(v) for k, v in interleaved(variants, rounds, device).items()}
    finally:
        torch.set_num_threads(old)
    bw = moved / med.pop("copy")
    floor = {"w_momentum": n * (2 * 4 * 2 + 1) / bw, "gradients": n * (2 * 4 + 1) / bw}
    over = {k: v / floor["gradients" if k.startswith("gradients") else "w_momentum"] for k, v in med.items()}
    payload = {"n": n, "rounds": rounds, "median_s": med, "over_floor": over, "copy_bandwidth_GBps": bw / 1e9,
               "channels_last_over_contiguous": {
                   k: med[f"{k}_channels_last"] / med[f"{k}_contiguous"]
                   for k in ("w_momentum_dirty", "w_momentum_clean", "gradients")},
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "threads": THREADS if device == "cpu" else None,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "quick": QUICK}
    print(f"masked_apply_{device}", payload)
    if not QUICK:
        save_results(RESULTS_FILE, f"step_masked_apply_{device}", payload)


def _adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_cost_side_by_side(device):
    torch.manual_seed(0)
    size = 64 if QUICK else 224
    base = resnet50(width_div=8 if QUICK else 1).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    F.cross_entropy(base(x), torch.randint(0, 1000, (2,), device=device)).backward()
    keys = ("dense", "dense_fused", "masked", "plain", "plain_fused", "plain_fused_unfused")
    models = {k: copy.deepcopy(base) for k in keys}
    for m in models.values():
        for p, q in zip(base.parameters(), m.parameters()):
            q.grad = p.grad.clone()
    backend = pick_backend(device)
    opt = {"adamw_step": _adamw(models["dense"].parameters()),
           "adamw_fused_step": _adamw(models["dense_fused"].parameters(), fused=True)}
    for name, key, kw in (("chase_plain_step_adamw", "plain", {}),
                          ("chase_plain_step_adamw_fused", "plain_fused", {"fused": True}),
                          ("chase_plain_step_adamw_fused_unfused", "plain_fused_unfused", {"fused": True})):
        opt[name] = ChaseOptimizer(_adamw(models[key].parameters(), **kw), models[key], density=DENSITY,
                                   total_steps=10**6, update_interval=100_000, backend=backend)
    # the masked model: Chase's masks on weights and gradients, no Chase in the step
    masks = dict(opt["chase_plain_step_adamw"].masks)
    with torch.no_grad():
        for n, p in models["masked"].named_parameters():
            if n in masks:
                p.mul_(masks[n])
                p.grad.mul_(masks[n])
    opt["adamw_step_masked_model"] = _adamw(models["masked"].parameters())
    for o in opt.values():
        o.step()  # the state exists from here on
    rounds = 1 if QUICK else (25 if device == "cuda" else 7)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        if device == "cuda":
            for o in opt.values():
                o.step()
        times = interleaved({k: (lambda: (), _stepper(k, o)) for k, o in opt.items()}, rounds, device)
    finally:
        torch.set_num_threads(old)
    for k in ("chase_plain_step_adamw", "chase_plain_step_adamw_fused", "chase_plain_step_adamw_fused_unfused"):
        chase = opt[k]
        for n, p in zip(chase.sparse_names(), chase._params):
            off = ~chase.masks[n]
            assert not bool(p.detach()[off].any()), (k, n)
            for sk, v in chase.optimizer.state[p].items():
                assert sk == "step" or not bool(v[off].any()), (k, n, sk)
    assert opt["chase_plain_step_adamw_fused_unfused"]._fused_steps == 0
    med = {k: statistics.median(v) for k, v in times.items()}
    payload = {
        "model": "resnet50", "optimizer": "AdamW(lr=1e-3, weight_decay=0.05)", "density": DENSITY,
        "memory_format": "contiguous", "sparse_values": opt["chase_plain_step_adamw"].total_sparse,
        "rounds": rounds, "median_s": med,
        "masked_model_over_adamw": med["adamw_step_masked_model"] / med["adamw_step"],
        "chase_plain_over_adamw": med["chase_plain_step_adamw"] / med["adamw_step"],
        "chase_plain_over_masked_model": med["chase_plain_step_adamw"] / med["adamw_step_masked_model"],
        "adamw_fused_over_adamw": med["adamw_fused_step"] / med["adamw_step"],
        "chase_plain_fused_over_adamw_fused": med["chase_plain_step_adamw_fused"] / med["adamw_fused_step"],
        "chase_plain_fused_unfused_over_adamw_fused":
            med["chase_plain_step_adamw_fused_unfused"] / med["adamw_fused_step"],
        "fused_plain_steps": opt["chase_plain_step_adamw_fused"]._fused_steps,
        **_run_facts(device, backend),
    }
    key = f"step_cost_adamw_{device}" + (f"_{THREADS}t" if device == "cpu" else "")
    print(key, payload)
    if not QUICK:
        save_results(RESULTS_FILE, key, payload)
