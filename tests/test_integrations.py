"""PyTorch Lightning and Hugging Face accelerate with the real packages (each group skips only
when its package is missing): a run through the framework equals the same run written as a
plain loop (masks and weights bit for bit, slimming during training included), gradient
accumulation and bf16 mixed precision on the CPU, resuming a slimmed run through the
framework's own checkpointing, and DDP (gloo, 2 processes) with the re-wrap after slims."""
from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chase_ext.optimizer import ChaseOptimizer

from dist_teardown import end_process_group
from models import TwoGroupNet as Net

try:
    import chase_ext._ops  # noqa: F401

    BACKEND = "native"
except Exception:  # pragma: no cover - extension not built
    BACKEND = "reference"

try:
    import lightning.pytorch as pl

    from chase_ext.lightning import ChaseCallback
except ImportError:  # pragma: no cover - exercised where lightning is not installed
    pl = None
try:
    import accelerate
    from accelerate.state import AcceleratorState, GradientState

    import chase_ext.accelerate as chase_accelerate
except ImportError:  # pragma: no cover
    accelerate = None

needs_lightning = pytest.mark.skipif(pl is None, reason="lightning is not installed")
needs_accelerate = pytest.mark.skipif(accelerate is None, reason="accelerate is not installed")

BATCHES = 8  # per epoch, one process




def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(8 * BATCHES, 12, generator=g), torch.randint(0, 4, (8 * BATCHES,), generator=g))


def _loader() -> DataLoader:
    return DataLoader(_dataset(), batch_size=8, shuffle=False)


def _chase(model: nn.Module, total_steps: int) -> ChaseOptimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return ChaseOptimizer(opt, model, density=0.3, total_steps=total_steps, update_interval=2,
                          channel_sparsity=0.5, channel_end=0.6, example_inputs=torch.randn(2, 12),
                          slim_during_training=True, backend=BACKEND)


def _plain_loop(epochs: int, total_steps: int, accumulate: int = 1, bf16: bool = False):
    """The reference: the same training written as a plain PyTorch loop."""
    torch.manual_seed(0)
    net = Net()
    chase = _chase(net, total_steps)
    for _ in range(epochs):
        for i, (x, y) in enumerate(_loader()):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(x)
            loss = nn.functional.cross_entropy(out.float(), y) / accumulate
            if i % accumulate == 0:
                chase.zero_grad()
            loss.backward()
            if (i + 1) % accumulate == 0:
                chase.step()
    return net, chase


def _assert_same_run(net: nn.Module, chase: ChaseOptimizer, ref_net: nn.Module, ref: ChaseOptimizer) -> None:
    assert chase.t == ref.t
    assert chase.slim_count == ref.slim_count >= 1
    assert [g["live"] for g in chase.channel_report()] == [g["live"] for g in ref.channel_report()]
    for a, b in zip(chase.masks.values(), ref.masks.values()):
        assert torch.equal(a, b)
    for a, b in zip(net.state_dict().values(), ref_net.state_dict().values()):
        assert torch.equal(a, b)
    assert net.fc1.weight.shape[0] < 24  # slimmed during training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =========================================================================== Lightning
if pl is not None:

    class LitNet(pl.LightningModule):
        def __init__(self, total_steps: int):
            super().__init__()
            self.net = Net()
            self.total_steps = total_steps

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x).float(), y)

        def configure_optimizers(self):
            return _chase(self, self.total_steps)


def _trainer(tmp_path, **kw):
    kw.setdefault("callbacks", [ChaseCallback()])
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)


def _fit(tmp_path, epochs: int, total_steps: int, ckpt_path=None, **kw):
    torch.manual_seed(0)
    lit = LitNet(total_steps)
    trainer = _trainer(tmp_path, max_epochs=epochs, **kw)
    trainer.fit(lit, _loader(), ckpt_path=ckpt_path)
    return lit, trainer


