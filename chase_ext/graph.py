"""Channel groups of a model: found by tracing (SPEC §4) or given explicitly.

``find_channel_groups(model, example_inputs)`` traces the model with ``torch.fx``
(``symbolic_trace``) and runs shape propagation on ``example_inputs``. Then, for every
producer (``nn.Conv1d/2d/3d`` with ``groups == 1``, or ``nn.Linear``), it follows the
producer's output forward through channel-wise ops until it meets consumers:

* **channel-wise ops** (pass the channel through): BatchNorm1d/2d/3d, SyncBatchNorm,
  InstanceNorm1d/2d/3d (followers: their per-channel tensors go with the channel);
  depthwise convs (``groups == in_channels == out_channels``; followers too);
  activations (modules, ``torch.*``/``F.*`` functions and tensor methods), dropout,
  max/avg/adaptive/LP pooling and ``interpolate``/``Upsample`` (channel at dim 1 of a
  map with spatial dims), ``nn.Identity``, ``flatten`` (start at the channel dim; after
  ``flatten(x, 1)`` of a C x H x W map each channel spans H*W columns),
  ``x.view(x.size(0), -1)`` / ``reshape(N, -1)`` (same as ``flatten(x, 1)``), spatial
  ``mean`` over dims that are neither the batch nor the channel dim, elementwise
  arithmetic with a Python number (``x * 0.5``), ``x.size(0)``/``x.shape[0]``, and
  ``contiguous``/``clone``.
* **consumers** (end of the path): ``nn.Conv*`` with ``groups == 1`` reading the channel
  at dim 1, ``nn.Linear`` reading it on its last dim (``Consumer.repeat`` = columns per
  channel). Several consumers are fine.
* anything else **blocks** the producer: the model output, ``cat``, LayerNorm/GroupNorm,
  a grouped (non-depthwise) conv, other reshapes, an attribute use (``x.size(1)``,
  ``x.shape``...), softmax, an unknown module or function, and an elementwise op between
  two tensors unless every tensor operand is in the *same* producer's channel space
  (``x * torch.sigmoid(x)`` is fine; a residual ``a + b`` of two producers is not).

``coupled=True`` (SPEC "coupled_channels"): producers whose channel spaces meet in an
elementwise ``add``/``sub`` (residual adds) become *one* group (several producers, the
union of their followers and consumers). Such a group is still blocked when any member is
blocked, or when an operand of one of its adds comes from outside the group (e.g. the
model input).

Rules that keep groups correct rather than maximal (documented choices):

* A module **with parameters or buffers** called more than once (a shared conv/BN), or a
  parameter shared by several modules, cannot be a producer, follower or consumer: any
  path reaching it blocks. Parameter-free modules (torchvision's one ``relu`` per block)
  may be called any number of times. Such layers, and conv/linear weights used
  functionally (``F.conv2d(x, self.weight)``, seen as ``get_attr``), are named in one
  warning.
* ``exclude``: weights (names or ``fnmatch`` globs, e.g. ``"fc.weight"``) kept dense. A
  producer or consumer whose weight is excluded blocks its group (followers don't).
* ``exclude_channels``: globs matched against a producer's module name or weight name;
  a matching producer (and, with ``coupled=True``, its whole coupled group) is skipped.
  A pattern that matches no producer layer of the model (a typo) gets a ``UserWarning``
  naming it.
* Ops named ``...1d/2d/3d`` (pooling, InstanceNorm, Dropout2d...) must see a batched
  input of their rank: on an unbatched input PyTorch moves the channel dim.
* If tracing fails the function warns and returns no groups (use ``explicit_groups``).
  If ``example_inputs`` (a tensor, or a tuple/list of positional inputs, on the model's
  device) do not run through the traced model, ``ValueError`` is raised; its message
  starts with the model's own error (e.g. a conv's channel mismatch) and names the layer.
  Shape propagation runs in eval mode under ``torch.no_grad`` and restores every
  module's training flag afterwards (no BatchNorm statistics are touched).
* Groups are ordered by their first producer's position in ``model.named_parameters()``;
  followers and consumers are in graph (execution) order.

``explicit_groups(model, spec)`` validates a user-given list of groups (for models that
do not trace).
"""
from __future__ import annotations

