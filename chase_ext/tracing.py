"""Following one producer's channels through a traced model (the walk behind
:func:`chase_ext.graph.find_channel_groups`, whose docstring states the rules).

* the op tables: which modules, functions and methods pass a channel through (activations,
  pooling, norms, depthwise convs, arithmetic with a number, ...) and which join two
  tensors (``add``/``sub`` may couple producers, ``mul`` may gate one with another);
* :class:`_Trace` (module table, call counts, parameter positions and the layers that
  cannot take part, of one ``torch.fx`` trace) and :class:`_Closure` (what one producer's
  output reaches: followers, consumers with their ``repeat``, their offsets inside
  concatenations, joins, or why it is blocked);
* :func:`_closure` walks the graph forward from a producer; :func:`_step` decides one
  use of a tensor in the producer's channel space (pass, consume or block);
* :func:`_train_mode` holds the model in train mode while it is traced (the groups serve
  training) and puts every training flag and buffer back afterwards;
  :func:`_shape_prop` runs the example inputs through the trace (shapes for the walk)
  and turns a failure into an error that names the layer.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import operator
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .groups import CONV_TYPES as _CONV, NORM_TYPES as _NORM


# --------------------------------------------------------------------------- op tables
# elementwise on every slot (any layout)
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.Threshold,
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
# channel at dim 1 of an (N, C, spatial...) map, shape rank preserved
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_ACT_FUNCS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_,
    F.selu, F.celu, F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.softplus, F.softsign, F.logsigmoid,
    F.dropout, F.alpha_dropout, torch.dropout, torch.nn.functional.threshold,
    torch.abs, torch.neg, torch.exp, torch.clamp, torch.clip,
}
_ACT_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp",
    "clamp", "clamp_", "clip", "clip_", "contiguous", "clone",
}
_SPATIAL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
}
_ADD_LIKE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_BINARY = _ADD_LIKE | {
    operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_METHODS = {"mul", "mul_"}
_DIV_METHODS = {"div", "div_"}
_BINARY_METHODS = _ADD_METHODS | _MUL_METHODS | {"div", "div_"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _is_stochastic_depth(fn) -> bool:
    """torchvision.ops.stochastic_depth (one call in the graph: torchvision wraps it for
    torch.fx): it scales whole samples, or the whole batch, so each output channel is its
    input channel's. Recognised by name and module, without importing torchvision."""
    return (getattr(fn, "__name__", None) == "stochastic_depth"
            and str(getattr(fn, "__module__", "")).startswith("torchvision.ops"))


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): a producer and a consumer
    only with ``grouped_channels``."""
    return isinstance(m, _CONV) and m.groups > 1 and not _is_depthwise(m)


def _is_producer_module(m: nn.Module, grouped: bool = False) -> bool:
    return (isinstance(m, _CONV) and (m.groups == 1 or (grouped and _is_grouped(m)))) or isinstance(m, nn.Linear)


def _computed_tensor(m: nn.Module) -> str | None:
    """The first per-channel tensor of ``m`` (``weight``, ``bias``, norm statistics) that is
    computed rather than registered on ``m`` (a ``torch.nn.utils.parametrize``
    parametrization such as ``weight_norm``/``spectral_norm``/``orthogonal``, or the
    hook-based ``torch.nn.utils.weight_norm``/``spectral_norm``, which keep the weight as
    a plain attribute): slimming cannot narrow it, so ``m`` cannot be in a group."""
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if parametrize.is_parametrized(m, attr):
            return attr
        t = getattr(m, attr, None)
        if t is not None and t is not m._parameters.get(attr, m._buffers.get(attr)):
            return attr
    return None


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(
        True for _ in m.buffers(recurse=False)
    )


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _norm_patterns(p) -> tuple[str, ...]:
    if p is None:
        return ()
    if isinstance(p, str):
        return (p,)
    return tuple(p)


def _shape(node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(int(s) for s in tm.shape)


def _nodes_in(x) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(x, lambda n: out.append(n))
    return out


def _is_size0(user: fx.Node, v: fx.Node) -> bool:
    """``v.size(0)`` or ``v.shape[0]``: reads the batch size only."""
    if user.op == "call_method" and user.target == "size" and user.args and user.args[0] is v:
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        return dim == 0 and not user.kwargs.keys() - {"dim"}
    if user.op == "call_function" and user.target is getattr and user.args[0] is v and user.args[1] == "shape":
        return len(user.users) > 0 and all(
            u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in user.users
        )
    return False


# --------------------------------------------------------------------------- tracing
class _Trace:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, grouped: bool = False, concat: bool = False):
        self.model = model
        self.gm = gm
        self.grouped = grouped  # grouped convs are producers and consumers (``grouped_channels``)
        self.concat = concat  # channels pass through concatenations (``concat_channels``)
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        # parameter positions in named_parameters() (first appearance of shared ones)
        self.param_pos: dict[str, int] = {}
        for i, (n, _) in enumerate(model.named_parameters()):
            self.param_pos[n] = i
        # modules with state called more than once (under any alias), sharing a
        # parameter, or whose tensors are read outside their own call: unusable
        by_id: dict[int, list[str]] = {}
        for name, m in self.modules.items():
            by_id.setdefault(id(m), []).append(name)
        calls: dict[int, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in self.modules:
                k = id(self.modules[node.target])
                calls[k] = calls.get(k, 0) + 1
        self.calls = calls  # id(module) -> calls in the graph
        self.bad: dict[str, str] = {}
        for name, m in self.modules.items():
            c = calls.get(id(m), 0)
            if c > 1 and _has_state(m):
                self.bad[name] = f"called {c} times"
            if isinstance(m, (*_CONV, nn.Linear, *_NORM)):
                attr = _computed_tensor(m)
                if attr is not None:
                    self.bad.setdefault(name, f"its {attr} is computed, e.g. by weight_norm: slimming cannot narrow it")
        owner: dict[int, str] = {}
        for mname, m in self.modules.items():
            for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                o = owner.get(id(p))
                if o is not None and by_id.get(id(self.modules[o])) is not by_id.get(id(m)):
                    self.bad.setdefault(mname, f"shares {pname} with {o}")
                    self.bad.setdefault(o, f"shares a tensor with {mname}")
                else:
                    owner.setdefault(id(p), mname)
        # tensors of modules read functionally (get_attr), e.g. F.conv2d(x, self.conv.weight)
        self.functional: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                mod_name, _, attr = str(node.target).rpartition(".")
                m = self.modules.get(mod_name)
                if m is not None and _has_state(m):
                    for alias in by_id[id(m)]:
                        self.bad.setdefault(alias, f"its {attr} is used outside its call")
                    if isinstance(m, (*_CONV, nn.Linear, *_NORM)):
                        self.functional.append(str(node.target))
        # aliases of a bad module are bad too
        for name in list(self.bad):
            for alias in by_id[id(self.modules[name])]:
                self.bad.setdefault(alias, self.bad[name])

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None


class _Closure:
    """What one producer's channel space reaches."""

    def __init__(self, producer: str, node: fx.Node):
        self.producer = producer
        self.node = node
        # node -> (cdim, repeat, ndim, offset): channel c is at index offset + c * repeat + j
        # (j < repeat) of dim cdim; offset is None until a concatenation, then an int
        self.state: dict[fx.Node, tuple[int, int, int, int | None]] = {}
        self.followers: dict[str, fx.Node] = {}
        self.consumers: dict[str, tuple[fx.Node, int]] = {}
        self.offsets: dict[str, int] = {}  # follower / consumer reached through a concatenation -> offset
        self.joins: list[fx.Node] = []
        self.add_joins: list[fx.Node] = []
        self.mul_joins: list[fx.Node] = []  # may gate this space with another producer's
        self.blocked: str | None = None
        self.blocked_by_user = False  # the first reason is an exclusion the user asked for

    def block(self, why: str, by_user: bool = False) -> None:
        if self.blocked is None:
            self.blocked = why
            self.blocked_by_user = by_user


