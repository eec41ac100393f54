"""The inference model as people ship it: norms folded, eval mode, a chosen layout and dtype.

``deploy(model, example_inputs)`` takes a slim or dense model (it is not changed) and
returns a new ``torch.fx.GraphModule`` that

* has every BatchNorm folded into the conv/linear that feeds it, where that is exact: the
  norm's only input is the output of a conv (``nn.Conv1d/2d/3d``, any ``groups``) or an
  ``nn.Linear`` on a 2-D input, that output is used by nothing but the norm, neither module
  is called more than once nor shares a parameter with another module, and the norm
  tracks running statistics. Folding uses the running statistics, so the result equals
  the eval-mode model; the arithmetic is done in float64 and cast back;
* is in eval mode with ``requires_grad=False`` parameters;
* optionally runs channels_last (``channels_last=True``: every 4-D parameter and buffer;
  others, such as a Conv3d's 5-D weight, keep their layout) and in ``dtype``
  (``torch.float16`` / ``torch.bfloat16``: every floating parameter and buffer);
* with ``fuse_relu=True``, runs conv -> [+ residual] -> relu as one cuDNN call on CUDA
  and one oneDNN call on the CPU (:func:`fuse_conv_relu`; a residual of another shape or
  dtype than the conv output, which the add would broadcast or promote, stays unfused);
* is plain eager PyTorch, so ``torch.compile``, ``torch.export`` and ``torch.onnx.export``
  take it, and :func:`cuda_graph_runner` captures it into one CUDA graph replay.

The model must trace with ``torch.fx.symbolic_trace`` (the same requirement as channel
group tracing, ``chase_ext.graph``); ``fold=False`` skips folding (and tracing) and only
applies eval mode, layout and dtype to a copy.
With ``fold``, ``deploy`` runs ``example_inputs`` through the trace first (inputs the model
does not accept raise a ``ValueError`` naming the layer that failed) and checks, before any dtype
change, that the folded model reproduces the original eval-mode output on them within
``check_rtol`` of the output's scale.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .tracing import _shape_prop

__all__ = ["deploy", "fold_batchnorm", "fuse_conv_relu", "conv_add_relu", "conv_add_relu_", "cuda_graph_runner"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a non-empty tuple/list of inputs, "
                    f"got {type(example_inputs).__name__}")


def _module_uses(gm: fx.GraphModule) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            uses[n.target] = uses.get(n.target, 0) + 1
    return uses


def _shared_params(gm: fx.GraphModule) -> set[str]:
    """Names of leaf modules that hold a parameter some other module holds too."""
    owners: dict[int, list[str]] = {}
    for name, m in gm.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """layer(x) -> bn(layer(x)) in eval mode, in place: per-output-channel scale and shift."""
    w = layer.weight
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    # out channels are dim 0 of conv and linear weights
    new_w = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    new_b = (b * scale + shift).to(w.dtype)
    layer.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)


def fold_batchnorm(model: nn.Module, example_inputs: Any) -> tuple[fx.GraphModule, list[tuple[str, str]]]:
    """A traced copy of ``model`` with every exactly-foldable BatchNorm folded (rules in the
    module docstring). Returns ``(graph_module, [(layer, norm), ...])`` naming each fold."""
    args = _as_tuple(example_inputs)
    src = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(src)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same thing here
        raise ValueError(f"deploy: the model does not trace with torch.fx ({type(e).__name__}: {e}); "
                         f"pass fold=False to deploy it without folding norms") from e
    # Linear+BN1d folds only for a 2-D (N, C) output; fuse_conv_relu reads the shapes too
    _shape_prop(src, gm, args)
    uses = _module_uses(gm)
    shared = _shared_params(gm)
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BNS):
            continue
        bn = modules[node.target]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue  # the conv/linear output is read elsewhere too: folding would change that read
        layer = modules[prev.target]
        if isinstance(layer, _CONVS):
            ok = layer.out_channels == bn.num_features
        elif isinstance(layer, nn.Linear):
            meta = prev.meta.get("tensor_meta")
            ok = layer.out_features == bn.num_features and meta is not None and len(meta.shape) == 2
        else:
            ok = False
        if not ok or bn.running_mean is None or bn.running_var is None:
            continue
        if uses[node.target] != 1 or uses[prev.target] != 1 or node.target in shared or prev.target in shared:
            continue
        if not layer.weight.is_floating_point():
            continue
        _fold_into(layer, bn)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded.append((prev.target, node.target))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, folded


def _mkldnn_fusable(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None) -> bool:
    """oneDNN's fused conv (``torch.ops.mkldnn._convolution_pointwise``) applies: a CPU
    4-D float32 inference call, run eagerly (torch 2.13's fused add + relu fails on
    bfloat16, so other dtypes take the plain ops).
    While ``torch.compile``/``torch.export``/ONNX export or ``torch.jit.trace`` trace the
    model the plain ops are used instead, so exported graphs stay portable (Inductor fuses
    them by itself)."""
    # is_compiling first: torch 2.6's Dynamo cannot trace mkldnn.is_available()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if x.device.type != "cpu" or x.dim() != 4 or not torch.backends.mkldnn.is_available():
        return False
    if not torch.backends.mkldnn.enabled:
        return False
    if x.dtype != torch.float32 or weight.dtype != x.dtype or (z is not None and z.dtype != x.dtype):
        return False
    # the fused op has no autograd formula
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (z is not None and z.requires_grad)))


def conv_add_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                  stride: tuple, padding: tuple, dilation: tuple, groups: int) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + z) (z may be None) with the bias, add and relu in the
    conv's epilogue: on CUDA one cuDNN call (``torch.cudnn_convolution_[add_]relu``, the
    ops TorchScript freezing uses), on the CPU one oneDNN call with post-ops
    (``torch.ops.mkldnn._convolution_pointwise``, what Inductor's CPU backend emits; see
    :func:`_mkldnn_fusable`), elsewhere the plain ops. Saves the separate passes over the
    conv output that eager bias, add and relu kernels make."""
    if x.is_cuda and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        if z is None:
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        return torch.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, stride, padding, dilation, groups)
    # a broadcast residual takes the plain ops (torch 2.5's oneDNN refuses it)
    if _mkldnn_fusable(x, weight, z) and (z is None or z.shape == _conv_out_shape(x, weight, stride, padding, dilation)):
        if z is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                           "relu", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, z, weight, bias, padding, stride, dilation, groups,
                                                              "add", 1.0, "relu", [], "")
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if z is not None:
        out = out + z
    return torch.relu(out)


