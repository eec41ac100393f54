"""Smoke test of an installed chase_ext against the environment's own torch (run by
.ci/run after `pip install .`, and after an on-import build): the kernels load, their
build record names the running torch, and a short ChaseOptimizer run on the native
kernels makes the same masks as on the pure-PyTorch reference."""
import json
import os
import sys

import torch
from torch import nn

import chase_ext
import chase_ext._ops as ops
from chase_ext import _build, _loader

lib = ops._C.__file__
rec = _loader._read_record(os.path.dirname(lib))
print(f"chase_ext {chase_ext.__file__}\n_C {lib}\ntorch {torch.__version__}; build record: {json.dumps(rec)}")
if not _loader._matches(rec, _build.torch_identity()):
    sys.exit(f"smoke test: the loaded _C was built for {rec}, not for the running torch")


def run(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    chase = chase_ext.ChaseOptimizer(opt, model, density=0.3, channel_sparsity=0.25, total_steps=12,
                                     update_interval=2, channel_end=0.5, example_inputs=torch.randn(2, 1, 8, 8),
                                     backend=backend)
    for _ in range(12):
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
        chase.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        chase.step()
    return {k: v.clone() for k, v in chase.masks.items()}, chase.active_count()


native, n_active = run("native")
reference, r_active = run("reference")
assert n_active == r_active and all(torch.equal(native[k], reference[k]) for k in native), "native != reference"
print(f"smoke test passed: {n_active} active weights, native == reference masks")