import fnmatch
import math
import operator
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .groups import CONV_TYPES as _CONV, NORM_TYPES as _NORM, ChannelGroup, Consumer

__all__ = ["find_channel_groups", "explicit_groups", "group_to_dict", "group_from_dict"]

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
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_BINARY_METHODS = _ADD_METHODS | {"mul", "mul_", "div", "div_"}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_producer_module(m: nn.Module) -> bool:
    return (isinstance(m, _CONV) and m.groups == 1) or isinstance(m, nn.Linear)


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
    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
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
        self.bad: dict[str, str] = {}
        for name, m in self.modules.items():
            c = calls.get(id(m), 0)
            if c > 1 and _has_state(m):
                self.bad[name] = f"called {c} times"
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
        self.state: dict[fx.Node, tuple[int, int, int]] = {}  # node -> (cdim, repeat, ndim)
        self.followers: dict[str, fx.Node] = {}
        self.consumers: dict[str, tuple[fx.Node, int]] = {}
        self.joins: list[fx.Node] = []
        self.add_joins: list[fx.Node] = []
        self.blocked: str | None = None

    def block(self, why: str) -> None:
        if self.blocked is None:
            self.blocked = why


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
    cdim, rep, nd = cl.state[v]
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
            cl.block(f"{name} {tr.bad[name]}")
            return None
        if not _primary_input(user, v):
            cl.block(f"{name} uses the channels outside its input")
            return None
        if shp is None:
            cl.block(f"{name}: no shape information")
            return None
        if _is_producer_module(m):
            w = f"{name}.weight"
            if _match(w, excl):
                cl.block(f"consumer {w} is excluded")
                return None
            if isinstance(m, nn.Linear):
                if cdim != nd - 1 or m.in_features % rep or shp_in[cdim] != m.in_features:
                    cl.block(f"linear {name} does not read the channels on its input features")
                    return None
            else:
                if cdim != 1 or rep != 1 or nd != m.weight.dim():
                    cl.block(f"conv {name} does not read the channels at dim 1")
                    return None
            cl.consumers[name] = (user, rep)
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
            if _has_state(m):
                cl.followers[name] = user
            return (cdim, rep, nd)
        if isinstance(m, _ACT_MODULES):
            return (cdim, rep, len(shp)) if len(shp) == nd else _blk(cl, name)
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return (cdim, rep, nd) if len(shp) == nd else _blk(cl, name)
        if isinstance(m, _SPATIAL_MODULES):
            need = _batched_rank(type(m).__name__)
            if cdim != 1 or rep != 1 or nd < 3 or len(shp) != nd or (need is not None and nd != need):
                return _blk(cl, f"{name} on a map without spatial dims")
            return (cdim, rep, nd)
        if isinstance(m, nn.Flatten):
            return _flatten(cl, m.start_dim, m.end_dim, cdim, rep, nd, shp_in, name)
        return _blk(cl, f"{type(m).__name__} {name}")
    if user.op == "call_function":
        fname = getattr(tgt, "__name__", str(tgt))
        if tgt in _ACT_FUNCS:
            if not _primary_input(user, v) or shp is None or len(shp) != nd:
                return _blk(cl, fname)
            return (cdim, rep, nd)
        if tgt in _SPATIAL_FUNCS:
            need = _batched_rank(fname)
            if (
                not _primary_input(user, v) or shp is None or cdim != 1 or rep != 1 or nd < 3
                or len(shp) != nd or (need is not None and nd != need)
            ):
                return _blk(cl, fname)
            return (cdim, rep, nd)
        if tgt is torch.flatten:
            if not _primary_input(user, v):
                return _blk(cl, fname)
            s, e = _flatten_args(user)
            return _flatten(cl, s, e, cdim, rep, nd, shp_in, "flatten")
        if tgt is torch.mean:
            return _mean(cl, user, v, cdim, rep, nd)
        if tgt in _BINARY:
            return _binary(cl, user, v, cdim, rep, nd, tgt in _ADD_LIKE)
        return _blk(cl, f"function {fname}")
    if user.op == "call_method":
        if tgt in _ACT_METHODS:
            if not _primary_input(user, v) or shp is None or len(shp) != nd:
                return _blk(cl, f".{tgt}()")
            return (cdim, rep, nd)
        if tgt == "flatten":
            if not _primary_input(user, v):
                return _blk(cl, ".flatten()")
            s, e = _flatten_args(user)
            return _flatten(cl, s, e, cdim, rep, nd, shp_in, ".flatten()")
        if tgt in ("view", "reshape"):
            return _view(cl, tr, user, v, cdim, rep, nd, shp_in, shp)
        if tgt == "mean":
            return _mean(cl, user, v, cdim, rep, nd)
        if tgt in _BINARY_METHODS:
            return _binary(cl, user, v, cdim, rep, nd, tgt in _ADD_METHODS)
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


