"""Masks and channel choices are identical on every rank under DDP (gloo, 2 processes,
different data per rank), with no user code beyond wrapping the model."""
from __future__ import annotations

import os
import warnings
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import vgg_small

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, backend: str, grow: str, slim: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from dist_teardown import end_process_group

    ddp = opt = chase = new = loss = None
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from chase_ext import rewrap_ddp
        from chase_ext.optimizer import ChaseOptimizer
        from models import example_input, vgg_small

        torch.manual_seed(0)  # same init on every rank (DDP broadcasts rank 0's anyway)
        model = vgg_small()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        chase = ChaseOptimizer(
            opt, ddp, density=0.2, total_steps=STEPS, update_interval=5, channel_sparsity=0.4,
            channel_end=0.5, example_inputs=example_input("vgg_small"), grow=grow, backend=backend,
            slim_during_training=slim,
        )
        wraps = 0
        g = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(STEPS):
                x = torch.randn(4, 3, 32, 32, generator=g)
                y = torch.randint(0, 10, (4,), generator=g)
                loss = nn.functional.cross_entropy(ddp(x), y)
                chase.zero_grad()
                loss.backward()
                chase.step()
                if slim:
                    new = rewrap_ddp(ddp, chase)  # the one line DDP needs after a slim
                    wraps += new is not ddp
                    ddp = new
        torch.save(
            {"masks": chase.masks, "report": chase.channel_report(), "t": chase.t,
             "wraps": wraps, "slims": chase.slim_count,
             "rewrap_warnings": sum("re-wrap" in str(w.message) for w in seen),
             "params": [p.detach() for p in model.parameters()]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        ddp = opt = chase = new = loss = None  # they hold the process group (dist_teardown.py)
        end_process_group()


@pytest.mark.parametrize("slim", [False, True], ids=["masked", "slim_during_training"])
def test_ddp_masks_identical(tmp_path, slim, grow="gradient"):
    try:
        import chase_ext._ops  # noqa: F401

        backend = "native"
    except Exception:
        backend = "reference"
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), backend, grow, slim), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["t"] == r1["t"] == STEPS
    assert r0["report"] == r1["report"]
    assert sum(r["live"] for r in r0["report"]) < sum(r["channels"] for r in r0["report"])
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    if slim:
        # slimmed at every channel event that removed something, re-wrapped exactly then
        assert r0["slims"] == r1["slims"] == r0["wraps"] == r1["wraps"] >= 1
        assert r0["rewrap_warnings"] == 0  # the loop re-wraps: no warning per slim
        for n, m in r0["masks"].items():
            assert m.shape == r1["masks"][n].shape
        assert sum(p.numel() for p in r0["params"]) < sum(p.numel() for p in vgg_small().parameters())


def test_rewrap_ddp_rejects_non_ddp():
    from chase_ext import rewrap_ddp

    with pytest.raises(TypeError, match="ddp must be a torch.nn.parallel.DistributedDataParallel"):
        rewrap_ddp(nn.Linear(2, 2))


def _rewrap_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """The documented loop with a slim at step 1 (no warning); a ChaseOptimizer on the bare
    model under DDP whose loop never re-wraps (a warning at the step after the slim); what
    rewrap_ddp carries over (settings, rank-local buffers) and what it says it drops."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from dist_teardown import end_process_group

    ddp = opt = chase = loss = new = None
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    try:
        from chase_ext import rewrap_ddp
        from chase_ext.optimizer import ChaseOptimizer
        from models import example_input

        g = torch.Generator().manual_seed(1000 + rank)

        def run(ddp, chase, steps, rewrap):
            for _ in range(steps):
                x = torch.randn(4, 3, 32, 32, generator=g)
                loss = nn.functional.cross_entropy(ddp(x), torch.randint(0, 10, (4,), generator=g))
                chase.zero_grad()
                loss.backward()
                chase.step()
                if rewrap:
                    ddp = rewrap_ddp(ddp, chase)
            return ddp

        kw = dict(density=0.3, total_steps=12, update_interval=2, channel_sparsity=0.4, channel_end=0.5,
                  example_inputs=example_input("vgg_small"), slim_during_training=True)
        for case, on_ddp, rewrap in (("documented", True, True), ("bare_forgotten", False, False)):
            torch.manual_seed(0)
            model = vgg_small()
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=not rewrap)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            chase = ChaseOptimizer(opt, ddp if on_ddp else model, **kw)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                ddp = run(ddp, chase, 1 if rewrap else 2, rewrap)  # the first slim is at step 1
                if rewrap:
                    ddp = run(ddp, chase, 3, rewrap)
            out[case] = {"slims": chase.slim_count,
                         "warnings": [str(w.message) for w in seen if "rewrap_ddp(ddp, chase)" in str(w.message)]}
            ddp = opt = chase = loss = None

        # several processes, no DDP at all (each rank trains its own model): said once a run
        torch.manual_seed(0)
        model = vgg_small()
        chase = ChaseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, **kw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run(model, chase, 6, False)
        out["no_ddp"] = {"slims": chase.slim_count,
                         "warnings": [str(w.message) for w in seen if "rewrap_ddp(ddp, chase)" in str(w.message)]}
        chase = None

        torch.manual_seed(0)
        model = vgg_small()
        ddp = nn.parallel.DistributedDataParallel(model, skip_all_reduce_unused_params=True, batched_grad_copy=True,
                                                  forward_sync_buffers=False)
        ddp.register_comm_hook(None, lambda state, bucket: torch.futures.Future().set_result(bucket.buffer()))
        bn = model.features[1]
        with torch.no_grad():
            bn.running_mean.fill_(float(rank))  # rank-local statistics, which DDP leaves alone here
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            new = rewrap_ddp(ddp)
        out["settings"] = {"skip": new.skip_all_reduce_unused_params, "batched": new.batched_grad_copy,
                           "buckets": (new.bucket_bytes_cap_default, new.bucket_bytes_cap),
                           "sync": new.forward_sync_buffers, "mean": float(bn.running_mean[0]),
                           "warned": [str(w.message) for w in seen if "not carried over" in str(w.message)]}
        torch.save(out, os.path.join(out_dir, f"wrap{rank}.pt"))
    finally:
        ddp = opt = chase = new = loss = None
        end_process_group()


def test_rewrap_warnings_and_settings(tmp_path):
    params = __import__("inspect").signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if not {"skip_all_reduce_unused_params", "batched_grad_copy", "forward_sync_buffers"} <= set(params):
        pytest.skip("this torch's DistributedDataParallel predates the settings checked here")
    mp.spawn(_rewrap_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"wrap{rank}.pt", weights_only=False)
        assert r["documented"]["slims"] >= 1 and r["documented"]["warnings"] == []
        assert r["bare_forgotten"]["slims"] >= 1
        assert len(r["bare_forgotten"]["warnings"]) == 1 and "shrank at step 1" in r["bare_forgotten"]["warnings"][0]
        assert r["no_ddp"]["slims"] >= 2 and len(r["no_ddp"]["warnings"]) == 1
        s = r["settings"]
        assert s["skip"] and s["batched"] and s["sync"] is False
        assert s["buckets"] == (True, 25 * 2**20)  # DDP's default sizes, its small first bucket included
        assert s["mean"] == float(rank)  # not overwritten by rank 0's at the re-wrap
        assert len(s["warned"]) == 1 and "communication hook" in s["warned"][0]