def _conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple:
    k = weight.shape[2:]
    return (x.shape[0], weight.shape[0], *((n + 2 * p - d * (kk - 1) - 1) // s + 1
                                         for n, kk, s, p, d in zip(x.shape[2:], k, stride, padding, dilation)))


def conv_add_relu_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor,
                   stride: tuple, padding: tuple, dilation: tuple, groups: int) -> torch.Tensor:
    """:func:`conv_add_relu` for a residual ``z`` that nothing reads afterwards: where oneDNN
    runs it, the result is written into ``z`` (oneDNN's in-place sum post-op) and ``z`` is
    returned; elsewhere (CUDA, tracing, autograd, other dtypes) ``z`` is left alone and a new
    tensor returned. Writing over the residual spares a fresh output buffer, which the CPU
    must read before writing (ResNet-50's thin conv3s of SPEC at S_c 0.5: 12 -> 512
    channels at 28x28, batch 16: 1.70 ms -> 0.68 ms). :func:`fuse_conv_relu` calls it only
    where the graph shows ``z`` dead after the call and owned by the model."""
    if (_mkldnn_fusable(x, weight, z) and z.shape == _conv_out_shape(x, weight, stride, padding, dilation)
            and (z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last))
            and not z._is_view() and z.data_ptr() != x.data_ptr()):
        return torch.ops.mkldnn._convolution_pointwise_.binary(z, x, weight, bias, padding, stride, dilation, groups,
                                                               "add", 1.0, "relu", [], "")
    return conv_add_relu(x, weight, bias, z, stride, padding, dilation, groups)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_) and not node.kwargs.get("inplace")
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _same_tensor(a: fx.Node, b: fx.Node) -> bool:
    """Shape propagation saw ``a`` and ``b`` as tensors of one shape and dtype."""
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return (isinstance(ma, TensorMetadata) and isinstance(mb, TensorMetadata)
            and ma.shape == mb.shape and ma.dtype == mb.dtype)


