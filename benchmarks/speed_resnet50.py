"""Does slimming pay? Dense vs slim ResNet-50 speed in the regimes a user meets, one run.

    python benchmarks/speed_resnet50.py [--device cuda|cpu] [--budget-s 150] [--quick]
        [--sc 0.3 0.4 0.5] [--recipes spec round8 ...] [--threads N] [--out PATH] [--no-save]

The slim models: ResNet-50 (shapes built in code, ``models.resnet50``) with channels chosen
by ``ChaseOptimizer`` itself, as ``test_bench_slim.inference_case`` does (density 0.1, an
event at step 1 that reaches S_c, two steps on one random sample, then ``slim_()``), on
the device under test. The SPEC default at every S_c; the other recipes at ``--recipe-sc``
(0.4): ``round_to=8``, ``round_to=8`` with ``coupled_channels=True`` (block outputs
shrink too), and ``channel_allocation="latency"`` (table measured at the throughput batch)
with ``coupled_channels`` and ``min_channel_ratio=0.5``; ``round16``/``round32``/``round64``,
``coupled``, ``latency`` (SPEC floors), ``latency_beta05`` and ``latency_coupled`` by name
(``--recipes``; ``benchmarks/recipes.py``).

Regimes (every model gets the same treatment; variants interleaved in one run, each round
starting one variant further along, medians of rounds):

* CUDA: eager fp32 (TF32 off), eager fp16 / bf16 channels_last, the deploy path
  (``chase_ext.deploy``: BN folded, fp16, channels_last; also with ``fuse_relu``, after a
  probe in a child process), the deploy models in CUDA graphs, and ``torch.compile`` of
  the deploy model while the time budget allows; cuDNN benchmark mode on (what a
  deployment sets); batch 1 latency and batch 256 throughput.
* CPU: the deploy path in fp32, channels_last, with ``fuse_relu`` (one oneDNN call per
  conv + add + relu) for every model first, with glibc's default allocator and then in a
  child process that keeps freed memory (``chase_ext.cpu_memory.retain_cpu_memory``: the
  activations are not page-faulted anew each call); then eager fp32 contiguous and channels_last,
  the deploy path unfused (contiguous and channels_last), and ``torch.compile`` of the
  deploy model with Inductor's freezing (dense, SPEC and the fastest recipe); batch 1 and
  16; ``--threads`` threads (2 by default); ``round16`` joins the default recipes.
* The training step (bf16 autocast on CUDA / fp32 on CPU, channels_last, SGD with
  momentum, batch 128 on CUDA) of each slim model vs the dense one at the same settings,
  eager (on the CPU also with freed memory kept) and (last, while the budget allows)
  ``torch.compile``d.
* A per-layer time breakdown, dense vs SPEC default at S_c 0.4 (eager): forward hooks time
  each leaf module (CUDA events / wall clock), and ``torch.profiler`` gives the top kernels.

Beside each speedup: the MAC ratio dense/slim (``count_macs``) and the activation-bytes
ratio (sum of every leaf module's output elements at batch 1, dense/slim: a proxy for what
norm, activation and add kernels move). ``--budget-s`` bounds the whole run: parts run in
order of importance and a part that would overrun is skipped and named in ``"skipped"``.
Results go to ``benchmarks/results/<machine>-speed.json`` (a GPU names the file after it).
``--quick`` (the pytest file ``test_bench_speed.py``) shrinks ResNet-50 8x in width at 64x64.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import resnet50  # noqa: E402
from recipes import DEFAULT_RECIPES, RECIPES, latency_table_name, uses_latency_table  # noqa: E402
from timing import rotated  # noqa: E402

from chase_ext import ChaseConfig, ChaseOptimizer  # noqa: E402
from chase_ext.deploy import cuda_graph_runner, deploy  # noqa: E402

from chase_ext.measure import count_macs  # noqa: E402
from chase_ext.training import pick_backend  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DENSITY = 0.1


class Budget:
    """Wall-clock budget: parts ask before they start; what does not fit is recorded."""

    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append(f"{what} (needed ~{need_s:.0f} s, {max(self.left(), 0):.0f} s left)")
        print("skip:", self.skipped[-1], flush=True)
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def machine_file(device: str) -> str:
    if device == "cuda":
        slug = torch.cuda.get_device_name().lower()
    else:
        slug = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                slug = next(line.split(":", 1)[1] for line in f if line.startswith("model name")).lower()
        except (OSError, StopIteration):
            pass
        slug = f"cpu-{torch.get_num_threads()}t-{slug}"
    slug = "".join(ch if ch.isalnum() else "-" for ch in slug).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return os.path.join(RESULTS, ("gpu-" if device == "cuda" else "") + slug + "-speed.json")


# --------------------------------------------------------------------------- models
def select_slim(dense: nn.Module, sc: float, recipe: dict, size: int, device: str,
                latency_batch: int = 64, latency_dir: str | None = None) -> tuple[nn.Module, dict]:
    """A slim copy of ``dense``: channels chosen by ChaseOptimizer (see the module doc).
    With ``latency_dir`` the latency recipes share one cached table per set of channel
    groups (measured by the first, whose floors should be the lowest)."""
    model = copy.deepcopy(dense)
    if uses_latency_table(recipe):
        recipe = {**recipe, "latency_batch": latency_batch}
        if latency_dir is not None:
            recipe["latency_table"] = os.path.join(latency_dir, latency_table_name(recipe))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (1,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    chase = ChaseOptimizer(opt, model, density=DENSITY, total_steps=4, channel_sparsity=sc, example_inputs=x,
                           update_interval=2, channel_interval=1, channel_end=1, backend=pick_backend(device),
                           **recipe)
    model.train()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        chase.zero_grad()
        loss.backward()
        chase.step()
    del loss
    report = chase.channel_report()
    chase.slim_()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, {"live_per_group": {r["group"]: [r["channels"], r["live"]] for r in report},
                   "channels_before": sum(r["channels"] for r in report),
                   "channels_after": sum(r["live"] for r in report)}


def activation_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Sum of every leaf module's output elements for one sample (eval mode)."""
    total = [0]

    def hook(m, i, o):
        if isinstance(o, torch.Tensor):
            total[0] += o.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in hs:
            h.remove()
    return total[0]