@needs_lightning
def test_lightning_equals_plain_loop(tmp_path):
    # Lightning calls step(closure) with forward and backward inside the closure: the growth
    # scores must be this step's gradients, as in the plain loop
    lit, trainer = _fit(tmp_path, epochs=2, total_steps=2 * BATCHES)
    chase = trainer.optimizers[0]
    assert isinstance(chase, ChaseOptimizer) and chase.model is lit
    _assert_same_run(lit.net, chase, *_plain_loop(2, 2 * BATCHES))


@needs_lightning
def test_lightning_accumulation_bf16(tmp_path):
    steps = 2 * BATCHES // 2
    lit, trainer = _fit(tmp_path, epochs=2, total_steps=steps, accumulate_grad_batches=2, precision="bf16-mixed")
    chase = trainer.optimizers[0]
    assert chase.t == steps  # one optimizer step per accumulated batch
    _assert_same_run(lit.net, chase, *_plain_loop(2, steps, accumulate=2, bf16=True))


@needs_lightning
def test_lightning_fp16_mixed(tmp_path):
    # float16 autocast; Lightning adds its GradScaler on CUDA only (none on the CPU)
    lit, trainer = _fit(tmp_path, epochs=2, total_steps=BATCHES, accumulate_grad_batches=2, precision="16-mixed")
    chase = trainer.optimizers[0]
    assert chase.t == BATCHES and chase.slim_count >= 1
    assert all(torch.isfinite(p).all() for p in lit.parameters())


@needs_lightning
def test_lightning_resumes_slimmed_checkpoint(tmp_path):
    steps = 2 * BATCHES
    full, full_trainer = _fit(tmp_path / "full", epochs=2, total_steps=steps)
    half, half_trainer = _fit(tmp_path / "half", epochs=1, total_steps=steps)
    assert half_trainer.optimizers[0].slim_count >= 1  # the checkpoint holds narrower weights
    ckpt = str(tmp_path / "half.ckpt")
    half_trainer.save_checkpoint(ckpt)

    # without the callback Lightning loads the narrower weights into the full-width model
    with pytest.raises(RuntimeError, match="size mismatch"):
        _fit(tmp_path / "plain", epochs=2, total_steps=steps, ckpt_path=ckpt, callbacks=[])
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = LitNet(steps)
    trainer = _trainer(tmp_path / "resumed", max_epochs=2)
    trainer.fit(resumed, _loader(), ckpt_path=ckpt)
    _assert_same_run(resumed.net, trainer.optimizers[0], full.net, full_trainer.optimizers[0])


@needs_lightning
def test_lightning_weight_averaging_follows_slims(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    steps = 2 * BATCHES
    # without ChaseCallback the averaged copy no longer fits the model after the first slim
    with pytest.raises(RuntimeError, match="must match the size"):
        _fit(tmp_path / "plain", epochs=2, total_steps=steps, callbacks=[EMAWeightAveraging(decay=0.9)])
    ema = EMAWeightAveraging(decay=0.9)
    lit, trainer = _fit(tmp_path, epochs=2, total_steps=steps, callbacks=[ema, ChaseCallback()])
    assert trainer.optimizers[0].slim_count >= 2 and trainer.optimizers[0].t == steps
    # at the end of fit the callback copied the averaged weights into the (slimmed) model
    avg = ema._average_model.module
    assert [p.shape for p in avg.parameters()] == [p.shape for p in lit.parameters()]
    for a, b in zip(avg.parameters(), lit.parameters()):
        assert torch.equal(a, b)


@needs_lightning
def test_lightning_callback_refuses_a_second_chase(tmp_path):
    class Two(LitNet):
        def __init__(self, total_steps):
            super().__init__(total_steps)
            self.automatic_optimization = False  # Lightning's rule for several optimizers

        def configure_optimizers(self):
            return [_chase(self, self.total_steps), _chase(self, self.total_steps)]

    trainer = _trainer(tmp_path, max_epochs=1)
    with pytest.raises(ValueError, match="one is supported"):
        trainer.fit(Two(BATCHES), _loader())


@needs_lightning
def test_lightning_ddp_rewraps_and_resumes(tmp_path):
    # Lightning's "ddp" strategy starts rank 1 by running the script again, so this runs
    # examples/lightning_chase.py: 2 processes (gloo), interrupted after 2 of 4 epochs, resumed
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                          "lightning_chase.py")
    common = [sys.executable, script, "--devices", "2", "--epochs", "4", "--samples", "512",
              "--out", str(tmp_path / "ckpt")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for extra in (["--stop-after", "2"], ["--resume", str(tmp_path / "ckpt" / "last.ckpt"),
                                          "--report-dir", str(tmp_path)]):
        run = subprocess.run(common + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["t"] == r1["t"] == 4 * 512 // 64 // 2  # trained to the end through every slim
    assert r0["slims"] == r1["slims"] >= 2
    assert r0["report"] == r1["report"]
    assert sum(g["live"] for g in r0["report"]) < sum(g["channels"] for g in r0["report"])
    # the strategy's wrapper is a DDP built after the last slim
    assert r0["wrapper"] == "DistributedDataParallel" and r0["wrapper_slims"] == r0["slims"]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n])
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


