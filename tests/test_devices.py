"""ChaseOptimizer and slimming on every device, and CPU == CUDA bit for bit for whole runs.

The op tests (test_ops.py) check each kernel on CUDA; these check the method around
them: masks, budgets, channel events, slimming during training and checkpoints with the
model and its optimizer on the GPU. On a machine without CUDA the CUDA cases skip.

For the CPU == CUDA run the arithmetic is made exact on both devices, so any difference
is a difference in selection, not rounding: weights and gradients are multiples of
2^-8 in [-1, 1], plain SGD with lr = 2^-4 (every weight stays a multiple of 2^-12 of
magnitude < 8, which float32 holds exactly, and so does every per-channel sum of |w|),
and gradients are set directly rather than by a backward pass (cuDNN and oneDNN round
differently). Quantised values also make many exact ties, which both devices must break
by the lower index.
"""
from __future__ import annotations

import io
import os
import traceback

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

import chase_ext
from chase_ext.optimizer import ChaseOptimizer
from chase_ext.schedules import is_channel_event, is_update_step
from models import MODELS, example_input
from test_optimizer import Watcher, check_masked

pytest.importorskip("chase_ext._ops", reason="chase_ext._C is not built")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _quantised_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-256, 257, p.shape, generator=g).float() / 256)


def _build(name, device, seed=0, opt="sgd-exact", **kw):
    torch.manual_seed(seed)
    model = MODELS[name]()
    if opt == "sgd-exact":
        _quantised_(model, seed)
    model = model.to(device)
    if opt == "sgd-exact":
        o = torch.optim.SGD(model.parameters(), lr=2.0**-4)
    elif opt == "sgd-momentum":
        o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    elif opt == "rprop":  # a zero slot's step size starts at lr: plain steps mask after the step
        o = torch.optim.Rprop(model.parameters(), lr=1e-3)
    else:
        o = torch.optim.Adam(model.parameters(), lr=1e-2)
    kw.setdefault("density", 0.3)
    kw.setdefault("total_steps", 60)
    kw.setdefault("update_interval", 6)
    kw.setdefault("channel_sparsity", 0.5)
    kw.setdefault("channel_end", 0.5)
    kw.setdefault("min_channel_ratio", 0.1)
    chase = ChaseOptimizer(o, model, example_inputs=example_input(name).to(device), **kw)
    return model, o, chase


def _set_grads(model, g):
    """Exact gradients (multiples of 2^-8), drawn on the CPU at each parameter's
    current shape, so a slimmed CPU run and a slimmed CUDA run get the same values."""
    for p in model.parameters():
        p.grad = (torch.randint(-256, 257, p.shape, generator=g).float() / 256).to(p.device)


def _with_head_input(model, x):
    """Output and the input of the first Linear, i.e. what the convs computed (a head at
    its channel floor can be constant, so the output alone could hide a difference)."""
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    h = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        y = model(x)
    finally:
        h.remove()
    return seen[0], y


def _backward_step(name, model, chase, i, device):
    x = example_input(name, batch=8, seed=i).to(device)
    y = torch.randint(0, 10 if name != "mlp" else 5, (8,), generator=torch.Generator().manual_seed(i))
    loss = torch.nn.functional.cross_entropy(model(x), y.to(device))
    chase.zero_grad()
    loss.backward()
    chase.step()
    return float(loss.detach())


# the EfficientNet with gated and coupled groups: every producer of it is in a group
JOINED = dict(gated_channels=True, coupled_channels=True)