# --------------------------------------------------------------------------- timing
def time_interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int, min_round_s: float,
                     warmup: int = 2) -> dict[str, dict]:
    """fns: name -> zero-argument callable. Warm-up, then ``rounds`` rounds, each running
    every variant ``iters`` times (iters from the slowest so a round lasts ~min_round_s),
    the order rotating each round. Returns name -> {median_s (per call), spread_s, iters}."""
    with torch.inference_mode():
        for f in fns.values():
            for _ in range(warmup):
                f()
        _sync(device)
        slowest = 0.0
        for f in fns.values():
            t0 = time.perf_counter()
            f()
            _sync(device)
            slowest = max(slowest, time.perf_counter() - t0)
        iters = max(1, min(200, round(min_round_s / max(slowest, 1e-6))))
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds):
            for k in rotated(list(fns), r):
                f = fns[k]
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    f()
                _sync(device)
                times[k].append((time.perf_counter() - t0) / iters)
    return {k: {"median_s": statistics.median(v), "spread_s": [min(v), max(v)], "iters": iters, "rounds": rounds}
            for k, v in times.items()}


def _prepare(model: nn.Module, regime: dict, x32: torch.Tensor):
    """The model and input of one regime: (callable, input tensor)."""
    dtype, cl = regime["dtype"], regime["channels_last"]
    if regime["deploy"]:
        m = deploy(model, x32[:2], channels_last=cl, dtype=dtype, fuse_relu=regime.get("fuse_relu", False))
    else:
        m = copy.deepcopy(model).eval().to(dtype)
        if cl:
            m = m.to(memory_format=torch.channels_last)
    x = x32.to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if regime.get("compile"):
        # freezing: weights become constants Inductor may fold and prepack (CPU inference)
        m = torch.compile(m, dynamic=False, options={"freezing": True} if regime.get("freezing") else None)
    if regime.get("cuda_graph"):
        return cuda_graph_runner(m, x), x
    return m, x