def _primary_input(user: fx.Node, v: fx.Node, extra_ok=()) -> bool:
    """``v`` is the first positional arg (or ``input``) and appears nowhere else."""
    if user.args and user.args[0] is v:
        rest = list(user.args[1:]) + [val for k, val in user.kwargs.items()]
    elif not user.args and user.kwargs.get("input") is v:
        rest = [val for k, val in user.kwargs.items() if k != "input"]
    else:
        return False
    return not any(isinstance(n, fx.Node) and n not in extra_ok for n in _nodes_in(rest))


def _flatten_args(user: fx.Node):
    if user.op == "call_function":
        a = list(user.args[1:])
        start = a[0] if a else user.kwargs.get("start_dim", 0)
        end = a[1] if len(a) > 1 else user.kwargs.get("end_dim", -1)
    else:  # call_method
        a = list(user.args[1:])
        start = a[0] if a else user.kwargs.get("start_dim", 0)
        end = a[1] if len(a) > 1 else user.kwargs.get("end_dim", -1)
    return start, end


def _step(tr: _Trace, cl: _Closure, v: fx.Node, user: fx.Node, excl: tuple[str, ...]):
    """Handle one use of channel-carrying value ``v``; return the new state of ``user``'s
    output when the channel flows on, ``None`` when the path ends here (consumer / size).
    Blocks the closure on anything else."""
    cdim, rep, nd, off = cl.state[v]
    shp_in = _shape(v)
    shp = _shape(user)
    tgt = user.target
    if user.op == "output":
        cl.block("reaches the model output")
        return None
    if _is_size0(user, v):
        return None
    if user.op == "call_module":
        m = tr.modules.get(tgt)
        name = str(tgt)
        if m is None:
            cl.block(f"unknown module {name}")
            return None
        if name in tr.bad:
            cl.block(f"feeds layer {name}: {tr.bad[name]}")
            return None
        if not _primary_input(user, v):
            cl.block(f"{name} uses the channels outside its input")
            return None
        if shp is None:
            cl.block(f"{name}: no shape information")
            return None
        if _is_producer_module(m, tr.grouped):
            w = f"{name}.weight"
            if _match(w, excl):
                cl.block(f"consumer {w} is excluded", by_user=True)
                return None
            if isinstance(m, nn.Linear):
                if cdim != nd - 1 or (off is None and m.in_features % rep) or shp_in[cdim] != m.in_features:
                    cl.block(f"linear {name} does not read the channels on its input features")
                    return None
            else:
                if cdim != 1 or rep != 1 or nd != m.weight.dim():
                    cl.block(f"conv {name} does not read the channels at dim 1")
                    return None
                if off is not None and _is_grouped(m):
                    cl.block(f"grouped conv {name} reads a concatenation")
                    return None
            cl.consumers[name] = (user, rep)
            if off is not None:
                cl.offsets[name] = off
            return None
        if isinstance(m, _NORM) or _is_depthwise(m):
            # InstanceNorm/conv see a 2-D / unbatched input as (C, L): not our layout
            need = _batched_rank(type(m).__name__) if not isinstance(m, nn.modules.batchnorm._BatchNorm) else None
            if cdim != 1 or rep != 1 or len(shp) != nd or (need is not None and nd != need):
                cl.block(f"{name} is not channel-wise for this layout")
                return None
            if _is_depthwise(m) and nd != m.weight.dim():
                cl.block(f"{name}: unexpected rank")
                return None
            # a norm without tensors still has a num_features to follow the slim (an
            # InstanceNorm warns on a mismatch); used several times or at another width,
            # it cannot follow one group and is left out (then only that warning reads it)
            if _has_state(m) or (tr.calls.get(id(m)) == 1 and m.num_features == shp_in[cdim]):
                cl.followers[name] = user
                if off is not None:
                    cl.offsets[name] = off
            return (cdim, rep, nd, off)
        if isinstance(m, _ACT_MODULES):
            return (cdim, rep, nd, off) if len(shp) == nd else _blk(cl, name)
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return (cdim, rep, nd, off) if len(shp) == nd else _blk(cl, name)
        if isinstance(m, _SPATIAL_MODULES):
            need = _batched_rank(type(m).__name__)
            if cdim != 1 or rep != 1 or nd < 3 or len(shp) != nd or (need is not None and nd != need):
                return _blk(cl, f"{name} on a map without spatial dims")
            return (cdim, rep, nd, off)
        if isinstance(m, nn.Flatten):
            return _flatten(cl, m.start_dim, m.end_dim, cdim, rep, nd, off, shp_in, name)
        if _is_grouped(m):
            return _blk(cl, f"grouped conv {name} (not depthwise; grouped_channels=True prunes through grouped convs)")
        return _blk(cl, f"{type(m).__name__} {name}")
    if user.op == "call_function":
        fname = getattr(tgt, "__name__", str(tgt))
        if tgt in _ACT_FUNCS or _is_stochastic_depth(tgt):
            if not _primary_input(user, v) or shp is None or len(shp) != nd:
                return _blk(cl, fname)
            return (cdim, rep, nd, off)
        if tgt in _SPATIAL_FUNCS:
            need = _batched_rank(fname)
            if (
                not _primary_input(user, v) or shp is None or cdim != 1 or rep != 1 or nd < 3
                or len(shp) != nd or (need is not None and nd != need)
            ):
                return _blk(cl, fname)
            return (cdim, rep, nd, off)
        if tgt is torch.flatten:
            if not _primary_input(user, v):
                return _blk(cl, fname)
            s, e = _flatten_args(user)
            return _flatten(cl, s, e, cdim, rep, nd, off, shp_in, "flatten")
        if tgt is torch.mean:
            return _mean(cl, user, v, cdim, rep, nd, off)
        if tgt in _BINARY:
            return _binary(cl, user, v, cdim, rep, nd, off, tgt in _ADD_LIKE, tgt in _MUL, tgt in _DIV)
        if tgt in _CAT:
            return _cat(cl, tr, user, v, cdim, rep, nd, off)
        return _blk(cl, f"function {fname}")
    if user.op == "call_method":
        if tgt in _ACT_METHODS:
            if not _primary_input(user, v) or shp is None or len(shp) != nd:
                return _blk(cl, f".{tgt}()")
            return (cdim, rep, nd, off)
        if tgt == "flatten":
            if not _primary_input(user, v):
                return _blk(cl, ".flatten()")
            s, e = _flatten_args(user)
            return _flatten(cl, s, e, cdim, rep, nd, off, shp_in, ".flatten()")
        if tgt in ("view", "reshape"):
            return _view(cl, tr, user, v, cdim, rep, nd, off, shp_in, shp)
        if tgt == "mean":
            return _mean(cl, user, v, cdim, rep, nd, off)
        if tgt in _BINARY_METHODS:
            return _binary(cl, user, v, cdim, rep, nd, off, tgt in _ADD_METHODS, tgt in _MUL_METHODS, tgt in _DIV_METHODS)
        return _blk(cl, f"method .{tgt}()")
    return _blk(cl, f"{user.op} {tgt}")


