"""Usability of the public API: package attributes, config coercion, warnings, messages, CLIs."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
import sys
import warnings

import pytest
import torch
from torch import nn

import chase_ext
from chase_ext import demo
from chase_ext.config import ChaseConfig
from chase_ext.graph import find_channel_groups
from chase_ext.sparsity import find_sparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the subprocess imports the chase_ext this process tests (the source tree when installed
# editable, site-packages otherwise), from a neutral folder: not the source tree via cwd
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(chase_ext.__file__)))
ENV = dict(os.environ, PYTHONPATH=_PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _net(in_ch=1):
    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 10),
    )


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          cwd=tempfile.gettempdir(), timeout=300)


# --------------------------------------------------------------------------- 1. package
def test_submodules_reachable_after_plain_import():
    code = """
import sys, torch, chase_ext
light = ('chase_ext.reference', 'chase_ext.layout')  # the oracle and its pure-Python layout rules
lazy = sorted(m for m in sys.modules if m.startswith('chase_ext.') and m not in light)
assert lazy == [], lazy  # the import itself stays light: no compiled ops, no optimizer
m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 3))
dense = chase_ext.slim.export_dense(m)
assert isinstance(dense, torch.nn.Module)
for name in ('reference', 'ops', 'graph', 'config', 'distributed', 'slim'):
    assert getattr(chase_ext, name).__name__.startswith('chase_ext.'), name
assert chase_ext.ops.mask_update_ is sys.modules['chase_ext._ops'].mask_update_
import chase_ext.ops
from chase_ext.ops import build_info
assert chase_ext.ops.build_info is sys.modules['chase_ext._ops'].build_info and 'version' in build_info()
print('ok')
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_all_and_dir():
    for name in ("ChaseOptimizer", "ChaseConfig", "rewrap_ddp", "ops", "reference", "slim", "graph", "config"):
        assert name in chase_ext.__all__, name
        assert name in dir(chase_ext), name
        assert getattr(chase_ext, name) is not None
    assert chase_ext.ChaseConfig is ChaseConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        chase_ext.nope


# --------------------------------------------------------------------------- 2. config
def test_numpy_scalars_accepted_as_python_numbers():
    np = pytest.importorskip("numpy")
    c = ChaseConfig(density=np.float32(0.25), total_steps=np.int64(100), update_interval=np.int64(10),
                    t_end=np.float64(0.5), channel_end=np.float32(0.5), round_to=np.int32(4),
                    slim_during_training=np.int64(2), seed=np.uint64(7), soft_bound=np.float32(0.1))
    assert type(c.density) is float and c.density == pytest.approx(0.25)
    assert type(c.total_steps) is int and c.total_steps == 100
    assert type(c.update_interval) is int and c.update_steps == 10
    assert type(c.t_end) is float and c.t_end_steps == 50 and c.channel_end_steps == 50
    assert type(c.round_to) is int and c.slim_every == 2 and type(c.seed) is int and c.seed == 7
    with pytest.raises(TypeError, match="total_steps"):
        ChaseConfig(density=0.1, total_steps=np.float64(100.0))  # a float is not a step count
    with pytest.raises(TypeError, match="density"):
        ChaseConfig(density=np.bool_(True), total_steps=10)
    with pytest.raises(TypeError, match="total_steps"):
        ChaseConfig(density=0.1, total_steps=True)


@pytest.mark.parametrize("seed", [2**70, 2**64, -1])
def test_seed_out_of_range_names_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        ChaseConfig(density=0.1, total_steps=10, seed=seed)


def test_seed_limits_work_with_torch_generator():
    c = ChaseConfig(density=0.1, total_steps=10, seed=2**64 - 1)
    torch.Generator().manual_seed(c.seed)


# --------------------------------------------------------------------------- 3. unmatched patterns
def test_unmatched_exclude_warns_once_per_pattern():
    m = _net()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        names = [n for n, _ in find_sparse(m, ("0.weigth", "7", "1", "3.*"))]
    msgs = [str(x.message) for x in w if issubclass(x.category, UserWarning)]
    assert names == ["0.weight"]
    assert len(msgs) == 2, msgs  # '1' is a BatchNorm: excludes no Conv/Linear weight
    assert "'0.weigth'" in msgs[0] and "'1'" in msgs[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_sparse(m, ("0", "7.weight"))) == 1
        assert len(find_sparse(m)) == 3


def test_unmatched_exclude_channels_warns_once_per_pattern():
    m = _net()
    x = torch.randn(1, 1, 8, 8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gs = find_channel_groups(m, x, exclude_channels=["nomatch*", "0", "features.3", "3.weight"])
    msgs = [str(x.message) for x in w if issubclass(x.category, UserWarning)]
    assert gs == []
    assert len(msgs) == 2 and "'nomatch*'" in msgs[0] and "'features.3'" in msgs[1], msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [g.producers for g in find_channel_groups(m, x, exclude_channels="3*")] == [["0"]]


def test_optimizer_passes_the_warnings_on():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="exclude pattern '0.weigth'"):
        chase_ext.ChaseOptimizer(opt, m, density=0.5, total_steps=10, exclude=["0.weigth"], backend="reference")