def run_regime(name: str, regime: dict, models: dict[str, nn.Module], batch: int, size: int, device: str,
               rounds: int, min_round_s: float, budget: Budget | None = None, need_each_s: float = 0.0) -> dict:
    """Time ``models`` in one regime, interleaved. With ``budget``, each model is prepared
    only while ``need_each_s`` is left (torch.compile: the first call compiles, so it is
    made here and timed as ``first_call_s``); dense must fit or nothing is timed."""
    x32 = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    fns, first = {}, {}
    for k, m in models.items():
        if budget is not None and not budget.allows(f"{name} batch {batch} {k}", need_each_s):
            break
        f, x = _prepare(m, regime, x32)
        t0 = time.perf_counter()
        with torch.inference_mode():
            f(x)
        _sync(device)
        first[k] = time.perf_counter() - t0
        fns[k] = (lambda f=f, x=x: f(x))
    if len(fns) < 2:
        return {}
    res = time_interleaved(fns, device, rounds, min_round_s)
    base = res["dense"]["median_s"]
    for k, r in res.items():
        r["per_s"] = batch / r["median_s"]
        r["speedup_over_dense"] = base / r["median_s"]
        r["first_call_s"] = first[k]
    print(f"{name} batch {batch}: " + ", ".join(f"{k} {r['speedup_over_dense']:.2f}x" for k, r in res.items()
                                                 if k != "dense") + f" (dense {base * 1e3:.2f} ms)", flush=True)
    return {"batch": batch, "variants": res}


