"""The deploy path (chase_ext.deploy): folded == unfolded, layout/dtype, export, ONNX."""
from __future__ import annotations

import gc
import importlib.util
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from chase_ext.deploy import conv_add_relu, conv_add_relu_, cuda_graph_runner, deploy
from chase_ext.graph import find_channel_groups
from chase_ext.slim import slim_

from models import MODELS, example_input, perturb_bn, resnet_bottleneck

_BENCH_MODELS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "models.py")


def _bench_resnet50():
    spec = importlib.util.spec_from_file_location("_bench_models", _BENCH_MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.resnet50


def _perturb_bn(model, seed=1):
    return perturb_bn(model, seed, mean_scale=0.3, var_min=0.3, bias_scale=0.2)


def _n_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _close(got, ref, rtol=1e-5):
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=rtol * scale + 1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_equals_unfolded(name):
    torch.manual_seed(0)
    model = _perturb_bn(MODELS[name]()).eval()
    x = example_input(name, batch=4)
    dep = deploy(model, x)
    with torch.no_grad():
        ref, got = model(x), dep(x)
    _close(got, ref)
    # every BN of these models follows a conv/linear that feeds only it, but those after a concatenation
    after_cat = {"densenet_small": 7, "inception_small": 1}.get(name, 0)
    assert len(dep.folded) == _n_bn(model) - after_cat and _n_bn(model) > 0
    assert _n_bn(dep) == after_cat
    assert not dep.training and not any(p.requires_grad for p in dep.parameters())
    assert model.training is False and _n_bn(model) > 0  # the caller's model is untouched


def test_deploy_leaves_training_flags_and_weights_alone():
    model = _perturb_bn(MODELS["resnet_bottleneck"]()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy(model, example_input("resnet_bottleneck"))
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resnet50_folds_every_norm():
    model = _perturb_bn(_bench_resnet50()(width_div=4)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dep = deploy(model, x)
    assert len(dep.folded) == 53  # stem + 3 per bottleneck x 16 + 4 downsample
    assert ("layer1.0.downsample.0", "layer1.0.downsample.1") in dep.folded
    with torch.no_grad():
        _close(dep(x), model(x))


def test_fuse_relu():
    model = _perturb_bn(_bench_resnet50()(width_div=8)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dep = deploy(model, x, fuse_relu=True)
    # stem + conv1, conv2 and conv3 (+ the residual) of 16 bottlenecks; downsample convs feed the add
    assert len(dep.fused) == 49 and "layer1.0.conv3" in dep.fused and "layer1.0.downsample.0" not in dep.fused
    calls = [n for n in dep.graph.nodes if n.target in (conv_add_relu, conv_add_relu_)]
    assert len(calls) == 49 and sum(n.args[3] is not None for n in calls) == 16
    # every residual is the model's own and dead after the add: written over in place
    assert sum(n.target is conv_add_relu_ for n in calls) == 16
    assert not any(isinstance(m, nn.ReLU) for m in dep.modules())
    with torch.no_grad():
        _close(dep(x), model(x))
    ep = torch.export.export(dep, (x,))
    with torch.no_grad():
        _close(ep.module()(x), model(x))
    # traced for export, the fused convs are the portable plain ops (no oneDNN / cuDNN calls)
    assert not any("mkldnn" in str(n.target) or "cudnn" in str(n.target) for n in ep.graph.nodes)
    # a relu whose conv output is read elsewhere stays unfused
    shared = _perturb_bn(_SharedOutput()).eval()
    assert deploy(shared, torch.randn(2, 4, 8, 8), fuse_relu=True).fused == []
    with pytest.raises(ValueError, match="fuse_relu"):
        deploy(model, x, fold=False, fuse_relu=True)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fuse_relu_cpu_is_one_onednn_call(channels_last):
    model = _perturb_bn(_bench_resnet50()(width_div=8)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dep = deploy(model, x, fuse_relu=True, channels_last=channels_last)
    xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad(), _OpCounter() as count:
        y = dep(xi)
    # 49 fused convs: one oneDNN call each, no separate add / relu kernels; the 4 downsample convs stay plain;
    # the 16 with a residual write their result over it
    assert count.ops.get("mkldnn._convolution_pointwise") == 33
    assert count.ops.get("mkldnn._convolution_pointwise_") == 16
    assert "aten.relu" not in count.ops and "aten.add" not in count.ops and "aten.relu_" not in count.ops
    assert count.ops.get("aten.convolution") == 4
    with torch.no_grad():
        _close(y, model(x))
    # with autograd live (an input that needs a gradient) the plain ops run, and the gradient flows
    xg = xi.clone().requires_grad_(True)
    with _OpCounter() as count:
        out = dep(xg)
    assert "mkldnn._convolution_pointwise" not in count.ops and "mkldnn._convolution_pointwise_" not in count.ops
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # other dtypes take the plain ops too (torch's fused add + relu refuses bfloat16)
    dep16 = deploy(model, x, fuse_relu=True, dtype=torch.bfloat16)
    with torch.no_grad(), _OpCounter() as count:
        dep16(x.bfloat16())
    assert not {"mkldnn._convolution_pointwise", "mkldnn._convolution_pointwise_"} & set(count.ops)
    assert count.ops.get("aten.convolution") == 53


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build")
@pytest.mark.parametrize("z_channels_last", [False, True])
@pytest.mark.parametrize("x_channels_last", [False, True])
@pytest.mark.parametrize("conv", [(12, 64, 1, 1, 0, 1), (8, 16, 3, 1, 1, 1), (8, 16, 3, 2, 1, 1), (8, 16, 3, 1, 2, 2),
                                  (16, 16, 3, 1, 1, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_add_relu_in_place_equals_out_of_place(conv, bias, x_channels_last, z_channels_last):
    cin, cout, k, stride, pad, groups = conv
    g = torch.Generator().manual_seed(cin * 100 + k * 10 + stride)
    cl = torch.channels_last
    x = torch.randn(3, cin, 11, 9, generator=g)
    w = torch.randn(cout, cin // groups, k, k, generator=g)
    b = torch.randn(cout, generator=g) if bias else None
    if x_channels_last:
        x, w = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
    args = ((stride, stride), (pad, pad), (1, 1), groups)
    plain = torch.nn.functional.conv2d(x, w, b, *args)
    z = torch.randn(plain.shape, generator=g)
    if z_channels_last:
        z = z.contiguous(memory_format=cl)
    want = torch.relu(plain + z)
    with torch.inference_mode():
        out_of_place = conv_add_relu(x, w, b, z, *args)
        zi = z.clone(memory_format=torch.preserve_format)
        got = conv_add_relu_(x, w, b, zi, *args)
    # oneDNN ran it where the two layouts agree, in place: the result is z's storage
    assert got.data_ptr() == zi.data_ptr()
    if groups == 1:
        assert torch.equal(got, out_of_place)
    else:  # grouped convs in channels_last: oneDNN may pick another kernel for the in-place call
        torch.testing.assert_close(got, out_of_place, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # a residual oneDNN cannot take in place (a broadcast, a view, autograd) is left alone
    with torch.inference_mode():
        zb = torch.randn(1, cout, 1, 1, generator=g)
        keep = zb.clone()
        yb = conv_add_relu_(x, w, b, zb, *args)
        assert torch.equal(zb, keep) and yb.shape == plain.shape
        torch.testing.assert_close(yb, torch.relu(plain + zb), rtol=1e-5, atol=1e-4)
    zv = torch.randn(2, *plain.shape, generator=g)[0]
    keep = zv.clone()
    with torch.inference_mode():
        conv_add_relu_(x, w, b, zv, *args)
    assert torch.equal(zv, keep)
    zg = z.clone().requires_grad_(True)
    yg = conv_add_relu_(x, w, b, zg, *args)
    assert yg.data_ptr() != zg.data_ptr() and yg.requires_grad


class _ResidualReadAgain(nn.Module):
    """Residual adds whose residual must survive: the graph's input, a tensor read after
    the add, and one whose view (made before the add) is read after it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.conv5 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a = torch.relu(self.conv1(x) + x)  # x: the caller's tensor
        r = self.conv2(a)
        b = torch.relu(self.conv3(a) + r)  # r: read again below
        v = b.flatten(1)  # a view of b, read at the end
        c = torch.relu(self.conv4(a) + b)
        d = torch.relu(self.conv5(a) + c)  # c: the model's own, read by nothing else: written over
        return d + r + v.view_as(d)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not in this torch build")
def test_residuals_read_elsewhere_are_not_overwritten():
    model = _ResidualReadAgain().eval()
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(0))
    dep = deploy(model, x, fuse_relu=True)
    targets = [n.target for n in dep.graph.nodes if n.target in (conv_add_relu, conv_add_relu_)]
    assert targets == [conv_add_relu, conv_add_relu, conv_add_relu, conv_add_relu_]
    keep = x.clone()
    with torch.inference_mode():
        y = dep(x)
    assert torch.equal(x, keep)
    with torch.no_grad():
        _close(y, model(x))


class _BroadcastResidual(nn.Module):
    """A residual add that broadcasts one conv's (N, C, 1, 1) output (a conv on the pooled
    map) up to the other's shape: no fused add takes that; the stem still fuses."""

    def __init__(self, ctx_first):
        super().__init__()
        self.ctx_first = ctx_first
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.ctx = nn.Conv2d(8, 8, 1)
        self.local = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        c, loc = self.ctx(s.mean((2, 3), keepdim=True)), self.local(s)
        return torch.relu(c + loc if self.ctx_first else loc + c)


class _SelfAdd(nn.Module):
    """relu(y + y): the residual is the conv output itself."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(torch.relu(self.stem(x)))
        return torch.relu(y + y)


@pytest.mark.parametrize("make", [lambda: _BroadcastResidual(True), lambda: _BroadcastResidual(False), _SelfAdd],
                         ids=["broadcast-ctx-first", "broadcast-ctx-second", "self-add"])
def test_fuse_relu_leaves_unfusable_adds(make):
    torch.manual_seed(0)
    model = _perturb_bn(make()).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dep = deploy(model, x, fuse_relu=True)
    assert dep.fused == ["stem"]
    assert sum(n.target is torch.relu for n in dep.graph.nodes) == 1  # the add's relu stays
    with torch.no_grad():
        _close(dep(x), model(x))


def test_slim_model_folds_and_matches():
    torch.manual_seed(0)
    model = _perturb_bn(resnet_bottleneck()).eval()
    x = example_input("resnet_bottleneck", batch=4)
    groups = find_channel_groups(model, x)
    g = torch.Generator().manual_seed(2)
    slim_(model, groups, [torch.randperm(gr.channels, generator=g)[: max(1, gr.channels // 3)].sort().values
                          for gr in groups])
    dep = deploy(model, x)
    with torch.no_grad():
        _close(dep(x), model(x))
    assert len(dep.folded) == _n_bn(model)


class _SharedOutput(nn.Module):
    """conv1's output feeds its BN and a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn_twice = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.conv1(x)
        b = self.bn1(a) + a
        c = self.bn2(self.conv2(b))
        d = self.bn_twice(self.conv3(c))
        return self.bn_twice(d)  # a norm called twice is left alone


class _LinearSeq(nn.Module):
    """BatchNorm1d after a linear on a 3-D input normalizes dim 1, not the features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):  # x: (N, 5, 6) -> (N, 5, 5); BN reads dim 1 (5 positions)
        return self.bn(self.fc(x))


def test_only_exact_folds():
    model = _perturb_bn(_SharedOutput()).eval()
    x = torch.randn(2, 4, 8, 8)
    dep = deploy(model, x)
    assert dep.folded == [("conv2", "bn2")]
    with torch.no_grad():
        _close(dep(x), model(x))
    seq = _perturb_bn(_LinearSeq()).eval()
    xs = torch.randn(3, 5, 6)
    dep = deploy(seq, xs)
    assert dep.folded == []
    with torch.no_grad():
        _close(dep(xs), seq(xs))


def test_layout_and_dtype():
    model = _perturb_bn(MODELS["resnet_basic"]()).eval()
    x = example_input("resnet_basic", batch=4)
    dep = deploy(model, x, channels_last=True, dtype=torch.bfloat16)
    convs = [m for m in dep.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    with torch.no_grad():
        ref = model(x)
        got = dep(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    _close(got, ref, rtol=0.05)


class _Conv3dThen2d(nn.Module):
    """A Conv3d (5-D weight, no channels_last layout) feeding a Conv2d (4-D: channels_last)."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(3, 4, 3, padding=1)
        self.bn3d = nn.BatchNorm3d(4)
        self.conv2d = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 25, 2)

    def forward(self, x):  # x: (N, 3, 4, 5, 5)
        h = torch.relu(self.bn3d(self.conv3d(x)))
        h = torch.relu(self.bn2d(self.conv2d(h.flatten(1, 2))))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_channels_last_leaves_5d_weights_alone(fuse_relu):
    model = _perturb_bn(_Conv3dThen2d()).eval()
    x = torch.randn(2, 3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    dep = deploy(model, x, channels_last=True, fuse_relu=fuse_relu)
    assert dep.conv2d.weight.is_contiguous(memory_format=torch.channels_last)
    assert dep.conv3d.weight.dim() == 5 and dep.conv3d.weight.is_contiguous()
    assert dep.fused == (["conv2d"] if fuse_relu else [])
    with torch.no_grad():
        _close(dep(x), model(x))


def test_example_inputs_the_model_does_not_accept(capfd):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
    with pytest.raises(ValueError, match=r"example_inputs do not run through Sequential.*layer '0' \(Conv2d\)"):
        deploy(model, torch.randn(2, 4, 8, 8))
    assert capfd.readouterr().err == ""  # the error carries the cause: no traceback printed


def test_bad_input():
    model = MODELS["mlp"]()
    x = example_input("mlp")
    with pytest.raises(ValueError, match="dtype"):
        deploy(model, x, dtype=torch.int8)
    with pytest.raises(TypeError, match="example_inputs"):
        deploy(model, None)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: fx cannot trace

    with pytest.raises(ValueError, match="fold=False"):
        deploy(Branchy(), x)
    dep = deploy(Branchy(), x, fold=False)
    assert dep.folded == [] and not dep.training


def test_torch_export():
    model = _perturb_bn(MODELS["resnet_bottleneck"]()).eval()
    x = example_input("resnet_bottleneck", batch=2)
    dep = deploy(model, x)
    ep = torch.export.export(dep, (x,))
    with torch.no_grad():
        _close(ep.module()(x), model(x))
    # no batch_norm left in the exported graph
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_onnx_matches_onnxruntime(tmp_path, fuse_relu):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx.export (dynamo) needs it
    model = _perturb_bn(MODELS["resnet_bottleneck"]()).eval()
    x = example_input("resnet_bottleneck", batch=2)
    dep = deploy(model, x, fuse_relu=fuse_relu)
    assert bool(dep.fused) == fuse_relu
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(dep, (x,), path, input_names=["x"], output_names=["y"], dynamo=True)
    import onnx

    graph = onnx.load(path).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(["y"], {"x": x.numpy()})
    with torch.no_grad():
        _close(torch.from_numpy(y), model(x), rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_runner():
    model = _perturb_bn(MODELS["resnet_bottleneck"]()).eval().cuda()
    x = example_input("resnet_bottleneck", batch=4).cuda()
    dep = deploy(model, x, channels_last=True, dtype=torch.float16)
    xh = x.half().contiguous(memory_format=torch.channels_last)
    run = cuda_graph_runner(dep, xh)
    with torch.no_grad():
        ref = dep(xh)
    out = run(xh).clone()
    _close(out, ref, rtol=1e-3)
    x2 = torch.randn_like(xh)
    with torch.no_grad():
        ref2 = dep(x2)
    del dep  # the runner keeps the weights alive; new allocations must not take their memory
    gc.collect()
    junk = [torch.full((4096,), float("nan"), device="cuda") for _ in range(64)]
    _close(run(x2).clone(), ref2, rtol=1e-3)
    del junk
    with pytest.raises(ValueError, match="captured for"):
        run(xh[:2])


_FUSED_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from models import resnet_bottleneck, example_input
from chase_ext.deploy import cuda_graph_runner, deploy
torch.manual_seed(0)
model = resnet_bottleneck().eval().cuda()
x = example_input("resnet_bottleneck", batch=4).cuda()
ref = deploy(model, x, channels_last=True, dtype=torch.float16)
dep = deploy(model, x, channels_last=True, dtype=torch.float16, fuse_relu=True)
assert len(dep.fused) > 0
xh = x.half().contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    r = ref(xh).float()
    for y in (dep(xh), cuda_graph_runner(dep, xh)(xh)):
        err = float((y.float() - r).abs().max())
        assert err <= 1e-2 * float(r.abs().max()) + 1e-3, err
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN fused ops need a GPU")
def test_fuse_relu_cuda():
    """The cuDNN conv+bias(+add)+relu path, in a child process: where an image turns a
    failing CUDA op into a crash, only this test fails."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FUSED_CHILD, os.path.dirname(__file__)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])