def _batched_rank(name: str) -> int | None:
    """Rank of a batched input for ``...1d/2d/3d`` ops (else None): a smaller rank is
    taken as unbatched by PyTorch, which would put our channel dim elsewhere."""
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return k + 2
    return None


def _blk(cl: _Closure, why: str):
    cl.block(why)
    return None


def _scaled(off: int | None, k: int) -> int | None:
    return None if off is None else off * k


def _flatten(cl, s, e, cdim, rep, nd, off, shp_in, what):
    if not isinstance(s, int) or not isinstance(e, int) or shp_in is None:
        return _blk(cl, what)
    s = s + nd if s < 0 else s
    e = e + nd if e < 0 else e
    if s == e:
        return (cdim, rep, nd, off)
    if s > e:
        return _blk(cl, what)
    if s == cdim:
        inner = math.prod(shp_in[cdim + 1 : e + 1])
        return (cdim, rep * inner, nd - (e - s), _scaled(off, inner))
    if s > cdim and rep == 1:
        return (cdim, rep, nd - (e - s), off)
    if e < cdim:
        return (cdim - (e - s), rep, nd - (e - s), off)
    return _blk(cl, f"{what} merges the channel dim with an outer dim")


def _view(cl, tr, user, v, cdim, rep, nd, off, shp_in, shp):
    """``x.view(N, -1)`` / ``x.reshape(x.size(0), -1)``: same as ``flatten(x, 1)``."""
    if not user.args or user.args[0] is not v or user.kwargs or shp is None or shp_in is None:
        return _blk(cl, f".{user.target}()")
    dims = list(user.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    ok_first = lambda d: (isinstance(d, int) and d >= 0) or (isinstance(d, fx.Node) and _is_batch(d, v))
    if (
        cdim == 1
        and len(dims) == 2
        and dims[1] == -1
        and ok_first(dims[0])
        and len(shp) == 2
        and shp[0] == shp_in[0]
        and shp[1] == math.prod(shp_in[1:])
    ):
        return (1, rep * math.prod(shp_in[2:]), 2, _scaled(off, math.prod(shp_in[2:])))
    return _blk(cl, f".{user.target}() other than flatten")


def _is_batch(d: fx.Node, v: fx.Node) -> bool:
    """``d`` is ``v.size(0)`` or ``v.shape[0]``."""
    if _is_size0(d, v):
        return True
    if d.op == "call_function" and d.target is operator.getitem and d.args[1] == 0:
        src = d.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr and src.args[0] is v
    return False


def _mean(cl, user, v, cdim, rep, nd, off):
    if not user.args or user.args[0] is not v:
        return _blk(cl, "mean")
    a = list(user.args[1:])
    dim = a[0] if a else user.kwargs.get("dim")
    keep = a[1] if len(a) > 1 else user.kwargs.get("keepdim", False)
    if dim is None or any(isinstance(n, fx.Node) for n in _nodes_in(a + list(user.kwargs.values()))):
        return _blk(cl, "mean over all dims")
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = [d + nd if d < 0 else d for d in dims]
    if 0 in dims or cdim in dims or rep != 1:
        return _blk(cl, "mean over the batch or channel dim")
    if keep:
        return (cdim, rep, nd, off)
    return (cdim - sum(d < cdim for d in dims), rep, nd - len(set(dims)), off)


def _binary(cl, user, v, cdim, rep, nd, off, add_like, mul_like, div=False):
    tensors = _nodes_in((user.args, user.kwargs))
    if div and not (user.args and user.args[0] is v and tensors == [v]):
        # a removed channel is a constant (0, or its norm's shift): dividing by it may give inf / NaN
        return _blk(cl, "a division by a tensor")
    others = [n for n in tensors if n is not v]
    if not others:
        shp = _shape(user)
        if shp is None or len(shp) != nd:
            return _blk(cl, "elementwise op changes the rank")
        return (cdim, rep, nd, off)  # with a Python number (or with itself)
    shp = _shape(user)
    shp_v = _shape(v)
    if shp is None or shp_v is None or (shp != shp_v and not _keeps_channels(shp_v, shp, cdim, rep)):
        return _blk(cl, "elementwise op broadcasts the channel tensor")
    if user not in cl.joins:
        cl.joins.append(user)
        if add_like:
            cl.add_joins.append(user)
        if mul_like:
            cl.mul_joins.append(user)
    return (cdim, rep, nd, off)


def _cat(cl, tr, user, v, cdim, rep, nd, off):
    """``torch.cat(tensors, dim)`` along the channel dim (``concat_channels``): the channels
    go on, shifted by the width of the tensors before ``v``; the others do not mix with
    them (they are other groups' channels or fixed ones)."""
    if not tr.concat:
        return _blk(cl, "concatenated with other tensors (concat_channels=True prunes through concatenations)")
    seq = user.args[0] if user.args else user.kwargs.get("tensors")
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
    shp = _shape(user)
    if (not isinstance(seq, (list, tuple)) or not isinstance(dim, int) or shp is None or len(shp) != nd
            or any(not isinstance(t, fx.Node) or _shape(t) is None or len(_shape(t)) != nd for t in seq)
            or sum(t is v for t in seq) != 1 or v in _nodes_in((user.args[2:], user.kwargs))):
        return _blk(cl, "a concatenation other than torch.cat of equal-rank tensors, each once")
    if (dim + nd if dim < 0 else dim) != cdim:
        return _blk(cl, "concatenated along another dim than its channels")
    before = 0
    for t in seq:
        if t is v:
            break
        before += _shape(t)[cdim]
    return (cdim, rep, nd, (off or 0) + before)


def _keeps_channels(a: tuple[int, ...], out: tuple[int, ...], cdim: int, rep: int) -> bool:
    """An elementwise operand of shape ``a`` broadcast to ``out`` keeps its channels apart:
    the same rank, all channels at ``cdim``, other dims 1 or full (squeeze-and-excitation's
    ``(N, C, 1, 1)`` gate on an ``(N, C, H, W)`` map)."""
    return (rep == 1 and len(a) == len(out) and a[cdim] == out[cdim]
            and all(x in (1, y) for x, y in zip(a, out)))


def _closure(tr: _Trace, producer: str, node: fx.Node, excl) -> _Closure:
    cl = _Closure(producer, node)
    shp = _shape(node)
    if shp is None:
        cl.block("no shape information")
        return cl
    m = tr.modules[producer]
    if isinstance(m, _CONV) and len(shp) != m.weight.dim():
        cl.block(f"conv {producer} runs on an unbatched input: its channels are not at dim 1")
        return cl
    cdim = 1 if isinstance(m, _CONV) else len(shp) - 1
    cl.state[node] = (cdim, 1, len(shp), None)
    work = [node]
    while work:
        v = work.pop(0)
        for user in list(v.users):
            if user in cl.state:
                if user.op != "call_module" and user in cl.joins:
                    continue  # second operand of a join within this space
                cl.block("a value reaches one op twice")
                continue
            new = _step(tr, cl, v, user, excl)
            if cl.blocked is not None:
                return cl
            if new is not None:
                cl.state[user] = new
                work.append(user)
    return cl


def _describe_inputs(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"tensor of shape {list(a.shape)} ({a.dtype}, {a.device})")
        else:
            parts.append(type(a).__name__)
    return ", ".join(parts) if parts else "no inputs"


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    """Trace the training forward (groups serve training: a branch under
    ``if self.training`` counts), then put every module's training flag and every buffer
    (the same tensor object, the same values) back, even on error: ops baked into the
    train-mode graph (``F.batch_norm(..., training=True)``) may update statistics."""
    flags = [(m, m.training) for m in model.modules()]
    bufs = [
        (m, n, b, None if b is None else b.detach().clone())
        for m in model.modules()
        for n, b in m._buffers.items()
    ]
    try:
        model.train()
        yield
    finally:
        with torch.no_grad():
            for m, n, b, saved in bufs:
                m._buffers[n] = b
                if b is not None:
                    b.copy_(saved)
        for m, f in flags:
            m.training = f


def _shape_prop(model: nn.Module, gm: fx.GraphModule, args: tuple) -> None:
    """Shapes of every node of ``gm`` from ``args``. Layers run in eval mode (the same
    shapes, and a batch of one passes a BatchNorm); training flags are restored."""
    import io

    from torch.fx.passes.shape_prop import ShapeProp

    class _Prop(ShapeProp):  # remembers the node that failed
        current = None

        def run_node(self, n):
            self.current = n
            return super().run_node(n)

    flags = {m: m.training for m in model.modules()}
    flags.update({m: m.training for m in gm.modules()})
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            prop = _Prop(gm)
            try:
                # ShapeProp prints the traceback of a failing node to stderr before
                # re-raising; the error below carries it instead.
                with contextlib.redirect_stderr(io.StringIO()):
                    prop.propagate(*args)
            except Exception as e:  # noqa: BLE001
                cause = e
                # ShapeProp wraps the model's own error in "ShapeProp error for: node=..."
                if isinstance(e, RuntimeError) and str(e).startswith("ShapeProp error") and e.__cause__ is not None:
                    cause = e.__cause__
                n = prop.current
                where = ""
                if n is not None and n.op == "call_module":
                    mod = dict(gm.named_modules()).get(str(n.target))
                    where = f"raised in layer {str(n.target)!r} ({type(mod).__name__}); "
                elif n is not None and n.op in ("call_function", "call_method"):
                    fn = getattr(n.target, "__name__", str(n.target))
                    where = f"raised in {fn!r} (node {n.name!r}); "
                elif n is not None and n.op == "placeholder":
                    where = f"at input {n.target!r}; "
                # drop the FX context ("While executing %x ...") if a torch version appends it
                msg = str(cause).split("\n\nWhile executing")[0].strip()
                raise ValueError(
                    f"chase_ext: example_inputs do not run through {type(model).__name__}: "
                    f"{type(cause).__name__}: {msg} ({where}example_inputs: {_describe_inputs(args)}); "
                    "pass a batch the model accepts"
                ) from cause
    finally:
        for m, f in flags.items():
            m.training = f