def train_step_speed(models: dict[str, nn.Module], batch: int, size: int, device: str, rounds: int,
                     min_round_s: float, compile: bool = False) -> dict:
    """One SGD step (momentum 0.9) per call, channels_last, bf16 autocast on CUDA; with
    ``compile`` the model is ``torch.compile``d (default mode: Inductor fuses the norm,
    activation and add passes of forward and backward, which eager runs one by one)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    fns = {}
    for k, m in models.items():
        m = copy.deepcopy(m).to(memory_format=torch.channels_last).train()
        for p in m.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        if compile:
            m = torch.compile(m)

        def step(m=m, opt=opt):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[k] = step
    for f in fns.values():  # warm-up (cuDNN autotuning, optimizer state, compilation)
        for _ in range(3 if compile else 2):
            f()
    _sync(device)
    t0 = time.perf_counter()
    fns["dense"]()
    _sync(device)
    iters = max(1, min(50, round(min_round_s / max(time.perf_counter() - t0, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in rotated(list(fns), r):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[k]()
            _sync(device)
            times[k].append((time.perf_counter() - t0) / iters)
    base = statistics.median(times["dense"])
    out = {k: {"median_s": statistics.median(v), "spread_s": [min(v), max(v)], "iters": iters, "rounds": rounds,
               "images_per_s": batch / statistics.median(v), "speedup_over_dense": base / statistics.median(v)}
           for k, v in times.items()}
    print(f"train step{' (compiled)' if compile else ''}: "
          + ", ".join(f"{k} {r['speedup_over_dense']:.2f}x" for k, r in out.items() if k != "dense"), flush=True)
    return {"batch": batch, "autocast": "bfloat16" if device == "cuda" else None, "compiled": compile,
            "memory_format": "channels_last", "optimizer": "SGD(momentum=0.9)", "variants": out}


def layer_breakdown(models: dict[str, nn.Module], regime: dict, batch: int, size: int, device: str,
                    reps: int) -> dict:
    """Per leaf module time (median of reps; CUDA events on CUDA) and top profiler kernels."""
    x32 = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    out = {}
    for k, model in models.items():
        m, x = _prepare(model, regime, x32)
        per: dict[str, list[float]] = {}
        marks: dict[str, object] = {}

        def pre(mod, inp, name=None):
            if device == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks[name] = ev
            else:
                marks[name] = time.perf_counter()

        def post(mod, inp, o, name=None):
            if device == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                per.setdefault(name, []).append((marks[name], ev))
            else:
                per.setdefault(name, []).append(time.perf_counter() - marks[name])

        hs = []
        for name, mod in m.named_modules():
            if not list(mod.children()):
                hs.append(mod.register_forward_pre_hook(lambda mo, i, name=name: pre(mo, i, name)))
                hs.append(mod.register_forward_hook(lambda mo, i, o, name=name: post(mo, i, o, name)))
        try:
            with torch.inference_mode():
                m(x)  # warm-up
                per.clear()
                for _ in range(reps):
                    m(x)
                _sync(device)
        finally:
            for h in hs:
                h.remove()
        layers = {}
        for name, v in per.items():
            ts = [a.elapsed_time(b) / 1e3 for a, b in v] if device == "cuda" else v
            # a module called several times per forward (the shared relu) sums its calls
            calls = len(ts) // reps
            layers[name] = sum(statistics.median(ts[i::calls]) for i in range(calls))
        kinds: dict[str, float] = {}
        mods = dict(m.named_modules())
        for name, t in layers.items():
            kind = type(mods[name]).__name__
            kinds[kind] = kinds.get(kind, 0.0) + t
        stages: dict[str, float] = {}
        for name, t in layers.items():
            st = name.split(".")[0] if name.startswith("layer") else "stem_head"
            stages[st] = stages.get(st, 0.0) + t
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof, torch.inference_mode():
            m(x)
            _sync(device)
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        evs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:15]
        out[k] = {"total_s": sum(layers.values()), "by_kind_s": kinds, "by_stage_s": stages, "by_layer_s": layers,
                  "profiler_top": [{"name": e.key, "self_s": getattr(e, key, 0) / 1e6, "calls": e.count} for e in evs]}
    return {"batch": batch, "regime": regime_desc(regime), "reps": reps, "models": out}


def regime_desc(r: dict) -> dict:
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in r.items()}


_FUSED_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from models import resnet50
from chase_ext.deploy import cuda_graph_runner, deploy
torch.backends.cudnn.benchmark = True
torch.manual_seed(0)
m = resnet50(width_div=8).cuda().eval()  # every conv kind of the real run: 7x7/2 stem, 3x3/2, 1x1/2, adds
x = torch.randn(8, 3, 64, 64, device="cuda")
ref = deploy(m, x, channels_last=True, dtype=torch.float16)
d = deploy(m, x, channels_last=True, dtype=torch.float16, fuse_relu=True)
assert len(d.fused) == 49, len(d.fused)
xh = x.half().contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    r = ref(xh).float()
    for y in (d(xh), cuda_graph_runner(d, xh)(xh)):
        err = float((y.float() - r).abs().max())
        assert err <= 2e-2 * float(r.abs().max()) + 1e-3, err
print("fused ok")
"""