def _flatten(cl, s, e, cdim, rep, nd, shp_in, what):
    if not isinstance(s, int) or not isinstance(e, int) or shp_in is None:
        return _blk(cl, what)
    s = s + nd if s < 0 else s
    e = e + nd if e < 0 else e
    if s == e:
        return (cdim, rep, nd)
    if s > e:
        return _blk(cl, what)
    if s == cdim:
        inner = math.prod(shp_in[cdim + 1 : e + 1])
        return (cdim, rep * inner, nd - (e - s))
    if s > cdim and rep == 1:
        return (cdim, rep, nd - (e - s))
    if e < cdim:
        return (cdim - (e - s), rep, nd - (e - s))
    return _blk(cl, f"{what} merges the channel dim with an outer dim")


def _view(cl, tr, user, v, cdim, rep, nd, shp_in, shp):
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
        return (1, rep * math.prod(shp_in[2:]), 2)
    return _blk(cl, f".{user.target}() other than flatten")


def _is_batch(d: fx.Node, v: fx.Node) -> bool:
    """``d`` is ``v.size(0)`` or ``v.shape[0]``."""
    if _is_size0(d, v):
        return True
    if d.op == "call_function" and d.target is operator.getitem and d.args[1] == 0:
        src = d.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr and src.args[0] is v
    return False


def _mean(cl, user, v, cdim, rep, nd):
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
        return (cdim, rep, nd)
    return (cdim - sum(d < cdim for d in dims), rep, nd - len(set(dims)))


def _binary(cl, user, v, cdim, rep, nd, add_like):
    tensors = _nodes_in((user.args, user.kwargs))
    others = [n for n in tensors if n is not v]
    if not others:
        shp = _shape(user)
        if shp is None or len(shp) != nd:
            return _blk(cl, "elementwise op changes the rank")
        return (cdim, rep, nd)  # with a Python number (or with itself)
    shp = _shape(user)
    shp_v = _shape(v)
    if shp is None or shp_v is None or shp != shp_v:
        return _blk(cl, "elementwise op broadcasts the channel tensor")
    if user not in cl.joins:
        cl.joins.append(user)
        if add_like:
            cl.add_joins.append(user)
    return (cdim, rep, nd)


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
    cl.state[node] = (cdim, 1, len(shp))
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


class _DSU:
    def __init__(self, items):
        self.p = {i: i for i in items}

    def find(self, x):
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.p[b] = a