def fuse_conv_relu(gm: fx.GraphModule) -> list[str]:
    """In place: every ``relu(conv(x))`` and ``relu(conv(x) + z)`` (``nn.Conv2d``, zero
    padding, the conv and the sum used by nothing else, the conv called once; ``z`` not the
    conv output itself and of its shape and dtype as shape propagation recorded them: the
    graph :func:`fold_batchnorm` returns carries them, and without them no add is fused)
    becomes one :func:`conv_add_relu` call; :func:`conv_add_relu_` (the result written over
    ``z``) where ``z`` is the fresh output of a conv or of a fused call and nothing after the
    fused call reads it (ResNet's residual: the previous block's output or the downsample
    conv's). Returns the fused convs' names."""
    modules = dict(gm.named_modules())
    uses = _module_uses(gm)
    fused = []
    for relu in list(gm.graph.nodes):
        if not _is_relu(relu, modules) or len(relu.args) != 1 or not isinstance(relu.args[0], fx.Node):
            continue
        src, z = relu.args[0], None
        if (src.op == "call_function" and src.target in (operator.add, operator.iadd, torch.add) and len(src.args) == 2
                and not src.kwargs and len(src.users) == 1):
            a, b = src.args
            conv_first = isinstance(a, fx.Node) and a.op == "call_module" and isinstance(modules.get(a.target), nn.Conv2d)
            conv, z = (a, b) if conv_first else (b, a)
            # the fused add takes z as it is (oneDNN and cuDNN neither broadcast it up to the conv
            # output nor promote its dtype); relu(y + y) would read the conv node erased below
            if not (isinstance(conv, fx.Node) and isinstance(z, fx.Node)) or z is conv or not _same_tensor(z, conv):
                continue
        else:
            conv = src
        if not (isinstance(conv, fx.Node) and conv.op == "call_module" and len(conv.users) == 1):
            continue
        m = modules[conv.target]
        if type(m) is not nn.Conv2d or m.padding_mode != "zeros" or isinstance(m.padding, str) or uses[conv.target] != 1:
            continue
        with gm.graph.inserting_before(relu):
            w = gm.graph.get_attr(f"{conv.target}.weight")
            b = gm.graph.get_attr(f"{conv.target}.bias") if m.bias is not None else None
            new = gm.graph.call_function(conv_add_relu, (conv.args[0], w, b, z, tuple(m.stride), tuple(m.padding),
                                                         tuple(m.dilation), m.groups))
        if "tensor_meta" in relu.meta:  # a later add may take this call's output as its residual
            new.meta["tensor_meta"] = relu.meta["tensor_meta"]
        relu.replace_all_uses_with(new)
        gm.graph.erase_node(relu)
        if src is not conv:
            gm.graph.erase_node(src)
        gm.graph.erase_node(conv)
        fused.append(conv.target)
    _write_over_dead_residuals(gm, modules)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return fused