def _child_env() -> dict:
    """The environment of a child process: this one's, with the working directory importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))


def fused_ok(budget: Budget) -> bool:
    """The cuDNN conv+bias+add+relu ops, tried in a child process first: on some images a
    failing CUDA op takes the whole process down, which would lose every later part."""
    if not budget.allows("deploy_fp16_cl_fused probe", 20):
        return False
    try:
        r = subprocess.run([sys.executable, "-c", _FUSED_PROBE, os.path.dirname(os.path.abspath(__file__))],
                           capture_output=True, text=True, timeout=90, env=_child_env())
    except subprocess.TimeoutExpired:
        budget.skipped.append("deploy_fp16_cl_fused (probe timed out)")
        return False
    if r.returncode != 0:
        budget.skipped.append(f"deploy_fp16_cl_fused (probe rc {r.returncode}: {(r.stderr or r.stdout)[-300:]})")
        print("skip:", budget.skipped[-1], flush=True)
        return False
    return True


_RETAIN_CHILD = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import speed_resnet50 as s
from chase_ext.cpu_memory import retain_cpu_memory
job = torch.load(sys.argv[2], weights_only=False)
torch.set_num_threads(job["threads"])
retain_cpu_memory()
out = getattr(s, job["fn"])(**job["kwargs"])
with open(sys.argv[3], "w") as f:
    json.dump(out, f)
"""


def in_child_retaining_memory(fn: str, threads: int, budget: Budget, label: str, **kwargs) -> dict | None:
    """``fn(**kwargs)`` of this module in a child process that first calls
    ``chase_ext.cpu_memory.retain_cpu_memory()``: the setting is process-wide and not undone,
    so the other regimes of this run keep glibc's default. The models travel by
    ``torch.save``; dense and slim still run interleaved, side by side, in the child. A child
    that fails or outlasts the budget is named in ``budget.skipped`` and gives None."""
    with tempfile.TemporaryDirectory(prefix="chase-speed-retain-") as d:
        job, out = os.path.join(d, "job.pt"), os.path.join(d, "out.json")
        torch.save({"fn": fn, "threads": threads, "kwargs": kwargs}, job)
        try:
            r = subprocess.run([sys.executable, "-c", _RETAIN_CHILD, os.path.dirname(os.path.abspath(__file__)), job,
                                out], text=True, stderr=subprocess.PIPE, timeout=budget.left(), env=_child_env())
        except subprocess.TimeoutExpired:
            budget.skipped.append(f"{label} (timed out)")
            return None
        if r.returncode != 0:
            budget.skipped.append(f"{label} (child rc {r.returncode}: {r.stderr[-300:]})")
            return None
        with open(out) as f:
            return json.load(f)


# --------------------------------------------------------------------------- the run
def _deploy_key(regimes: dict, key: str, batch: int) -> str:
    """The deploy regime that decides the fastest recipe: the fused one where it ran."""
    return f"{key}_fused@{batch}" if f"{key}_fused@{batch}" in regimes else f"{key}@{batch}"