def find_channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Sequence[str] | str = (),
    exclude_channels: Sequence[str] | str = (),
    coupled: bool = False,
) -> list[ChannelGroup]:
    """Prunable channel groups of ``model`` by the SPEC §4 rule (see the module doc).

    ``example_inputs``: a tensor or a tuple/list of positional inputs the model accepts
    (a batch of one or two is enough). Returns ``[]`` with a warning when the model does
    not trace.
    """
    excl = _norm_patterns(exclude)
    excl_ch = _norm_patterns(exclude_channels)
    _warn_unmatched_channels(model, excl_ch)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure
        warnings.warn(
            f"chase_ext: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
            "no channel groups found, channel pruning is off. Pass explicit channel groups "
            "(chase_ext.graph.explicit_groups / channel_groups=...) to enable it.",
            stacklevel=2,
        )
        return []
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _shape_prop(model, gm, args)
    tr = _Trace(model, gm)

    closures: list[_Closure] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        m = tr.modules.get(name)
        if m is None or not _is_producer_module(m) or name in tr.bad:
            continue
        cl = _closure(tr, name, node, excl)
        if _match(f"{name}.weight", excl):
            cl.block("producer weight is excluded")
        closures.append(cl)

    # joins: every tensor operand must be in the component's channel space
    dsu = _DSU([c.producer for c in closures])
    by_join: dict[fx.Node, list[_Closure]] = {}
    for c in closures:
        for j in c.joins:
            by_join.setdefault(j, []).append(c)
    if coupled:
        for j, cs in by_join.items():
            if j in cs[0].add_joins:
                for c in cs[1:]:
                    dsu.union(cs[0].producer, c.producer)
    comps: dict[str, list[_Closure]] = {}
    for c in closures:
        comps.setdefault(dsu.find(c.producer), []).append(c)

    groups: list[tuple[int, ChannelGroup]] = []
    for members in comps.values():
        if any(c.blocked for c in members):
            continue
        if any(_match(c.producer, excl_ch) or _match(f"{c.producer}.weight", excl_ch) for c in members):
            continue
        state: dict[fx.Node, tuple] = {}
        for c in members:
            state.update(c.state)
        ok = True
        for c in members:
            for j in c.joins:
                ops = _nodes_in((j.args, j.kwargs))
                if any(o not in state for o in ops) or len({state[o] for o in ops}) != 1:
                    ok = False
                    break
                # a join of two different producers is only allowed when coupled
                owners = {c2.producer for c2 in members for o in ops if o in c2.state}
                if len(owners) > 1 and (not coupled or j not in c.add_joins):
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            continue
        chans = {tr.modules[c.producer].weight.shape[0] for c in members}
        if len(chans) != 1:
            continue
        cons: dict[str, tuple[fx.Node, int]] = {}
        fol: dict[str, fx.Node] = {}
        for c in members:
            cons.update(c.consumers)
            fol.update(c.followers)
        if not cons:
            continue
        (C,) = chans
        # shapes double check: every follower/consumer sees C channels
        if not _check_sizes(tr, C, fol, cons):
            continue
        prods = sorted((c.producer for c in members), key=lambda p: tr.param_pos.get(f"{p}.weight", 1 << 60))
        g = ChannelGroup(
            producers=prods,
            consumers=[Consumer(n, r) for n, (nd, r) in sorted(cons.items(), key=lambda kv: tr.order[kv[1][0]])],
            followers=[n for n, nd in sorted(fol.items(), key=lambda kv: tr.order[kv[1]])],
            channels=int(C),
        )
        groups.append((tr.param_pos.get(f"{prods[0]}.weight", 1 << 60), g))

    unhandled = sorted(
        {n for n in tr.bad if "outside its call" not in tr.bad[n]} | {t.rpartition(".")[0] for t in tr.functional}
    )
    if unhandled:
        details = ", ".join(
            f"{n} ({tr.bad.get(n, 'weight used functionally')})" for n in unhandled
        )
        warnings.warn(
            f"chase_ext: these layers cannot be handled by channel pruning and block any "
            f"channel group they touch: {details}",
            stacklevel=2,
        )
    groups.sort(key=lambda t: t[0])
    return [g for _, g in groups]


def _warn_unmatched_channels(model: nn.Module, patterns: Sequence[str]) -> None:
    """One warning per ``exclude_channels`` pattern that names no producer layer."""
    if not patterns:
        return
    names = [n for n, m in model.named_modules(remove_duplicate=False) if _is_producer_module(m)]
    for p in patterns:
        if not any(_match(n, (p,)) or _match(f"{n}.weight", (p,)) for n in names):
            warnings.warn(
                f"chase_ext: exclude_channels pattern {p!r} matches no producer layer "
                "(Conv with groups=1 or Linear, by module name or '<name>.weight'); it excludes nothing",
                UserWarning,
                stacklevel=3,
            )