def _write_over_dead_residuals(gm: fx.GraphModule, modules: dict) -> None:
    """Fused calls whose residual may be overwritten become :func:`conv_add_relu_`: the
    residual is a tensor the model made itself (a conv module's output or a fused call's;
    never a graph input or a parameter), and every other reader of it runs earlier in the
    graph (fx runs nodes in order) and makes a new tensor from it (a conv, a linear, a fused
    call that reads it as its input), not a view that could be read after the write."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fresh_modules = (*_CONVS, nn.Linear)

    def makes_fresh(n: fx.Node) -> bool:
        return ((n.op == "call_function" and n.target in (conv_add_relu, conv_add_relu_))
                or (n.op == "call_module" and type(modules.get(n.target)) in fresh_modules))

    # in graph order: an earlier fused call that also takes z as its residual is never made
    # in-place itself, since this later reader of z follows it
    for node in gm.graph.nodes:
        if node.target is not conv_add_relu or node.args[3] is None:
            continue
        z, x = node.args[3], node.args[0]
        if (makes_fresh(z) and z is not x
                and all(u is node or (order[u] < order[node] and makes_fresh(u)) for u in z.users)):
            node.target = conv_add_relu_


def deploy(model: nn.Module, example_inputs: Any, *, fold: bool = True, channels_last: bool = False,
           dtype: torch.dtype | None = None, fuse_relu: bool = False, check_rtol: float = 1e-4) -> nn.Module:
    """The inference copy of ``model`` (see the module docstring). ``example_inputs`` (a
    tensor or tuple of positional inputs, on the model's device, float32) drive shape
    propagation and the folding check. ``deployed.folded`` lists ``(layer, norm)`` pairs.
    ``fuse_relu=True`` (needs ``fold``) also turns conv -> [+ z] -> relu into one
    :func:`conv_add_relu` call (``deployed.fused`` names the convs)."""
    if fuse_relu and not fold:
        raise ValueError("deploy: fuse_relu=True needs fold=True (the fused conv takes the folded bias)")
    if dtype not in _DTYPES:
        raise ValueError(f"deploy: dtype must be one of float32, float16, bfloat16, float64 or None, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy: model must be an nn.Module, got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    if fold:
        out, folded = fold_batchnorm(model, args)
        fused = fuse_conv_relu(out) if fuse_relu else []
        flags = {m: m.training for m in model.modules()}
        model.eval()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        try:  # compared in full fp32: TF32 rounding would differ between the two weight sets
            torch.backends.cuda.matmul.allow_tf32 = False
            with torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                                             allow_tf32=False):
                ref, got = model(*args), out(*args)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for m, f in flags.items():
                m.train(f)
        if isinstance(ref, torch.Tensor):
            tol = check_rtol * float(ref.abs().max()) + 1e-6
            err = float((ref - got).abs().max())
            if not err <= tol:  # also catches NaN
                raise RuntimeError(f"deploy: the folded model differs from the original by {err:.3g} "
                                   f"(tolerance {tol:.3g}); folds: {folded}, fused: {fused}")
    else:
        out, folded, fused = copy.deepcopy(model).eval(), [], []
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    if dtype is not None:
        out.to(dtype)
    if channels_last:
        # only 4-D tensors have that layout: Module.to would raise on a Conv3d's 5-D weight
        out._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    out.folded = folded
    out.fused = fused
    return out


def cuda_graph_runner(model: Callable, example: torch.Tensor, warmup: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` captured into one CUDA graph for inputs shaped like ``example``: the returned
    function copies its input into the captured buffer, replays, and returns the captured
    output tensor (overwritten by the next call; clone it to keep it)."""
    if not example.is_cuda:
        raise ValueError("cuda_graph_runner needs a CUDA example input")
    static_in = example.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(s):
        for _ in range(warmup):  # cuDNN picks its algorithms outside the capture
            model(static_in)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_out = model(static_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape != static_in.shape or x.dtype != static_in.dtype:
            raise ValueError(f"cuda_graph_runner: captured for {tuple(static_in.shape)} {static_in.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        static_in.copy_(x)
        graph.replay()
        return static_out

    # the graph reads the model's weights by address: they must live as long as the runner
    run.model = model
    return run