def _fastest(regimes: dict, key: str, candidates: dict, sc: float) -> list[str]:
    """dense, the SPEC default at ``sc`` and the fastest other model of ``candidates`` in
    the regime ``key`` (when it was measured)."""
    pick = [k for k in ("dense", f"spec@{sc}") if k in candidates]
    timed = regimes.get(key, {}).get("variants", {})
    rest = [k for k in candidates if k not in pick and k in timed]
    if rest:
        pick.append(max(rest, key=lambda k: timed[k]["speedup_over_dense"]))
    return pick


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--budget-s", type=float, default=150.0, help="wall-clock bound for the whole run")
    ap.add_argument("--quick", action="store_true", help="ResNet-50 8x narrower at 64x64, tiny batches")
    ap.add_argument("--sc", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    ap.add_argument("--recipe-sc", type=float, default=0.4, help="S_c at which the non-default recipes run")
    ap.add_argument("--recipes", nargs="+", default=None,
                    help=f"of {sorted(RECIPES)} (default: {' '.join(DEFAULT_RECIPES)}, those this chase_ext has)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, metavar="PART@BATCH",
                    help="run only these parts, e.g. eager_fp32@16 deploy_fp32@16 train@16 profile@16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    budget = Budget(a.budget_s)
    dev = a.device
    cuda = dev == "cuda"
    result: dict = {"meta": {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": a.quick,
        "threads": None if cuda else a.threads, "cudnn_benchmark": cuda, "tf32": False, "density": DENSITY,
        "budget_s": a.budget_s, "load_avg_1m_at_start": os.getloadavg()[0],
        "selection": "ChaseOptimizer, density 0.1, event at step 1 reaches S_c, 2 steps on one sample, slim_()",
    }, "skipped": budget.skipped, "finished": False}
    path = None  # set below, once the thread count is (the CPU file is named after it)

    def save():
        result["wall_s"] = time.perf_counter() - budget.t0
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(path + ".tmp", path)
    if not cuda:
        torch.set_num_threads(a.threads)
    else:
        torch.backends.cudnn.benchmark = True
        # eager fp32 means full fp32: no TF32 in convs or matmuls (the fp16/bf16 regimes are unaffected)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    path = None if a.no_save else (a.out or machine_file(dev))
    knobs = {f.name for f in dataclasses.fields(ChaseConfig)}
    # oneDNN's AVX-512 kernels block channels by 16: round16 joins the CPU defaults
    defaults = DEFAULT_RECIPES if cuda else DEFAULT_RECIPES[:2] + ("round16",) + DEFAULT_RECIPES[2:]
    recipes = a.recipes or [r for r in defaults if set(RECIPES[r]) <= knobs]
    for r in recipes:
        if r not in RECIPES:
            ap.error(f"unknown recipe {r!r}; known: {sorted(RECIPES)}")
        if not set(RECIPES[r]) <= knobs:
            ap.error(f"recipe {r!r} needs ChaseConfig knobs {sorted(set(RECIPES[r]) - knobs)} this chase_ext lacks")
    wdiv, size = (8, 64) if a.quick else (1, 224)
    thr_batch = 2 if a.quick else (256 if cuda else 16)
    train_batch = 2 if a.quick else (128 if cuda else 16)
    rounds = a.rounds or (1 if a.quick else 5)
    min_round_s = 0.005 if a.quick else (0.05 if cuda else 0.3)

    torch.manual_seed(0)
    dense = resnet50(width_div=wdiv).to(dev).eval()
    x1 = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4)).to(dev)
    models: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, dict] = {}
    plan = [(sc, "spec") for sc in a.sc] + [(a.recipe_sc, r) for r in recipes if r != "spec"]
    latency_dir = tempfile.mkdtemp(prefix="chase-speed-latency-")
    atexit.register(shutil.rmtree, latency_dir, True)  # also after a crash or a kill by the budget
    for sc, r in plan:
        name = f"{r}@{sc}"
        latency = uses_latency_table(RECIPES[r])
        if not budget.allows(f"selection {name}", (30 if latency else 3) if cuda else (40 if latency else 10)):
            continue
        t0 = time.perf_counter()
        models[name], info[name] = select_slim(dense, sc, RECIPES[r], size, dev, latency_batch=thr_batch,
                                               latency_dir=latency_dir)
        info[name].update(recipe=r, channel_sparsity=sc, select_s=time.perf_counter() - t0)
    dm = count_macs(dense, x1)["macs"]
    da = activation_elements(dense, x1)
    info["dense"] = {"recipe": None, "channel_sparsity": 0.0}
    for k, m in models.items():
        mk, ak = count_macs(m, x1)["macs"], activation_elements(m, x1)
        info[k].update(macs=mk, mac_ratio=dm / mk, activation_elements=ak, activation_ratio=da / ak,
                       params=sum(p.numel() for p in m.parameters()))
    result.update(models=info)
    result["meta"].update(input=[3, size, size], rounds=rounds)
    sweep = {k: m for k, m in models.items() if k == "dense" or k.startswith("spec@")}
    at_rsc = {k: m for k, m in models.items() if k == "dense" or k.endswith(f"@{a.recipe_sc}")}

    F16 = torch.float16
    if cuda:
        R = {
            "eager_fp32": dict(deploy=False, dtype=torch.float32, channels_last=False),
            "eager_fp16_cl": dict(deploy=False, dtype=F16, channels_last=True),
            "eager_bf16_cl": dict(deploy=False, dtype=torch.bfloat16, channels_last=True),
            "deploy_fp16_cl": dict(deploy=True, dtype=F16, channels_last=True),
            "deploy_fp16_cl_cudagraph": dict(deploy=True, dtype=F16, channels_last=True, cuda_graph=True),
            "deploy_fp16_cl_fused": dict(deploy=True, dtype=F16, channels_last=True, fuse_relu=True),
            "deploy_fp16_cl_fused_cudagraph": dict(deploy=True, dtype=F16, channels_last=True, fuse_relu=True,
                                                   cuda_graph=True),
            "deploy_fp16_cl_compile": dict(deploy=True, dtype=F16, channels_last=True, compile=True),
        }
        # (regime, batch, model set, seconds it needs at least) in order of importance
        # what the issue asks first (throughput through the deploy path, the training step,
        # where the time goes), then the other regimes; the budget skips from the end
        parts = [("deploy_fp16_cl", thr_batch, models, 20)]
        fused = fused_ok(budget)
        if fused:
            parts += [("deploy_fp16_cl_fused", thr_batch, models, 20)]
        parts += [("eager_fp16_cl", thr_batch, sweep, 5), ("train", train_batch, at_rsc, 15),
                  ("profile", thr_batch, None, 8)]
        if fused:
            parts += [("deploy_fp16_cl_fused_cudagraph", thr_batch, models, 15),
                      ("deploy_fp16_cl_fused_cudagraph", 1, models, 6)]
        parts += [("eager_fp16_cl", 1, sweep, 4), ("eager_bf16_cl", thr_batch, sweep, 5),
                  ("eager_fp32", thr_batch, sweep, 10), ("deploy_fp16_cl_cudagraph", thr_batch, models, 15),
                  ("deploy_fp16_cl_cudagraph", 1, models, 6), ("deploy_fp16_cl", 1, models, 5)]
        if not a.no_compile:
            parts += [("deploy_fp16_cl_compile", thr_batch, None, 45), ("train_compile", train_batch, None, 90)]
        profile_regime, deploy_key = "eager_fp16_cl", "deploy_fp16_cl"
    else:
        R = {
            "eager_fp32": dict(deploy=False, dtype=torch.float32, channels_last=False),
            "deploy_fp32": dict(deploy=True, dtype=torch.float32, channels_last=False),
            "eager_fp32_cl": dict(deploy=False, dtype=torch.float32, channels_last=True),
            "deploy_fp32_cl": dict(deploy=True, dtype=torch.float32, channels_last=True),
            "deploy_fp32_cl_fused": dict(deploy=True, dtype=torch.float32, channels_last=True, fuse_relu=True),
            # the same in a child process that keeps freed memory (chase_ext.cpu_memory)
            "deploy_fp32_cl_fused_retain": dict(deploy=True, dtype=torch.float32, channels_last=True, fuse_relu=True,
                                                retain_cpu_memory=True),
            "deploy_fp32_cl_compile": dict(deploy=True, dtype=torch.float32, channels_last=True, compile=True,
                                           freezing=True),
        }
        # the deploy path as shipped on a CPU first (oneDNN conv + add + relu), every model
        # and with freed memory kept for reuse, the allocator setting a CPU deployment makes
        parts = [("deploy_fp32_cl_fused", thr_batch, models, 30),
                 ("deploy_fp32_cl_fused_retain", thr_batch, models, 40), ("eager_fp32", thr_batch, sweep, 20),
                 ("eager_fp32_cl", thr_batch, sweep, 20), ("deploy_fp32_cl", thr_batch, models, 30),
                 ("deploy_fp32", thr_batch, sweep, 20), ("deploy_fp32_cl_fused", 1, models, 5),
                 ("deploy_fp32_cl_fused_retain", 1, models, 15), ("eager_fp32", 1, sweep, 5),
                 ("profile", thr_batch, None, 15), ("train", train_batch, at_rsc, 60),
                 ("train_retain", train_batch, at_rsc, 60)]
        if not a.no_compile:
            parts += [("deploy_fp32_cl_compile", thr_batch, None, 30), ("train_compile", train_batch, None, 150)]
        profile_regime, deploy_key = "eager_fp32", "deploy_fp32_cl_fused"
    if a.only:
        known = {f"{p}@{b}" for p, b, _, _ in parts}
        if set(a.only) - known:
            ap.error(f"--only: unknown part(s) {sorted(set(a.only) - known)}; this device runs {sorted(known)}")
        parts = [q for q in parts if f"{q[0]}@{q[1]}" in a.only]
    if a.quick:
        parts = [(p, b, s, 0) for p, b, s, _ in parts]

    regimes: dict[str, dict] = {}
    result.update(regimes=regimes, train_step=None, train_step_compiled=None, layer_breakdown=None)
    if not cuda:
        result.update(train_step_retain_cpu_memory=None)
    for part, batch, subset, need in parts:
        label = f"{part} batch {batch}"
        save()  # after every part: a crash or a kill later still leaves what was measured
        if not budget.allows(label, need):
            continue
        if cuda:  # graphs and compiled models of the last part are gone: give their memory back
            torch.cuda.empty_cache()
        mem = f", {torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved" if cuda else ""
        print(f"[{time.perf_counter() - budget.t0:.0f} s{mem}] {label}", flush=True)
        if part in ("train", "train_compile", "train_retain"):
            # dense, SPEC and the fastest recipe at recipe_sc in the deploy regime (each
            # model's first backward autotunes cuDNN for its shapes: all of them would not fit)
            subset = {k: models[k] for k in _fastest(regimes, _deploy_key(regimes, deploy_key, thr_batch), at_rsc,
                                                     a.recipe_sc)}
            kw = dict(models=subset, batch=batch, size=size, device=dev, rounds=max(3, rounds - 2),
                      min_round_s=min_round_s, compile=part == "train_compile")
            if part == "train_retain":
                result["train_step_retain_cpu_memory"] = in_child_retaining_memory(
                    "train_step_speed", a.threads, budget, label, **kw)
            else:
                result["train_step" if part == "train" else "train_step_compiled"] = train_step_speed(**kw)
        elif part == "profile":
            pm = {k: models[k] for k in ("dense", f"spec@{a.recipe_sc}") if k in models}
            result["layer_breakdown"] = layer_breakdown(pm, R[profile_regime], batch, size, dev, reps=1 if a.quick else 5)
        elif part in ("deploy_fp16_cl_compile", "deploy_fp32_cl_compile"):
            pick = _fastest(regimes, _deploy_key(regimes, deploy_key, thr_batch), at_rsc, a.recipe_sc)
            reg = run_regime(part, R[part], {k: models[k] for k in pick}, batch, size, dev, rounds, min_round_s,
                             budget=budget, need_each_s=0 if a.quick else 40)
            if reg:
                regimes[f"{part}@{batch}"] = reg
        elif R[part].get("retain_cpu_memory"):
            reg = in_child_retaining_memory("run_regime", a.threads, budget, label, name=part, regime=R[part],
                                            models=subset, batch=batch, size=size, device=dev, rounds=rounds,
                                            min_round_s=min_round_s)
            if reg:
                regimes[f"{part}@{batch}"] = reg
        else:
            regimes[f"{part}@{batch}"] = run_regime(part, R[part], subset, batch, size, dev, rounds, min_round_s)
        if f"{part}@{batch}" in regimes:
            regimes[f"{part}@{batch}"]["regime"] = regime_desc(R[part])

    result["finished"] = True
    save()
    print(f"wall {result['wall_s']:.1f} s; skipped: {budget.skipped or 'nothing'}")
    return result


if __name__ == "__main__":
    main()