# --------------------------------------------------------------------------- 4. example_inputs
def test_wrong_example_inputs_message_leads_with_the_model_error(capfd):
    m = _net(in_ch=1)
    flags = [mod.training for mod in m.modules()]
    with pytest.raises(ValueError) as ei:
        find_channel_groups(m, torch.randn(1, 3, 32, 32))
    msg = str(ei.value)
    assert msg.startswith("chase_ext: example_inputs do not run through Sequential: RuntimeError: ")
    assert "expected input[1, 3, 32, 32] to have 1 channels" in msg
    assert "layer '0' (Conv2d)" in msg and "[1, 3, 32, 32]" in msg
    assert "ShapeProp" not in msg and "While executing" not in msg and len(msg) < 400
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert "Traceback" not in capfd.readouterr().err
    assert [mod.training for mod in m.modules()] == flags


# --------------------------------------------------------------------------- 5. demo CLI
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--device", "gpu"], "--device"),
        (["--device", "tpu:0"], "--device"),
        (["--threads", "0"], "--threads"),
        (["--batch-size", "0"], "--batch-size"),
        (["--train-size", "0"], "--train-size"),
        (["--train-size", "4500"], "--train-size"),
        (["--test-size", "0"], "--test-size"),
        (["--test-size", "5000"], "--test-size"),
        (["--epochs", "0"], "--epochs"),
        (["--quick", "--epochs", "-1"], "--epochs"),
        (["--density", "0"], "--density"),
        (["--density", "nan"], "--density"),
        (["--sc", "1"], "--channel-sparsity"),
        (["--lr", "-0.1"], "--lr"),
        (["--bench-batch", "0"], "--bench-batch"),
        (["--bench-rounds", "0"], "--bench-rounds"),
        (["--seed", "-1"], "--seed"),
        (["--out", __file__], "--out"),
    ],
)
def test_demo_rejects_bad_flags(argv, words, capsys):
    p = demo.build_parser()
    args = p.parse_args(argv)
    with pytest.raises(SystemExit) as ei:
        demo._settings(args, p)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and words in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_demo_rejects_cuda_without_cuda(capsys):
    p = demo.build_parser()
    with pytest.raises(SystemExit) as ei:
        demo._settings(p.parse_args(["--device", "cuda"]), p)
    assert ei.value.code == 2 and "no usable CUDA device" in capsys.readouterr().err


def test_demo_accepts_good_flags(tmp_path):
    p = demo.build_parser()
    out = ["--out", str(tmp_path / "report")]  # _settings makes the folder
    s = demo._settings(p.parse_args(["--quick", "--threads", "1", "--device", "cpu", "--test-size", "4000", *out]), p)
    assert s == dict(epochs=2, train_size=1000, bench_rounds=3)  # --quick's 2000, cut to the digits left
    s = demo._settings(p.parse_args(["--train-size", "4000", *out]), p)
    assert s == dict(epochs=12, train_size=4000, bench_rounds=9)


def test_demo_help_has_one_default_per_flag():
    text = demo.build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("default") == text.count("(default")
    for block in text.split("\n  --")[1:]:
        assert block.count("default") <= 1, block


# --------------------------------------------------------------------------- 6. CIFAR example
def _example():
    spec = importlib.util.spec_from_file_location("cifar10_example_api", os.path.join(ROOT, "examples", "cifar10.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cifar_example_validates_flags(capsys):
    ex = _example()
    for argv in (["--epochs", "0"], ["--width", "0"], ["--workers", "-1"], ["--threads", "0"], ["--fake-data", "-3"]):
        with pytest.raises(SystemExit) as ei:
            ex.main(argv)
        assert ei.value.code == 2
        assert f"error: {argv[0]}" in capsys.readouterr().err, argv
    args = ex.build_parser().parse_args(["--epochs", "-1", "--device", "cpu"])
    with pytest.raises(ValueError, match="--epochs"):
        ex.run(None, None, args)
    assert ex.MIN_SIZE == 32 and "32 x 32" in ex.__doc__ and "32 x 32" in ex.build_parser().format_help()


def test_cifar_example_rejects_small_images(tmp_path):
    ex = _example()
    ds = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    args = ex.build_parser().parse_args(["--epochs", "4", "--batch-size", "4", "--out", str(tmp_path), "--device",
                                         "cpu", "--workers", "0"])
    with pytest.raises(ValueError, match=r"at least 32 x 32 pixels.*\[1, 28, 28\]"):
        ex.run(ds, ds, args)


def test_cifar_example_without_torchvision_exits_cleanly():
    code = f"""
import sys, runpy
sys.modules['torchvision'] = None  # as if not installed
sys.argv = ['cifar10.py', '--epochs', '1', '--device', 'cpu']
runpy.run_path({os.path.join(ROOT, 'examples', 'cifar10.py')!r}, run_name='__main__')
"""
    r = _python(code)
    assert r.returncode == 1, r
    assert "pip install torchvision" in r.stderr and "Traceback" not in r.stderr, r.stderr