def _check_sizes(tr: _Trace, C: int, fol, cons) -> bool:
    for n in fol:
        m = tr.modules[n]
        if isinstance(m, _NORM) and m.num_features != C:
            return False
        if _is_depthwise(m) and m.in_channels != C:
            return False
    for n, (_, r) in cons.items():
        m = tr.modules[n]
        if isinstance(m, nn.Linear) and m.in_features != C * r:
            return False
        if isinstance(m, _CONV) and (m.in_channels != C or r != 1):
            return False
    return True


def _describe_inputs(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"tensor of shape {list(a.shape)} ({a.dtype}, {a.device})")
        else:
            parts.append(type(a).__name__)
    return ", ".join(parts) if parts else "no inputs"


def _shape_prop(model: nn.Module, gm: fx.GraphModule, args: tuple) -> None:
    import contextlib
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


# --------------------------------------------------------------------------- explicit
def group_to_dict(g: ChannelGroup) -> dict:
    """A plain (picklable, JSON-able) description of a group."""
    return {
        "producers": list(g.producers),
        "consumers": [[c.module, int(c.repeat)] for c in g.consumers],
        "followers": list(g.followers),
        "channels": int(g.channels),
    }


def group_from_dict(d: dict) -> ChannelGroup:
    """Inverse of :func:`group_to_dict` (no validation against a model)."""
    cons = [Consumer(c) if isinstance(c, str) else Consumer(str(c[0]), int(c[1])) for c in d.get("consumers", [])]
    return ChannelGroup(
        producers=list(d["producers"]),
        consumers=cons,
        followers=list(d.get("followers", [])),
        channels=int(d.get("channels", 0)),
    )


