"""What slimming buys: inference and training speed of the physically narrower model.

1. Inference, dense vs masked vs slim: ResNet-50 (224x224, batch 8) at S_c = 0.3, 0.4,
   0.5 and VGG-16-BN for CIFAR (32x32, batch 64) at S_c = 0.5. The channels that go are
   chosen by ``ChaseOptimizer`` itself (density 0.1, a schedule that reaches S_c at step 1
   and re-grows at step 2, two steps on one random sample); the masked model is a deep
   copy taken before ``chase.slim_()``. All three run in eval mode under
   ``torch.inference_mode``, channels_last, the same batch and thread count, interleaved
   (``chase_ext.measure.measure_throughput``). Recorded: median latency, images/s,
   speedup slim/dense, MAC ratio dense/slim (``count_macs``), efficiency = speedup / MAC
   ratio. Slim and masked outputs are compared before timing.
2. Training steps/s, Chase with ``slim_during_training=True`` vs masked only (VGG-16,
   batch 32, same config otherwise): both runs step in lockstep (A B A B ...) and the
   steps after the last channel event and the last parameter update are timed.
   Also the peak extra memory of ``slim_()`` (``slim_memory.py``, in a child process).
3. Per-step overhead of ``ChaseOptimizer.step`` on a non-update step vs the wrapped SGD
   step (same model, same gradients), and the masked apply alone.
4. ``round_to`` None vs 8 vs 16 (slim ResNet-50 at S_c = 0.5, channels_last): on CPU in
   float32 with 1 thread, and on CUDA in float16 (None vs 8) where there is a GPU.

``CHASE_BENCH_QUICK=1`` shrinks every model 8x in width (ResNet-50 at 64x64), uses tiny
batches and one round, and saves nothing. Full runs merge their figures into
``benchmarks/results/<machine>.json``.
"""
from __future__ import annotations

import copy
import functools
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from chase_ext import ChaseOptimizer
from chase_ext.measure import count_macs, count_params, default_threads, measure_throughput
from chase_ext.training import pick_backend

from conftest import QUICK, RESULTS, machine_name
from models import resnet50, vgg_cifar
from timing import copy_bandwidth, interleaved, save_results

BACKEND = pick_backend("cpu")
DENSITY = 0.1
WDIV = 8 if QUICK else 1
# The same for every variant; recorded with the figures. Default: half the cores (1 on the
# 2-core CI box), as the demo does: with 2 OpenMP threads on a box shared with other jobs a
# descheduled thread stalls every op (NOTES.md measured up to 13 ms per conv); override
# with CHASE_BENCH_THREADS.
THREADS = int(os.environ.get("CHASE_BENCH_THREADS", 0)) or default_threads()
RESULTS_FILE = os.path.join(RESULTS, machine_name() + ".json")

# model name -> (builder, input size, batch for inference timing, num_classes)
MODELS = {
    "resnet50": (lambda: resnet50(width_div=WDIV), 64 if QUICK else 224, 2 if QUICK else 8, 1000),
    "vgg16": (lambda: vgg_cifar("vgg16", width_div=WDIV), 32, 4 if QUICK else 64, 10),
}
INFER_CASES = [("resnet50", 0.3), ("resnet50", 0.4), ("resnet50", 0.5), ("vgg16", 0.5)]
if QUICK:
    INFER_CASES = [("resnet50", 0.4), ("vgg16", 0.5)]
VARIANTS = ("dense", "masked", "slim")


def _save(key: str, payload: dict) -> None:
    print(key, payload)
    if not QUICK:
        save_results(RESULTS_FILE, key, payload)


def _common() -> dict:
    return {"threads": THREADS, "torch": torch.__version__, "backend": BACKEND,
            "quick": QUICK, "date": time.strftime("%Y-%m-%d"), "load_avg_1m_at_start": os.getloadavg()[0]}


def _chase_steps(model, chase, x, y, steps):
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        chase.zero_grad()
        loss.backward()
        chase.step()
    del loss  # no stale graph alive across slimming