@pytest.mark.parametrize("name", ["vgg_small", "resnet_bottleneck", "mobilenet_v2_small", "efficientnet_small"])
@pytest.mark.parametrize("opt", ["sgd-momentum", "adam", "rprop"])  # gradients masked / weights and state
def test_training_invariants_on_device(device, name, opt):
    """Real forward/backward on the device; after every step: masked weights and state
    are 0, the active count is the target at updates, the channel schedule is followed,
    removed channels stay removed; the slimmed model computes the masked model's output."""
    model, o, chase = _build(name, device, opt=opt, slim_during_training=2,
                             **(JOINED if name == "efficientnet_small" else {}))
    assert chase.groups
    w = Watcher(chase)
    for i in range(chase.config.total_steps):
        _backward_step(name, model, chase, i, device)
        w.after()
    assert w.events and w.events[-1][0] == chase.config.last_channel_event
    assert chase.slim_count > 0
    assert chase.active_count() == min(chase.budget, sum(chase._live_numels()))
    for n, m in chase.masks.items():
        assert m.device.type == torch.device(device).type, n
    x = example_input(name, batch=4).to(device)
    model.eval()
    # cuDNN may run the narrower convs with other kernels; TF32 (on by default for convs)
    # would then differ by ~1e-3 between the two, so compare in full float32
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        h_masked, y_masked = _with_head_input(model, x)
        chase.slim_()
        h_slim, y_slim = _with_head_input(model, x)
    assert float(h_masked.abs().max()) > 0
    torch.testing.assert_close(h_slim, h_masked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_slim, y_masked, rtol=1e-4, atol=1e-5)
    check_masked(chase)


# aten ops that make the host wait for a CUDA device (reading a value, or an output size
# that depends on the data)
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive", "equal", "is_nonzero", "repeat_interleave", "allclose"}


_PACKAGE = os.path.dirname(chase_ext.__file__)
# frames between a Python call site and the op: the dispatcher's and Tensor's own
_PLUMBING = tuple(os.path.join(os.path.dirname(torch.__file__), f)
                  for f in ("_ops.py", "_tensor.py", "utils/_python_dispatch.py", "_compile.py", "_dynamo"))