def explicit_groups(model: nn.Module, spec: Sequence[dict | ChannelGroup]) -> list[ChannelGroup]:
    """Validate a user-given list of groups into ``ChannelGroup`` objects.

    Each entry is a ``ChannelGroup`` or a dict with keys ``"producers"`` (module names of
    Conv(groups=1)/Linear layers with equal output width), ``"consumers"`` (module names,
    or ``(name, repeat)`` for a Linear reading each channel as ``repeat`` consecutive
    input features), optional ``"followers"`` (BatchNorm/InstanceNorm or depthwise convs
    of that width) and optional ``"channels"`` (checked). Widths are checked against the
    model's current shapes. A module's output channels (as producer or follower) belong
    to at most one group, and so do its input channels (as consumer): a layer may consume
    one group and produce the next, as every inner layer of a chain does, but not both
    within one group. Groups come back ordered by their first producer's position in
    ``model.named_parameters()``. Raises ``ValueError``/``TypeError`` naming the entry.
    """
    if isinstance(spec, (dict, ChannelGroup)):
        spec = [spec]
    mods = dict(model.named_modules())
    pos = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    used: dict[tuple[str, str], str] = {}  # (module, "out" | "in") -> where it appeared
    out: list[tuple[int, ChannelGroup]] = []

    def get(i, role, name):
        if not isinstance(name, str):
            raise TypeError(f"channel_groups[{i}].{role}: module names must be strings, got {name!r}")
        if name not in mods:
            raise ValueError(f"channel_groups[{i}].{role}: model has no module {name!r}")
        side = "in" if role == "consumers" else "out"
        key = used.get((name, side))
        if key is not None:
            raise ValueError(f"channel_groups[{i}].{role}: module {name!r} already appears in {key}")
        other = used.get((name, "out" if side == "in" else "in"), "")
        if other.startswith(f"channel_groups[{i}]."):
            raise ValueError(f"channel_groups[{i}].{role}: module {name!r} already appears in {other} "
                             "of the same group")
        used[(name, side)] = f"channel_groups[{i}].{role}"
        return mods[name]

    for i, entry in enumerate(spec):
        if isinstance(entry, ChannelGroup):
            entry = group_to_dict(entry)
            if not entry["channels"]:
                entry.pop("channels")
        if not isinstance(entry, dict):
            raise TypeError(f"channel_groups[{i}] must be a dict or ChannelGroup, got {type(entry).__name__}")
        unknown = set(entry) - {"producers", "consumers", "followers", "channels"}
        if unknown:
            raise ValueError(f"channel_groups[{i}]: unknown keys {sorted(unknown)}")
        prods = entry.get("producers")
        if isinstance(prods, str):
            prods = [prods]
        if not prods:
            raise ValueError(f"channel_groups[{i}]: 'producers' must list at least one module")
        cons_raw = entry.get("consumers")
        if isinstance(cons_raw, str):
            cons_raw = [cons_raw]
        if not cons_raw:
            raise ValueError(f"channel_groups[{i}]: 'consumers' must list at least one module")
        fols = entry.get("followers", []) or []
        if isinstance(fols, str):
            fols = [fols]
        widths = set()
        for p in prods:
            m = get(i, "producers", p)
            if not _is_producer_module(m):
                raise ValueError(
                    f"channel_groups[{i}].producers: {p!r} is a {type(m).__name__}; producers must be "
                    "Conv1d/2d/3d with groups=1 or Linear"
                )
            widths.add(int(m.weight.shape[0]))
        if len(widths) != 1:
            raise ValueError(f"channel_groups[{i}].producers have different output widths {sorted(widths)}")
        (C,) = widths
        if "channels" in entry and entry["channels"] is not None and int(entry["channels"]) != C:
            raise ValueError(f"channel_groups[{i}].channels={entry['channels']} but the producers have {C}")
        for f in fols:
            m = get(i, "followers", f)
            if isinstance(m, _NORM):
                if m.num_features != C:
                    raise ValueError(f"channel_groups[{i}].followers: {f!r} has num_features={m.num_features}, expected {C}")
            elif isinstance(m, _CONV) and m.groups > 1:
                if not _is_depthwise(m) or m.in_channels != C:
                    raise ValueError(
                        f"channel_groups[{i}].followers: conv {f!r} must be depthwise with "
                        f"groups == in_channels == out_channels == {C}"
                    )
            else:
                raise ValueError(
                    f"channel_groups[{i}].followers: {f!r} is a {type(m).__name__}; followers must be "
                    "BatchNorm/InstanceNorm or depthwise convs"
                )
        cons = []
        for c in cons_raw:
            if isinstance(c, Consumer):
                name, rep = c.module, c.repeat
            elif isinstance(c, str):
                name, rep = c, 1
            elif isinstance(c, (tuple, list)) and len(c) == 2:
                name, rep = c
            else:
                raise TypeError(f"channel_groups[{i}].consumers: expected a name or (name, repeat), got {c!r}")
            if not isinstance(rep, int) or isinstance(rep, bool) or rep < 1:
                raise ValueError(f"channel_groups[{i}].consumers: repeat of {name!r} must be a positive int, got {rep!r}")
            m = get(i, "consumers", name)
            if isinstance(m, nn.Linear):
                if m.in_features != C * rep:
                    raise ValueError(
                        f"channel_groups[{i}].consumers: linear {name!r} has in_features={m.in_features}, "
                        f"expected {C} channels x repeat {rep} = {C * rep}"
                    )
            elif isinstance(m, _CONV) and m.groups == 1:
                if rep != 1 or m.in_channels != C:
                    raise ValueError(
                        f"channel_groups[{i}].consumers: conv {name!r} has in_channels={m.in_channels}, "
                        f"expected {C} (repeat must be 1 for a conv)"
                    )
            else:
                raise ValueError(
                    f"channel_groups[{i}].consumers: {name!r} is a {type(m).__name__}; consumers must be "
                    "Conv1d/2d/3d with groups=1 or Linear"
                )
            cons.append(Consumer(name, rep))
        prods = sorted(prods, key=lambda p: pos.get(f"{p}.weight", 1 << 60))
        g = ChannelGroup(producers=list(prods), consumers=cons, followers=list(fols), channels=C)
        out.append((pos.get(f"{prods[0]}.weight", 1 << 60), g))
    out.sort(key=lambda t: t[0])
    return [g for _, g in out]