# --------------------------------------------------------------------------- 1. inference
@functools.lru_cache(maxsize=None)
def inference_case(name: str, sc: float, round_to: int | None = None) -> dict:
    """Dense, masked and slim copies of one model; channels chosen by ChaseOptimizer."""
    build, size, batch, ncls = MODELS[name]
    torch.manual_seed(0)
    model = build()
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, size, size)
    y = torch.randint(0, ncls, (1,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # event at step 1 reaches S_c (channel_end=1), the update at step 2 re-grows to B
    chase = ChaseOptimizer(opt, model, density=DENSITY, total_steps=4, channel_sparsity=sc, example_inputs=x,
                           update_interval=2, channel_interval=1, channel_end=1, round_to=round_to,
                           backend=BACKEND)
    model.train()
    _chase_steps(model, chase, x, y, 2)
    report = chase.channel_report()
    masked = copy.deepcopy(model)
    t0 = time.perf_counter()
    chase.slim_()
    slim_s = time.perf_counter() - t0
    slim = model
    models = {"dense": dense, "masked": masked, "slim": slim}
    for m in models.values():
        m.eval()
    bx = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    # the slim model must compute what the masked one does, or the timing means nothing
    with torch.inference_mode():
        a, b = masked(bx[:2]), slim(bx[:2])
    scale = float(a.abs().max())
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * scale + 1e-6)
    macs = {k: count_macs(m, bx[:1]) for k, m in models.items()}
    c0 = sum(r["channels"] for r in report)
    c1 = sum(r["live"] for r in report)
    return {
        "models": models, "batch": bx, "macs": macs, "report": report, "slim_seconds": slim_s,
        "max_abs_diff": float((a - b).abs().max()), "max_abs_out": scale,
        "channels_before": c0, "channels_after": c1, "params": {k: count_params(m) for k, m in models.items()},
    }


def _cl(m):
    return m.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name,sc", INFER_CASES, ids=[f"{n}-sc{s}" for n, s in INFER_CASES])
def test_inference_side_by_side(name, sc):
    """Interleaved dense / masked / slim inference; medians, speedup, MAC ratio, efficiency."""
    case = inference_case(name, sc)
    rounds = 1 if QUICK else (7 if name == "resnet50" else 9)
    tp = measure_throughput(case["models"], case["batch"], rounds=rounds, warmup=1 if QUICK else 2,
                            threads=THREADS, channels_last=True)
    iters, batch = tp["iters"], tp["batch"]
    per = {}
    for v in VARIANTS:
        lat = statistics.median(tp[v]["seconds"]) / iters
        per[v] = {
            "median_latency_s": lat,
            "images_per_s": batch / lat,
            "latency_spread_s": [min(tp[v]["seconds"]) / iters, max(tp[v]["seconds"]) / iters],
            "macs_per_image": case["macs"][v]["macs"],
            "nonzero_macs_per_image": case["macs"][v]["nonzero_macs"],
            "params": case["params"][v],
        }
    speedup = per["dense"]["median_latency_s"] / per["slim"]["median_latency_s"]
    mac_ratio = per["dense"]["macs_per_image"] / per["slim"]["macs_per_image"]
    payload = {
        "model": name, "channel_sparsity": sc, "density": DENSITY, "batch": batch,
        "input": list(case["batch"].shape[1:]), "rounds": tp["rounds"], "iters_per_round": iters,
        "memory_format": tp["memory_format"],
        "variants": per,
        "speedup_slim_over_dense": speedup,
        "speedup_masked_over_dense": per["dense"]["median_latency_s"] / per["masked"]["median_latency_s"],
        "mac_ratio_dense_over_slim": mac_ratio,
        "efficiency": speedup / mac_ratio,
        "efficiency_target": 0.85,
        "channels_before": case["channels_before"], "channels_after": case["channels_after"],
        "live_per_group": {r["group"]: [r["channels"], r["live"]] for r in case["report"]},
        "slim_vs_masked_max_abs_diff": case["max_abs_diff"], "max_abs_output": case["max_abs_out"],
        "slim_seconds": case["slim_seconds"],
        **_common(),
    }
    _save(f"inference_{name}_sc{sc}", payload)


PEDANTIC_INFER = [(n, s, v) for n, s in INFER_CASES for v in VARIANTS]


@pytest.mark.parametrize("name,sc,variant", PEDANTIC_INFER, ids=[f"{n}-sc{s}-{v}" for n, s, v in PEDANTIC_INFER])
def test_inference(benchmark, name, sc, variant):
    case = inference_case(name, sc)
    model = _cl(copy.deepcopy(case["models"][variant]))
    bx = case["batch"].contiguous(memory_format=torch.channels_last)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)

    def run():
        with torch.inference_mode():
            model(bx)

    try:
        run()  # warm-up
        benchmark.extra_info.update(model=name, channel_sparsity=sc, variant=variant, batch=int(bx.shape[0]),
                                    macs_per_image=case["macs"][variant]["macs"])
        benchmark.pedantic(run, rounds=1 if QUICK else 3, iterations=1)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_slim_peak_memory():
    """Peak extra memory of slim_() vs a copy of every parameter and state (slim_memory.py)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(THREADS))
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "slim_memory.py"),
                          str(WDIV), str(MODELS["resnet50"][1] if QUICK else 64)],
                         env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["slim_peak_extra_over_largest_tensor"] = r["slim_peak_extra_bytes"] / r["largest_tensor_bytes"]
    r["control_over_params_and_state"] = r["control_copy_all_peak_extra_bytes"] / r["params_and_state_bytes"]
    _save("slim_peak_memory", {**r, **_common()})


# --------------------------------------------------------------------------- 2. training
# full: events at t = 5, 10, 15, 20 (the last reaches S_c), updates at 10 and 20 only
# (t_end = 21), then 40 plain steps are timed. quick: events at 1, 2, update at 2.
TRAIN = dict(total_steps=8, update_interval=2, channel_interval=1, channel_end=2, t_end=3) if QUICK else \
    dict(total_steps=60, update_interval=10, channel_interval=5, channel_end=20, t_end=21)
TRAIN_BATCH = 4 if QUICK else 32
TRAIN_SC = 0.5


def _train_run(slim: bool):
    torch.manual_seed(0)
    model = vgg_cifar("vgg16", width_div=WDIV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    chase = ChaseOptimizer(opt, model, density=DENSITY, channel_sparsity=TRAIN_SC,
                           example_inputs=torch.randn(2, 3, 32, 32), slim_during_training=slim,
                           backend=BACKEND, **TRAIN)
    return model, chase


def _data(n_batches=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(TRAIN_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (TRAIN_BATCH,), generator=g))
            for _ in range(n_batches)]


def _train_step(model, chase, x, y):
    loss = F.cross_entropy(model(x), y)
    chase.zero_grad()
    loss.backward()
    chase.step()
    return float(loss.detach())


@functools.lru_cache(maxsize=None)
def training_pair() -> dict:
    """Both runs from the same start, stepped in lockstep (alternating which goes first)."""
    runs = {"masked": _train_run(False), "slim": _train_run(True)}
    data = _data()
    T = TRAIN["total_steps"]
    times = {k: [] for k in runs}
    losses = {k: [] for k in runs}
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for m, _ in runs.values():
            m.train()
        for t in range(T):
            x, y = data[t % len(data)]
            order = list(runs) if t % 2 == 0 else list(runs)[::-1]
            for k in order:
                m, c = runs[k]
                t0 = time.perf_counter()
                losses[k].append(_train_step(m, c, x, y))
                times[k].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return {"runs": runs, "times": times, "losses": losses, "data": data}


def test_training_side_by_side():
    pair = training_pair()
    cfg = pair["runs"]["slim"][1].config
    last_event = cfg.last_channel_event
    last_update = max(t for t in range(1, cfg.total_steps + 1) if t % cfg.update_steps == 0 and t < cfg.t_end_steps)
    start = max(last_event, last_update)  # steps t > start are plain steps at the final width
    per = {}
    for k, ts in pair["times"].items():
        window = ts[start:]  # ts[i] is step t = i + 1
        per[k] = {
            "steps_timed": len(window),
            "median_step_s": statistics.median(window),
            "steps_per_s_median": 1 / statistics.median(window),
            "steps_per_s_mean": len(window) / sum(window),
            "whole_run_s": sum(ts),
            "channel_phase_s": sum(ts[:start]),
            "final_loss": pair["losses"][k][-1],
        }
    m_masked, c_masked = pair["runs"]["masked"]
    m_slim, c_slim = pair["runs"]["slim"]
    ex = pair["data"][0][0][:1]
    mac_ratio = count_macs(m_masked, ex)["macs"] / count_macs(m_slim, ex)["macs"]
    speed = per["slim"]["steps_per_s_median"] / per["masked"]["steps_per_s_median"]
    rep = c_slim.channel_report()
    payload = {
        "model": "vgg16_cifar", "batch": TRAIN_BATCH, "density": DENSITY, "channel_sparsity": TRAIN_SC,
        "schedule": dict(TRAIN), "last_channel_event": last_event, "last_update": last_update,
        "timed_steps": f"{start + 1}..{cfg.total_steps}",
        "variants": per,
        "speedup_slim_over_masked_steps_per_s": speed,
        "mac_ratio_masked_over_slim": mac_ratio,
        "efficiency": speed / mac_ratio,
        "channels_before": sum(r["channels"] for r in rep), "channels_after": sum(r["live"] for r in rep),
        "active_weights": {"masked": c_masked.active_count(), "slim": c_slim.active_count(),
                           "budget": c_slim.budget},
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(pair["losses"]["masked"], pair["losses"]["slim"])),
        "step_order": "lockstep, alternating which run goes first",
        **_common(),
    }
    # phase A (soft bound) may hold more than B between updates; both runs hold the same count
    assert c_slim.active_count() == c_masked.active_count()
    _save("training_vgg16_slim_vs_masked", payload)


@pytest.mark.parametrize("variant", ["masked", "slim"])
def test_training_step(benchmark, variant):
    """One training step at the final width (after the channel phase), per variant."""
    pair = training_pair()
    m, c = pair["runs"][variant]
    x, y = pair["data"][0]
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        benchmark.extra_info.update(variant=variant, batch=TRAIN_BATCH)
        benchmark.pedantic(_train_step, args=(m, c, x, y), rounds=1 if QUICK else 5, iterations=1)
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- 3. step overhead
OVERHEAD_MODELS = {
    "vgg16": (lambda: vgg_cifar("vgg16", width_div=WDIV), 32, 10),
    "resnet50": (lambda: resnet50(width_div=WDIV), 64 if QUICK else 224, 1000),
}


@functools.lru_cache(maxsize=None)
def overhead_case(name: str) -> dict:
    build, size, ncls = OVERHEAD_MODELS[name]
    torch.manual_seed(0)
    plain_model = build()
    chase_model = copy.deepcopy(plain_model)
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, ncls, (2,))
    F.cross_entropy(plain_model(x), y).backward()
    for p, q in zip(plain_model.parameters(), chase_model.parameters()):
        q.grad = p.grad.clone()  # same gradients in both
    plain = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    inner = torch.optim.SGD(chase_model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    # updates every 100k steps, events at t % 100k == 50k: every timed step is a plain step
    chase = ChaseOptimizer(inner, chase_model, density=DENSITY, total_steps=10**6, update_interval=100_000,
                           channel_sparsity=0.5, example_inputs=x[:1], backend=BACKEND)
    # the same, but every step is a parameter update (finiteness check, |gradient| scores,
    # mask counts, the fused mask update), channel part off
    update_model = copy.deepcopy(plain_model)
    for p, q in zip(plain_model.parameters(), update_model.parameters()):
        q.grad = p.grad.clone()
    updating = ChaseOptimizer(torch.optim.SGD(update_model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4),
                              update_model, density=DENSITY, total_steps=10**6, update_interval=1, backend=BACKEND)
    plain.step()
    chase.step()  # momentum buffers exist from here on
    updating.step()
    n_sparse = chase.total_sparse
    return {"plain": plain, "chase": chase, "updating": updating, "n_sparse": n_sparse,
            "n_params": count_params(plain_model)}


def test_step_overhead_side_by_side():
    rounds = 3 if QUICK else 41
    res = {}
    for name in OVERHEAD_MODELS:
        case = overhead_case(name)
        plain, chase, updating = case["plain"], case["chase"], case["updating"]

        def masked_apply():
            with torch.no_grad():
                chase._masked_apply()  # internal: the part of chase.step() that plain SGD lacks

        t_before = chase.t
        old = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            times = interleaved({
                "plain_sgd_step": (lambda: (), plain.step),
                "chase_step": (lambda: (), chase.step),
                "masked_apply_only": (lambda: (), masked_apply),
                "chase_update_step": (lambda: (), updating.step),
            }, rounds)
        finally:
            torch.set_num_threads(old)
        assert chase.t == t_before + rounds
        med = {k: statistics.median(v) for k, v in times.items()}
        n = case["n_sparse"]
        # masked apply: read+write W and the momentum buffer (4 B each), read the mask (1 B) twice
        bytes_moved = n * (2 * 4 + 2 * 4 + 2 * 1)
        res[name] = {
            "median_s": med,
            "overhead_s": med["chase_step"] - med["plain_sgd_step"],
            "chase_over_plain": med["chase_step"] / med["plain_sgd_step"],
            "update_step_over_plain": med["chase_update_step"] / med["plain_sgd_step"],
            "sparse_values": n, "params": case["n_params"], "rounds": rounds,
            "masked_apply_bytes": bytes_moved,
        }
    bw = copy_bandwidth()
    for r in res.values():
        r["masked_apply_bandwidth_floor_s"] = r["masked_apply_bytes"] / bw
        r["masked_apply_over_floor"] = r["median_s"]["masked_apply_only"] / r["masked_apply_bandwidth_floor_s"]
    payload = {"models": res, "copy_bandwidth_GBps": bw / 1e9, "optimizer": "SGD(momentum=0.9, weight_decay)",
               **_common()}
    _save("step_overhead", payload)


@pytest.mark.parametrize("name", list(OVERHEAD_MODELS))
@pytest.mark.parametrize("variant", ["plain_sgd_step", "chase_step"])
def test_step_overhead(benchmark, name, variant):
    case = overhead_case(name)
    fn = case["plain"].step if variant == "plain_sgd_step" else case["chase"].step
    benchmark.extra_info.update(model=name, variant=variant, sparse_values=case["n_sparse"])
    benchmark.pedantic(fn, rounds=1 if QUICK else 11, iterations=1)


# --------------------------------------------------------------------------- 4. round_to
# Dense kernels tile channels: oneDNN on an AVX-512 CPU in blocks of 16, tensor cores in
# multiples of 8. A 3x3 conv 256 -> 25 channels at 14x14 took longer than 256 -> 32 here
# (profile_slim.py --widths), so the slim widths Chase picks are rounded and timed on CPU
# (float32, 1 thread, batch 8) and, where there is one, on CUDA (float16, batch 128).
ROUND_SC = 0.5
ROUND_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROUND_TOS = {"cpu": (None, 8, 16), "cuda": (None, 8)}


@pytest.mark.parametrize("device", ROUND_DEVICES)
def test_round_to_side_by_side(device):
    """Slim ResNet-50 with round_to=None vs 8 (vs 16 on CPU), dense alongside, interleaved."""
    cases = {rt: inference_case("resnet50", ROUND_SC, rt) for rt in ROUND_TOS[device]}
    name = {rt: "round_none" if rt is None else f"round_{rt}" for rt in cases}
    models = {"dense": cases[None]["models"]["dense"]}
    models.update({name[rt]: c["models"]["slim"] for rt, c in cases.items()})
    size = MODELS["resnet50"][1]
    if device == "cuda":
        models = {k: copy.deepcopy(m).cuda().half() for k, m in models.items()}
        batch, dtype = (8 if QUICK else 128), torch.half
    else:
        batch, dtype = MODELS["resnet50"][2], torch.float32
    bx = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    tp = measure_throughput(models, bx, rounds=1 if QUICK else (15 if device == "cuda" else 7),
                            warmup=1 if QUICK else 2, min_seconds=0.01 if QUICK else 0.2,
                            threads=THREADS if device == "cpu" else None, channels_last=True)
    ex = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    per = {}
    for k, m in models.items():
        lat = statistics.median(tp[k]["seconds"]) / tp["iters"]
        per[k] = {"median_latency_s": lat, "images_per_s": batch / lat, "macs_per_image": count_macs(m, ex)["macs"]}
    for rt, c in cases.items():
        k = name[rt]
        per[k]["speedup_over_dense"] = per["dense"]["median_latency_s"] / per[k]["median_latency_s"]
        per[k]["mac_ratio_dense_over_slim"] = per["dense"]["macs_per_image"] / per[k]["macs_per_image"]
        per[k]["efficiency"] = per[k]["speedup_over_dense"] / per[k]["mac_ratio_dense_over_slim"]
        rep = c["report"]
        per[k]["live_per_group"] = {r["group"]: [r["channels"], r["live"]] for r in rep}
        per[k]["channels_after"] = sum(r["live"] for r in rep)
        if rt is not None:
            assert all(r["live"] % rt == 0 or r["live"] == r["channels"] for r in rep), rt
    payload = {"model": "resnet50", "channel_sparsity": ROUND_SC, "batch": batch, "dtype": str(dtype),
               "memory_format": "channels_last",
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "variants": per,
               "iters_per_round": tp["iters"], "rounds": tp["rounds"], **_common()}
    for rt in cases:
        if rt is not None:
            payload[f"round_{rt}_over_round_none_speed"] = (per["round_none"]["median_latency_s"]
                                                           / per[name[rt]]["median_latency_s"])
    _save(f"round_to_resnet50_sc{ROUND_SC}_{device}", payload)