class _NoSyncingOps(TorchDispatchMode):
    """Fails on a syncing op called by chase_ext's own code (the wrapped optimizer's may
    read its CPU step counters; on CUDA, sync debug mode checks it too)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS:
            caller = next(f for f in reversed(traceback.extract_stack()[:-1])
                          if not f.filename.startswith(_PLUMBING) and f.filename != __file__)
            if caller.filename.startswith(_PACKAGE):
                raise AssertionError(f"{func} on a plain step, at {caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam", "rprop"])
def test_plain_steps_do_no_host_sync(device, opt):
    """A step that is neither a mask update nor a channel event only masks: no op that
    reads a value back to the host (on CUDA, also no implicit sync of any kind), before
    and after channels were removed and the model slimmed."""
    name = "vgg_small"
    model, o, chase = _build(name, device, opt=opt, slim_during_training=1)
    cfg = chase.config
    plain = 0
    for i in range(cfg.total_steps):
        x = example_input(name, batch=8, seed=i).to(device)
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i)).to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        chase.zero_grad()
        loss.backward()
        t = chase.t + 1
        if is_update_step(t, cfg.update_steps, cfg.t_end_steps) or is_channel_event(
            t, cfg.channel_interval_steps, cfg.update_steps
        ):
            chase.step()
            continue
        plain += 1
        with _NoSyncingOps():
            if torch.device(device).type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                chase.step()
            finally:
                if torch.device(device).type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    assert chase.slim_count > 0 and plain > cfg.total_steps // 2
    check_masked(chase)


def test_mixed_precision_on_device(device):
    """The usual GPU recipe: float16 autocast + GradScaler on CUDA (bfloat16 on the CPU),
    with channel events and slimming during training. Steps the scaler skips (inf
    gradients) do not count and change no mask; after every taken step the invariants
    hold; a bfloat16-parameter model keeps its dtype through the slims."""
    name = "vgg_small"
    model, o, chase = _build(name, device, opt="sgd-momentum", slim_during_training=True, update_interval=5)
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    w, skip = Watcher(chase), {7, 19, 33}
    taken = 0
    for i in range(chase.config.total_steps + len(skip) + 10):  # room for the scaler's own skips
        if chase.t == chase.config.total_steps:
            break
        x = example_input(name, batch=8, seed=i).to(device)
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i)).to(device)
        with torch.autocast(device, dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        if i in skip:
            loss = loss * float("inf")
        before, t0, scale = {n: m.clone() for n, m in chase.masks.items()}, chase.t, scaler.get_scale()
        chase.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(chase)
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped
        assert skipped or i not in skip
        if skipped:
            assert chase.t == t0 and all(torch.equal(before[n], chase.masks[n]) for n in before)
        else:
            taken += 1
            w.after()
    assert chase.t == taken
    assert chase.slim_count > 0 and w.events[-1][0] == chase.config.last_channel_event
    assert chase.active_count() == min(chase.budget, sum(chase._live_numels()))

    bf_model, bf_opt, bf_chase = _build(name, device, opt="sgd-momentum", slim_during_training=True)
    bf_model.to(torch.bfloat16)
    for i in range(bf_chase.config.total_steps):
        x = example_input(name, batch=8, seed=i).to(device, torch.bfloat16)
        y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i)).to(device)
        loss = torch.nn.functional.cross_entropy(bf_model(x).float(), y)
        bf_chase.zero_grad()
        loss.backward()
        bf_chase.step()
    check_masked(bf_chase)
    assert bf_chase.slim_count > 0 and all(p.dtype == torch.bfloat16 for p in bf_model.parameters())


def _exact_run(name, device, steps, seed=0, checkpoint_at=None, **kw):
    model, o, chase = _build(name, device, seed=seed, total_steps=steps, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    trace, ckpt = [], None
    for i in range(steps):
        _set_grads(model, g)
        chase.step()
        trace.append((chase.active_count(), [r["live"] for r in chase.channel_report()]))
        if checkpoint_at == i + 1:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optim": chase.state_dict(),
                        "gen": g.get_state()}, buf)
            ckpt = buf.getvalue()
    check_masked(chase)
    return model, chase, trace, ckpt


def _assert_same_run(a, b):
    (ma, ca, ta, _), (mb, cb, tb, _) = a, b
    assert ta == tb
    assert ca.channel_report() == cb.channel_report()
    assert ca.t == cb.t and ca.slim_count == cb.slim_count
    for n in ca.masks:
        assert torch.equal(ca.masks[n].cpu(), cb.masks[n].cpu()), n
    for (n, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert pa.shape == pb.shape, n
        assert torch.equal(pa.detach().cpu(), pb.detach().cpu()), n


EXACT_CASES = [
    dict(),
    dict(grow="random", slim_during_training=True),
    dict(scope="layer", slim_during_training=2),
    dict(channel_score="active_mean", round_to=2),
]
EXACT_IDS = ["global-gradient", "random-slim", "layer-slim2", "active-mean-round2"]


@needs_cuda
@pytest.mark.parametrize("name", ["vgg_small", "resnet_bottleneck", "mobilenet_v2_small"])
@pytest.mark.parametrize("kw", EXACT_CASES, ids=EXACT_IDS)
def test_cpu_equals_cuda_whole_run(name, kw):
    """The same exact-arithmetic run on CPU and CUDA: same masks, weights, channel
    choices and shapes after every step, through channel events and slims."""
    steps = 48
    _assert_same_run(_exact_run(name, "cpu", steps, **kw), _exact_run(name, "cuda", steps, **kw))


@needs_cuda
def test_cpu_equals_cuda_gated_run():
    """The same for gated and coupled groups (several producers per group, biases of the gates)."""
    kw = dict(JOINED, slim_during_training=2)
    _assert_same_run(_exact_run("efficientnet_small", "cpu", 48, **kw), _exact_run("efficientnet_small", "cuda", 48, **kw))


@needs_cuda
def test_cpu_equals_cuda_grouped_run():
    """The same through grouped convs (grouped_channels): blocks, slims at removal, the
    column gathers of grouped consumers."""
    kw = dict(grouped_channels=True, coupled_channels=True)
    _assert_same_run(_exact_run("resnext_small", "cpu", 48, **kw), _exact_run("resnext_small", "cuda", 48, **kw))


@needs_cuda
@pytest.mark.parametrize("name", ["densenet_small", "unet_small"])
def test_cpu_equals_cuda_concat_run(name):
    """The same through concatenations (concat_channels): spans of shared readers slimmed
    at removal, offsets moving as the spans before them shrink."""
    kw = dict(concat_channels=True, coupled_channels=True)
    _assert_same_run(_exact_run(name, "cpu", 48, **kw), _exact_run(name, "cuda", 48, **kw))


@needs_cuda
@pytest.mark.parametrize("name", ["vgg_small", "resnet_bottleneck"])
@pytest.mark.parametrize("kw", EXACT_CASES, ids=EXACT_IDS)
@pytest.mark.parametrize("mode", ["bracket", "compact"])
def test_cpu_equals_cuda_whole_run_other_selects(monkeypatch, name, kw, mode):
    """The same with the other CUDA selection modes (CHASE_EXT_CUDA_SELECT): the one-pass
    bracketed select, and the compacting select (compact_select.cuh)."""
    monkeypatch.setenv("CHASE_EXT_CUDA_SELECT", mode)
    steps = 48
    _assert_same_run(_exact_run(name, "cpu", steps, **kw), _exact_run(name, "cuda", steps, **kw))


@pytest.mark.parametrize("kw", EXACT_CASES[1:], ids=EXACT_IDS[1:])
def test_native_equals_reference_whole_run(kw):
    """The same exact-arithmetic runs on the CPU: compiled kernels == the pure-PyTorch
    reference, so a CPU == CUDA failure above points at the CUDA kernels."""
    steps = 48
    _assert_same_run(_exact_run("vgg_small", "cpu", steps, **kw),
                     _exact_run("vgg_small", "cpu", steps, backend="reference", **kw))


def test_native_equals_reference_gated_run():
    kw = dict(JOINED, slim_during_training=2)
    _assert_same_run(_exact_run("efficientnet_small", "cpu", 48, **kw),
                     _exact_run("efficientnet_small", "cpu", 48, backend="reference", **kw))


@needs_cuda
def test_cuda_checkpoint_resumes_on_cpu_and_cuda():
    """A checkpoint written mid-run on the GPU (after slims) resumes on either device
    and finishes exactly as the uninterrupted GPU run does."""
    steps, at, kw = 48, 20, dict(slim_during_training=True)
    full = _exact_run("vgg_small", "cuda", steps, checkpoint_at=at, **kw)
    assert full[1].slim_count > 0
    for mapped, device in [("cpu", "cpu"), ("cpu", "cuda"), ("cuda", "cuda"), ("cuda", "cpu")]:
        ckpt = torch.load(io.BytesIO(full[3]), map_location=mapped, weights_only=False)
        model, o, chase = _build("vgg_small", device, total_steps=steps, **kw)
        chase.load_state_dict(ckpt["optim"])
        model.load_state_dict(ckpt["model"])
        g = torch.Generator()
        g.set_state(ckpt["gen"].cpu())
        for _ in range(at, steps):
            _set_grads(model, g)
            chase.step()
        for n in chase.masks:
            assert torch.equal(chase.masks[n].cpu(), full[1].masks[n].cpu()), (mapped, device, n)
        for (n, pa), pb in zip(model.named_parameters(), full[0].parameters()):
            assert torch.equal(pa.detach().cpu(), pb.detach().cpu()), (mapped, device, n)
        assert chase.state_dict()["chase"]["channels"]["alive"][0].device.type == "cpu"


@needs_cuda
def test_model_moved_to_cuda_after_wrapping():
    """Built on the CPU, then ``model.cuda()``: masks, liveness vectors and bias masks
    follow at the next step, and the run equals one built on the GPU."""
    steps, kw = 48, dict(slim_during_training=True)
    model, o, chase = _build("vgg_small", "cpu", total_steps=steps, **kw)
    model.cuda()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        _set_grads(model, g)
        chase.step()
    check_masked(chase)
    ref = _exact_run("vgg_small", "cuda", steps, **kw)
    for n in chase.masks:
        assert chase.masks[n].is_cuda and torch.equal(chase.masks[n], ref[1].masks[n]), n
    for (n, pa), pb in zip(model.named_parameters(), ref[0].parameters()):
        assert torch.equal(pa.detach(), pb.detach()), n


@needs_cuda
def test_public_methods_follow_a_move_before_any_step():
    """Built on the CPU, moved with ``model.cuda()``: masks, channel stats, the state
    dict and ``slim_()`` work on the GPU tensors before the first step, and moving
    back to the CPU works the same way."""
    model, o, chase = _build("vgg_small", "cpu")
    for device in ("cuda", "cpu"):
        model.to(device)
        assert all(m.device.type == device for m in chase.masks.values())
        stats = chase.channel_stats()
        assert all(c.device.type == device for c, _ in stats.values())
        assert chase.active_count() == chase.budget
        assert all(m.device.type == device for m in chase.state_dict()["chase"]["masks"])
    chase.slim_()  # nothing removed yet: a no-op, but it must accept the moved model
    model.cuda()
    _set_grads(model, torch.Generator().manual_seed(0))
    chase.step()
    check_masked(chase)