# =========================================================================== accelerate
@pytest.fixture
def fresh_accelerate():
    # accelerate keeps one process-wide state; each test sets its own precision/accumulation
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerate_run(epochs: int, total_steps: int, *, accumulate: int = 1, bf16: bool = False,
                    resume_from=None, save_to=None, seed: int = 0):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate,
                                 mixed_precision="bf16" if bf16 else "no")
    torch.manual_seed(seed)
    net = Net()
    chase = _chase(net, total_steps)
    model, opt, loader = acc.prepare(net, chase, _loader())
    first = 0
    if resume_from is not None:
        chase_accelerate.enable_slimmed_resume(acc, chase)
        acc.load_state(resume_from)
        model = chase_accelerate.rewrap(acc, model, chase)
        first = chase.t * accumulate // BATCHES
    for _ in range(first, epochs):
        for x, y in loader:
            with acc.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
                model = chase_accelerate.rewrap(acc, model, chase)
    if save_to is not None:
        acc.save_state(save_to)
    return net, chase


@needs_accelerate
def test_accelerate_equals_plain_loop(fresh_accelerate):
    net, chase = _accelerate_run(2, 2 * BATCHES)
    _assert_same_run(net, chase, *_plain_loop(2, 2 * BATCHES))


@needs_accelerate
def test_accelerate_accumulation_bf16(fresh_accelerate):
    steps = 2 * BATCHES // 2
    net, chase = _accelerate_run(2, steps, accumulate=2, bf16=True)
    assert chase.t == steps
    _assert_same_run(net, chase, *_plain_loop(2, steps, accumulate=2, bf16=True))


@needs_accelerate
def test_accelerate_resumes_slimmed_state(tmp_path, fresh_accelerate):
    steps = 2 * BATCHES
    full_net, full = _accelerate_run(2, steps)
    AcceleratorState._reset_state(reset_partial_state=True)
    _, half = _accelerate_run(1, steps, save_to=str(tmp_path / "half"))
    assert half.slim_count >= 1

    # load_state alone loads the narrower weights into the full-width model first
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = accelerate.Accelerator(cpu=True)
    net = Net()
    acc.prepare(net, _chase(net, steps))
    with pytest.raises(RuntimeError, match="size mismatch"):
        acc.load_state(str(tmp_path / "half"))

    AcceleratorState._reset_state(reset_partial_state=True)
    net, chase = _accelerate_run(2, steps, resume_from=str(tmp_path / "half"), seed=123)
    _assert_same_run(net, chase, full_net, full)


@needs_accelerate
def test_accelerate_rewrap_checks_its_arguments(fresh_accelerate):
    acc = accelerate.Accelerator(cpu=True)
    net = Net()
    chase = _chase(net, BATCHES)
    with pytest.raises(ValueError, match="not prepared by this accelerator"):
        chase_accelerate.rewrap(acc, net, chase)
    model, opt = acc.prepare(net, chase)
    assert chase_accelerate.rewrap(acc, model, opt) is model  # one process: nothing to re-wrap
    with pytest.raises(ValueError, match="another one"):
        chase_accelerate.rewrap(acc, Net(), chase)
    with pytest.raises(TypeError, match="must be a chase_ext.ChaseOptimizer"):
        chase_accelerate.rewrap(acc, model, torch.optim.SGD(Net().parameters(), lr=0.1))


def _accelerate_ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(100)  # a hung rank prints where it hangs (the test kills it at 150 s)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    steps = 4 * 4
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    net = Net()
    chase = _chase(net, steps)
    model, opt, loader = acc.prepare(net, chase, _loader())  # DDP, and half the batches per rank
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    wraps = 0
    for _ in range(4):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            new = chase_accelerate.rewrap(acc, model, chase)
            wraps += new is not model
            model = new
    torch.save({"t": chase.t, "slims": chase.slim_count, "wraps": wraps, "report": chase.channel_report(),
                "masks": dict(chase.masks), "params": {n: p.detach() for n, p in net.named_parameters()},
                # no stale wrapper left with the accelerator (it keeps the module itself on CPUs, the
                # DDP wrapper on GPUs; rewrap replaces the latter)
                "registered": all(m is model or m is net for m in acc._models)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    acc.end_training()
    # the DDP wrappers hold the process group: drop them before ending it (dist_teardown.py)
    acc.free_memory()
    model = new = opt = chase = loss = loader = acc = None
    end_process_group()


def _spawn_accelerate_ranks(out_dir: str, limit_s: float) -> bool:
    """Runs the two ranks; False if they have not finished within limit_s (then killed)."""
    ctx = mp.spawn(_accelerate_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            return False
    return True


@needs_accelerate
def test_accelerate_ddp_rewraps_after_slims(tmp_path):
    # The ranks finish in about 10 s. Twice in many runs (once in a full CI suite, never
    # alone) they hung in start-up or a collective; each rank then prints its Python stack
    # (faulthandler, stderr) before the limit, and the run is tried once more on a new port.
    # Two hangs in a row fail the test.
    if not _spawn_accelerate_ranks(str(tmp_path), 150):
        warnings.warn("accelerate DDP ranks hung once (stacks in captured stderr); retrying on a new port")
        assert _spawn_accelerate_ranks(str(tmp_path), 150), "the 2 accelerate processes hung twice (150 s each)"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["t"] == r1["t"] == 16
    assert r0["slims"] == r1["slims"] == r0["wraps"] == r1["wraps"] >= 2
    assert r0["registered"] and r1["registered"]
    assert r0["report"] == r1["report"]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n])
    for n in r0["params"]:  # (BatchNorm's running statistics are each rank's own)
        assert torch.equal(r0["params"][n], r1["params"][n]), n


# =========================================================================== FSDP2
def test_fsdp2_sharded_model_is_refused_clearly():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):  # before torch 2.6 it lived here
        fsdp = pytest.importorskip("torch.distributed._composable.fsdp")
    fully_shard = fsdp.fully_shard
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    net = None
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        net = Net()
        for m in (net.fc1, net.fc2, net.head, net):
            fully_shard(m)
        with pytest.raises(TypeError, match=r"DTensor.*FSDP2.*DistributedDataParallel instead"):
            _chase(net, BATCHES)
    finally:
        net = None  # its sharded parameters hold the process group (dist_teardown.py)
        end_process_group()


def test_fsdp1_wrapped_model_is_refused_clearly():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    wrapped = None
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        wrapped = fsdp.FullyShardedDataParallel(Net(), device_id=torch.device("cpu"), use_orig_params=True)
        with pytest.raises(TypeError, match=r"the model itself is wrapped in FullyShardedDataParallel.*"
                                            r"DistributedDataParallel instead"):
            _chase(wrapped, BATCHES)
    finally:
        wrapped = None  # it holds the process group (dist_teardown.py)
        end_process_group()
