"""ChaseOptimizer: the schedule that drives masks, channel events and slimming.

``ChaseOptimizer(optimizer, model, *, density, total_steps, ..., backend="native")`` is a
real ``torch.optim.Optimizer`` that shares ``param_groups``, ``state`` and ``defaults``
with the optimizer it wraps, so LR schedulers, ``GradScaler``, ``zero_grad`` and
``state_dict`` work on it as on the wrapped one.

Step order (SPEC §3.0, §4): ``t`` counts the steps that actually ran (``GradScaler`` calls
``step()`` only when the gradients are finite, so a skipped step never reaches us and
does not count). On step ``t``:

1. if ``t`` is an update step (``t % update_interval == 0 and t < t_end``): the sparse
   weights (and, for gradient growth, their gradients) are checked finite with a single
   host sync, raising ``FloatingPointError`` with nothing changed; then ``|grad|`` of every
   sparse tensor is copied (the growth scores, read before the wrapped step);
2. the wrapped optimizer steps;
3. one ``masked_apply_`` zeroes masked weights and every same-shape optimizer-state tensor
   (and the bias entries of removed channels);
4. on an update step, the weights are checked again (the wrapped step can overflow, and
   random growth does not check gradients): non-finite ones raise ``FloatingPointError``
   with the step taken but no event or update run (masks, channels and the generator
   unchanged); a second host sync, on update steps only;
5. a channel event, if one falls on ``t`` (and slimming, if due); non-finite channel
   scores raise ``FloatingPointError`` before anything is removed;
6. the parameter update: one ``mask_update_`` call for the whole model.

Non-update, non-event steps do no host sync: they only build the ``masked_apply_`` call.

Choices where SPEC is vague:

* **Closures**: with ``step(closure)`` the gradient growth scores are the gradients present
  when ``step`` is called (compute them before, or they count as 0), because the closure
  runs inside the wrapped step.
* **Gradients are never masked**; masked slots of weights and states are zeroed after every
  step instead (an elementwise optimizer's active slots are unaffected by this).
* **DDP / DataParallel** models are unwrapped (``.module``) so parameter names have no
  ``module.`` prefix. Decisions depend only on weights, DDP-averaged gradients and the
  seeded CPU generator, so every rank takes the same ones without communication.
  Slimming changes parameter shapes, which a built DDP wrapper cannot follow: re-wrap with
  ``ddp = chase_ext.rewrap_ddp(ddp, chase)`` after ``chase.step()`` (a no-op on steps that
  did not slim); a slim under DDP warns once per slim.
* **Explicit groups**: ``channel_groups`` is any spec accepted by
  ``chase_ext.graph.explicit_groups`` (``ChannelGroup`` objects or dicts); it wins over
  tracing when both it and ``example_inputs`` are given.
* Every producer and consumer weight of a group must be a sparse tensor (else
  ``ValueError`` at construction); a depthwise follower that is not sparse (excluded) is
  left alone.
* ``slim_during_training=k`` slims after the k-th, 2k-th, ... event (events counted from 1,
  including events that removed nothing); call ``slim_()`` at the end for the rest.
* **Checkpoints**: ``state_dict()`` is the wrapped optimizer's state dict plus a
  ``"chase"`` entry (masks, ``t``, RNG state, per-tensor counts, channel records and slim
  records). ``load_state_dict`` validates everything first (raising ``ValueError`` with
  nothing changed), replays slims the current model has not seen, then loads. To resume a
  slimmed run in a fresh full-width model, build model + optimizer + ChaseOptimizer, load
  the ChaseOptimizer state dict, then the model state dict.
* Masks are stored (and checkpointed) as ``torch.bool`` tensors shaped like their
  parameters, on the parameter's device; not bit-packed.
* ``load_state_dict`` compares the mask-deciding config fields (density, total_steps,
  channel_sparsity, init, scope, seed), the sparse tensor names and original shapes, N,
  B, the group names and widths, and the wrapped optimizer's group sizes; it checks every
  counter, mask and channel record, replays the slim records on paper (they must end at
  the recorded channels), refuses a changed ``round_to`` / ``min_channel_ratio`` and warns
  about other changed settings. The wrapped optimizer's state is loaded before the model
  is slimmed (and put back if that load fails), so a refused load changes nothing.
* ``FloatingPointError`` (a subclass of ``ArithmeticError``) is raised for non-finite
  weights or gradients at an update step.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from . import layout as _layout
from . import sparsity as _sp
from .channels import ChannelState, channel_floor, group_scores, select_channels, target_live
from .config import ChaseConfig
from .density import erk_counts
from .groups import ChannelGroup
from .schedules import is_channel_event, is_update_step

__all__ = ["ChaseOptimizer"]

_STATE_VERSION = 1
# settings whose change would make the recorded channel state inconsistent: refused on load
_DECIDES_CHANNELS = ("round_to", "min_channel_ratio")


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_count(v, name: str, n: int | None = None) -> None:
    """A checkpoint entry that is an int >= 0 (or, with n, a list of n of them)."""
    if n is not None and (not isinstance(v, (list, tuple)) or len(v) != n):
        raise ValueError(f"checkpoint's {name!r} must be a list of {n} counts, got {v!r:.80}")
    for x in (v if n is not None else [v]):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise ValueError(f"checkpoint's {name!r} must hold ints >= 0, got {x!r:.80}")


def _load_backend(backend: str):
    if backend == "reference":
        from . import reference

        return reference
    if backend == "native":
        try:
            from . import _ops
        except Exception as e:  # no silent fallback: say how to get the reference path
            raise ImportError(
                "chase_ext native ops (chase_ext._C) could not be loaded; build the extension "
                "or pass backend='reference'"
            ) from e
        return _ops
    raise ValueError(f"backend must be 'native' or 'reference', got {backend!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


class ChaseOptimizer(torch.optim.Optimizer):
    """Channel-aware dynamic sparse training around any ``torch.optim.Optimizer``.

    ``ChaseOptimizer(optimizer, model, config=None, *, backend="native", **knobs)``

    * ``optimizer``: built on ``model.parameters()`` (every sparse weight must be in it);
      its ``param_groups`` and ``state`` are shared, so LR schedulers and ``GradScaler``
      work on this object as on the wrapped one.
    * ``model``: the network (a DDP / DataParallel wrapper is unwrapped).
    * ``config``: a :class:`chase_ext.ChaseConfig`, or the knobs as keywords (SPEC §8 names:
      ``density`` and ``total_steps`` required; ``channel_sparsity``, ``example_inputs``,
      ``init``, ``grow``, ``scope``, ``update_interval``, ``t_end``, ``soft_bound``,
      ``soft_bound_end``, ``t_explore_end``, ``swap_fraction``, ``swap_fraction_end``,
      ``channel_interval``, ``channel_end``, ``min_channel_ratio``, ``channel_score``,
      ``round_to``, ``slim_during_training``, ``exclude``, ``exclude_channels``,
      ``coupled_channels``, ``channel_groups``, ``dense_first_layer``, ``seed``; see
      ``chase_ext.config``). Keywords given with ``config`` override its fields.
    * ``backend``: ``"native"`` (the compiled kernels) or ``"reference"`` (plain PyTorch).

    Construction zeroes the masked weights (ERK / uniform init) and finds the channel
    groups. Call ``step()`` where the wrapped optimizer's ``step()`` would be called; see
    the module docstring for what a step does.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        config: ChaseConfig | None = None,
        *,
        backend: str = "native",
        **kwargs: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ChaseOptimizer):
            raise TypeError("optimizer is already a ChaseOptimizer")
        if config is not None and not isinstance(config, ChaseConfig):
            raise TypeError(f"config must be a ChaseConfig (the knobs are keyword arguments: density=..., "
                            f"total_steps=...), got {type(config).__name__} {config!r:.40}")
        if config is None:
            config = ChaseConfig(**kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        self.ops = _load_backend(backend)
        self.backend = backend
        self.optimizer = optimizer
        self.config = config
        self.model = _unwrap(model)
        self._wrapped_in_ddp = _is_ddp(model)
        self._rewraps_ddp = False  # set by chase_ext.rewrap_ddp(ddp, self): the loop re-wraps after slims

        # --- torch.optim.Optimizer plumbing, shared with the wrapped optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        # --- sparse tensors
        cfg = config
        sparse = _sp.find_sparse(self.model, cfg.exclude)
        if not sparse:
            raise ValueError("the model has no sparse tensors (Conv/Linear weights not excluded)")
        if backend == "native":  # the kernels take one of these, one dtype for the model
            kinds = {p.dtype for _, p in sparse}
            odd = [f"{n!r} is {p.dtype}" for n, p in sparse if p.dtype not in _KERNEL_DTYPES]
            if odd or len(kinds) > 1:
                raise TypeError(
                    "ChaseOptimizer: the sparse weights must share one dtype among float32, bfloat16 and "
                    f"float16 (got {', '.join(odd) if odd else sorted(map(str, kinds))}); convert the model "
                    "or exclude those weights"
                )
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in sparse if id(p) not in owned]
        if missing:
            raise ValueError(
                f"the optimizer does not update {len(missing)} sparse weight(s) of the model "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): build it on model.parameters(), "
                "or exclude those weights"
            )
        self._names = [n for n, _ in sparse]
        self._params = [p for _, p in sparse]
        self._check_devices()
        self._unmasked_states: set[tuple[int, Any]] = set()  # (id(param), state key) warned about
        self._index = {n: i for i, n in enumerate(self._names)}
        self._orig_shapes = [tuple(p.shape) for p in self._params]
        self.total_sparse = int(sum(p.numel() for p in self._params))
        self.budget = int(round(cfg.density * self.total_sparse))
        self._t = 0
        self._gen = torch.Generator()
        self._gen.manual_seed(cfg.seed)

        counts = _sp.init_counts(self._orig_shapes, self.budget, cfg.init, cfg.dense_first_layer, cfg.density)
        self._k = list(counts)  # per-tensor counts (layer scope)
        masks = _sp.init_masks(self._params, counts, self._gen)
        self._mask_dict: dict[str, torch.Tensor] = dict(zip(self._names, masks))

        # --- channel groups
        self.groups: list[ChannelGroup] = []
        self._ch: ChannelState | None = None
        if cfg.channel_sparsity > 0:
            self._setup_channels()
        else:
            unused = [k for k in ("exclude_channels", "coupled_channels", "channel_groups", "round_to")
                      if getattr(cfg, k) not in ((), False, None)]
            if unused:
                warnings.warn(f"channel_sparsity=0 (no channel part): {', '.join(unused)} ignored", stacklevel=2)
        self._rebuild_live()
        with torch.no_grad():
            self._masked_apply()

    # ------------------------------------------------------------------ setup
    def _setup_channels(self) -> None:
        cfg = self.config
        spec = cfg.channel_groups
        if spec is not None:
            from .graph import explicit_groups

            groups = explicit_groups(self.model, spec)
        else:
            from .graph import find_channel_groups

            groups = find_channel_groups(
                self.model,
                cfg.example_inputs,
                exclude=cfg.exclude,
                exclude_channels=cfg.exclude_channels,
                coupled=cfg.coupled_channels,
            )
        if not groups:
            warnings.warn(f"channel_sparsity={cfg.channel_sparsity} but the model has no prunable channel group "
                          "(see exclude_channels, or give channel_groups): only the unstructured part runs",
                          stacklevel=3)
        modules = dict(self.model.named_modules())
        self.groups = groups
        n = len(self._params)
        self._row_group: list[int | None] = [None] * n
        self._col_group: list[tuple[int, int] | None] = [None] * n
        self._g_prod: list[list[int]] = []
        self._g_fan_in: list[list[int]] = []
        self._g_bias: list[list[nn.Parameter]] = []
        channels = []
        for gi, g in enumerate(groups):
            C = int(g.channels)
            prods, fans, biases = [], [], []
            for m in g.producers:
                i = self._index.get(f"{m}.weight")
                if i is None:
                    raise ValueError(f"channel group {g.name!r}: producer {m!r} has no sparse weight (excluded?)")
                shp = self._orig_shapes[i]
                if shp[0] != C:
                    raise ValueError(f"channel group {g.name!r}: producer {m!r} has {shp[0]} output channels, group says {C}")
                if self._row_group[i] is not None:
                    raise ValueError(f"{m!r} is a producer of two channel groups")
                self._row_group[i] = gi
                prods.append(i)
                fans.append(int(math.prod(shp[1:])))
                b = getattr(modules.get(m), "bias", None)
                if isinstance(b, nn.Parameter):
                    biases.append(b)
            for f in g.followers:
                mod = modules.get(f)
                if isinstance(mod, _sp.SPARSE_MODULES):  # depthwise conv: rows are channels
                    i = self._index.get(f"{f}.weight")
                    if i is not None:
                        if self._row_group[i] is not None:
                            raise ValueError(f"{f!r} belongs to two channel groups")
                        self._row_group[i] = gi
                    b = getattr(mod, "bias", None)
                    if isinstance(b, nn.Parameter):
                        biases.append(b)
            for c in g.consumers:
                i = self._index.get(f"{c.module}.weight")
                if i is None:
                    raise ValueError(
                        f"channel group {g.name!r}: consumer {c.module!r} has no sparse weight (excluded?)"
                    )
                if self._orig_shapes[i][1] != C * c.repeat:
                    raise ValueError(
                        f"channel group {g.name!r}: consumer {c.module!r} reads {self._orig_shapes[i][1]} inputs, "
                        f"expected channels*repeat = {C}*{c.repeat}"
                    )
                if self._col_group[i] is not None:
                    raise ValueError(f"{c.module!r} is a consumer of two channel groups")
                self._col_group[i] = (gi, int(c.repeat))
            self._g_prod.append(prods)
            self._g_fan_in.append(fans)
            self._g_bias.append(biases)
            channels.append(C)
        self._ch = ChannelState(channels)
        self._floors = [
            channel_floor(C, cfg.channel_sparsity, cfg.min_channel_ratio, cfg.round_to) for C in channels
        ]

    def _rebuild_live(self) -> None:
        """Live row/col vectors and bias masks from the channel state (after any change)."""
        n = len(self._params)
        self._live_rows: list[torch.Tensor | None] = [None] * n
        self._live_cols: list[torch.Tensor | None] = [None] * n
        self._bias_masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._any_removed = False
        ch = self._ch
        if ch is None:
            self._live_arg = ([], [])
            return
        phys = [ch.physical_live(g) for g in range(len(ch.channels))]
        partial = [not bool(pl.all()) for pl in phys]
        for i, p in enumerate(self._params):
            g = self._row_group[i]
            if g is not None:
                self._live_rows[i] = phys[g]
            gc = self._col_group[i]
            if gc is not None:
                self._live_cols[i] = phys[gc[0]].repeat_interleave(gc[1])
        self._any_removed = any(partial)
        if self._any_removed:
            lr, lc = [], []
            for i, p in enumerate(self._params):
                r = self._live_rows[i]
                c = self._live_cols[i]
                lr.append((r if r is not None else torch.ones(p.shape[0], dtype=torch.bool)).to(p.device))
                lc.append((c if c is not None else torch.ones(p.shape[1], dtype=torch.bool)).to(p.device))
            self._live_arg = (lr, lc)
            for g, part in enumerate(partial):
                if part:
                    for b in self._g_bias[g]:
                        self._bias_masks.append((b, phys[g].to(b.device)))
        else:
            self._live_arg = ([], [])

    # ------------------------------------------------------------------ public API
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> bool mask (True = active), current physical shapes, on each
        parameter's device and in its memory layout."""
        self._align_masks()
        return self._mask_dict

    @property
    def t(self) -> int:
        """Optimizer steps actually taken."""
        return self._t

    @property
    def slim_count(self) -> int:
        """How many times channels were physically removed (``slim_()`` or during training)."""
        return 0 if self._ch is None else len(self._ch.slim_records)

    def active_count(self) -> int:
        """Active (unmasked) weights over all sparse tensors now (one host sync)."""
        self._align_masks()
        return sum(self._nnz())

    def sparse_names(self) -> list[str]:
        """Names of the sparse (masked) weights, in global order (SPEC §1)."""
        return list(self._names)

    def channel_report(self) -> list[dict]:
        """One dict per channel group: ``group`` name, ``producers``, original ``channels``
        and ``live`` (not removed) count; ``[]`` without a channel part."""
        if self._ch is None:
            return []
        live = self._ch.live_counts()
        return [
            {"group": g.name, "producers": list(g.producers), "channels": int(C), "live": int(lv)}
            for g, C, lv in zip(self.groups, self._ch.channels, live)
        ]

    def channel_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Param name -> (active count per row, int64; Σ|w| per row over active slots, float32)."""
        self._align_masks()
        ws = [p.detach() for p in self._params]
        counts, sums = _layout.channel_stats(self.ops, ws, self._mask_list())
        out, off = {}, 0
        for n, w in zip(self._names, ws):
            r = w.shape[0]
            out[n] = (counts[off : off + r], sums[off : off + r])
            off += r
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Adds to the wrapped optimizer; new parameters are trained dense (they are not sparse tensors)."""
        self.optimizer.add_param_group(param_group)

    # shared with the wrapped optimizer
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def __repr__(self) -> str:
        return f"ChaseOptimizer({self.optimizer!r}, density={self.config.density}, t={self._t})"

    # ------------------------------------------------------------------ internals
    def _mask_list(self) -> list[torch.Tensor]:
        return [self._mask_dict[n] for n in self._names]

    def _states_of(self, p: torch.Tensor, name: str | None) -> list[torch.Tensor]:
        """The optimizer-state tensors of ``p`` that are masked with it: those shaped like it.
        Integer state (e.g. 8-bit quantised moments, whose zero byte is not 0.0) and state
        kept on another device are left alone, with a warning once per entry."""
        out = []
        for key, v in (self.optimizer.state.get(p) or {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v is not p:
                if v.is_floating_point() and v.device == p.device:
                    out.append(v)
                elif (id(p), key) not in self._unmasked_states:
                    self._unmasked_states.add((id(p), key))
                    of = repr(name) if name else "a bias of a channel group"
                    warnings.warn(
                        f"optimizer state {key!r} of {of} ({v.dtype} on {v.device}) is not masked: only "
                        "floating-point state on the parameter's device is zeroed at masked slots (the "
                        "weights themselves still are)", stacklevel=6)  # the caller of step()
        return out

    def _state_list(self) -> tuple[list[torch.Tensor], list[int]]:
        """Every masked optimizer-state tensor of the sparse params, with its owner index."""
        states, owner = [], []
        for i, p in enumerate(self._params):
            for v in self._states_of(p, self._names[i]):
                states.append(v)
                owner.append(i)
        return states, owner

    def _masked_apply(self) -> None:
        tensors = [p.detach() for p in self._params]
        masks = self._mask_list()
        owner = list(range(len(tensors)))
        states, sowner = self._state_list()
        tensors += states
        owner += sowner
        for b, bm in self._bias_masks:
            j = len(masks)
            masks.append(bm)
            tensors.append(b.detach())
            owner.append(j)
            for v in self._states_of(b, None):
                tensors.append(v)
                owner.append(j)
        _layout.masked_apply_(self.ops, tensors, masks, owner)

    def _align_masks(self) -> None:
        """Keep each mask on its parameter's device and in its memory layout (the user may
        move the model after wrapping it, e.g. ``model.cuda()`` or
        ``model.to(memory_format=torch.channels_last)``), so masked apply needs no copies.
        Runs first in ``step`` and in every public method that reads masks, so a model
        moved to a device the kernels cannot take is refused before anything changes.
        Host-side checks only: no sync."""
        moved = any(self._mask_dict[n].device != p.device for n, p in zip(self._names, self._params))
        if moved:
            self._check_devices()
        for n, p in zip(self._names, self._params):
            m = self._mask_dict[n]
            if m.device != p.device:
                m = self._mask_dict[n] = m.to(p.device)
            if not _layout.same_layout(m, p):
                self._mask_dict[n] = _layout.like(m, p)
        if moved:  # the liveness vectors and bias masks follow (they are built per device)
            self._rebuild_live()

    def _check_devices(self) -> None:
        """One device for all sparse weights, and one the backend has kernels for."""
        devices = sorted({str(p.device) for p in self._params})
        if len(devices) > 1:
            raise ValueError(
                f"ChaseOptimizer: the sparse weights are on several devices ({', '.join(devices)}); every "
                "kernel call covers the whole model on one device: put the model on one device"
            )
        if self.backend == "native" and self._params[0].device.type == "cuda" and not self.ops.build_info()["has_cuda"]:
            raise RuntimeError(
                "ChaseOptimizer: the model is on CUDA but chase_ext._C was built without CUDA kernels; "
                "rebuild it with CHASE_EXT_CUDA=1 (pip install --no-build-isolation .) or pass backend='reference'"
            )

    def _nonfinite(self, grads: bool) -> list[str]:
        """Names of the sparse weights (and gradients) holding a non-finite value; one sync."""
        ts, names = [], []
        for n, p in zip(self._names, self._params):
            ts.append(p.detach())
            names.append(f"weight {n!r}")
            if grads and p.grad is not None:
                ts.append(p.grad.detach())
                names.append(f"gradient of {n!r}")
        # A sum is non-finite whenever one element is (inf + x = inf, inf - inf = NaN, NaN
        # spreads), and it reads each tensor once with no temporary: 10 ms where
        # isfinite().all() took 176 ms on ResNet-50 weights + gradients (1 thread). A sum
        # can also overflow on finite values, so only the tensors it flags get the exact check.
        dev = ts[0].device
        sums = torch.stack([x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).to(dev)
                            for x in ts])
        flagged = torch.nonzero(~torch.isfinite(sums).cpu()).flatten().tolist()  # one sync
        return [names[i] for i in flagged if not bool(torch.isfinite(ts[i]).all())]

    def _live_numels(self) -> list[int]:
        out = []
        for i, p in enumerate(self._params):
            r = self._live_rows[i]
            c = self._live_cols[i]
            out.append(
                _sp.live_numel(
                    p.shape,
                    None if r is None else int(r.sum()),
                    None if c is None else int(c.sum()),
                )
            )
        return out

    def _live_shapes(self) -> list[tuple[int, ...]]:
        out = []
        for i, p in enumerate(self._params):
            shp = list(p.shape)
            r, c = self._live_rows[i], self._live_cols[i]
            if r is not None:
                shp[0] = int(r.sum())
            if c is not None:
                shp[1] = int(c.sum())
            out.append(tuple(shp))
        return out

    def _nnz(self) -> list[int]:
        ms = self._mask_list()
        if not ms:
            return []
        dev = ms[0].device
        # count_nonzero on bool: 15 ms where sum() took 96 ms (25.5 M slots, 1 thread)
        return [int(x) for x in torch.stack([torch.count_nonzero(m).to(dev) for m in ms]).tolist()]

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One optimizer step with masking, and on schedule a channel event and a mask
        update (module docstring, "Step order"). Returns the closure's loss, if any."""
        cfg = self.config
        self._align_masks()
        t = self._t + 1
        upd = is_update_step(t, cfg.update_steps, cfg.t_end_steps)
        ev = (
            self._ch is not None
            and not self._ch.done
            and is_channel_event(t, cfg.channel_interval_steps, cfg.update_steps)
        )
        scores = None
        if upd:
            gradient = cfg.grow == "gradient"
            bad = self._nonfinite(grads=gradient)
            if bad:
                raise FloatingPointError(
                    f"ChaseOptimizer: non-finite values at update step {t} in {', '.join(bad)}; "
                    "nothing was changed (step not taken)"
                )
            if gradient:
                scores = [
                    p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p)
                    for p in self._params
                ]
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._t = t
        with torch.no_grad():
            self._masked_apply()
            if upd:
                # the wrapped step itself can overflow (or, with random growth, apply a
                # non-finite gradient, which SPEC §3.0 does not check): refuse the update
                bad = self._nonfinite(grads=False)
                if bad:
                    raise FloatingPointError(
                        f"ChaseOptimizer: the wrapped optimizer's step {t} made {', '.join(bad)} "
                        "non-finite; that step was taken, but no channel event or mask update ran "
                        "(masks, channels and the random generator are unchanged)"
                    )
            if ev:
                scores = self._channel_event(t, scores)
            if upd:
                self._update(t, scores)
        return loss

    def _update(self, t: int, scores: list[torch.Tensor] | None) -> None:
        cfg = self.config
        nnz = self._nnz()
        if cfg.scope == "global":
            prune, grow, _ = _sp.global_counts(
                t,
                sum(nnz),
                self.budget,
                self.total_sparse,
                sum(self._live_numels()),
                t_explore_end=cfg.t_explore_end_steps,
                t_end=cfg.t_end_steps,
                soft_bound0=cfg.soft_bound,
                soft_bound_end=cfg.soft_bound_end,
                swap0=cfg.swap_fraction,
                swap_end=cfg.swap_fraction_end,
            )
            pc, gc = [prune], [grow]
        else:
            pc, gc = _sp.layer_counts(
                t, nnz, self._k, self._live_numels(),
                t_end=cfg.t_end_steps, swap0=cfg.swap_fraction, swap_end=cfg.swap_fraction_end,
            )
        if cfg.grow == "random":
            # One draw and one copy (the sparse weights share a device, _check_devices): a
            # copy per tensor would make the host wait for the GPU once per tensor. The CPU
            # generator fills in order, so these are the numbers a draw per tensor gives.
            numels = [p.numel() for p in self._params]
            flat = torch.rand(sum(numels), generator=self._gen).to(self._params[0].device)
            scores = [s.view(p.shape) for s, p in zip(flat.split(numels), self._params)]
        assert scores is not None
        states, owner = self._state_list()
        lr, lc = self._live_arg
        _layout.mask_update_(
            self.ops, [p.detach() for p in self._params], self._mask_list(), scores, lr, lc, states, owner, pc, gc
        )

    # ------------------------------------------------------------------ channels
    def _channel_scores(self) -> list[list[tuple[float, int]]]:
        """(score, original channel) of every alive channel, per group."""
        ch = self._ch
        assert ch is not None
        prod = [i for ps in self._g_prod for i in ps]
        ws = [self._params[i].detach() for i in prod]
        ms = [self._mask_dict[self._names[i]] for i in prod]
        counts, sums = _layout.channel_stats(self.ops, ws, ms)
        counts, sums = counts.tolist(), sums.tolist()
        off, per_prod = 0, {}
        for i, w in zip(prod, ws):
            r = w.shape[0]
            per_prod[i] = (counts[off : off + r], sums[off : off + r])
            off += r
        out = []
        kind = self.config.channel_score
        for g in range(len(ch.channels)):
            total = None
            for i, fan in zip(self._g_prod[g], self._g_fan_in[g]):
                c, s = per_prod[i]
                sc = group_scores(kind, c, s, fan)
                total = sc if total is None else [a + b for a, b in zip(total, sc)]
            present = ch.present[g].tolist()
            alive = ch.alive[g].tolist()  # Python bools: no per-channel tensor indexing
            out.append([(total[j], o) for j, o in enumerate(present) if alive[o]])
        return out

    def _channel_event(self, t: int, scores):
        cfg = self.config
        ch = self._ch
        assert ch is not None
        target = target_live(t, cfg.channel_end_steps, cfg.channel_sparsity, ch.total)
        live = ch.live_counts()
        need = sum(live) - target
        sc = self._channel_scores() if need > 0 else None
        if sc is not None and not all(math.isfinite(x) for g in sc for x, _ in g):
            bad = [self.groups[g].name for g, row in enumerate(sc) if not all(math.isfinite(x) for x, _ in row)]
            raise FloatingPointError(
                f"ChaseOptimizer: non-finite channel scores at step {t} in groups {', '.join(bad)} "
                "(non-finite weights); no channel was removed and the event did not count"
            )
        ch.events += 1
        if t >= cfg.channel_end_steps:
            ch.done = True
        if sc is not None:
            removed = select_channels(sc, live, self._floors, ch.channels, need, cfg.round_to)
            if any(removed):
                for g, r in enumerate(removed):
                    ch.remove(g, r)
                self._after_removal()
        if cfg.scope == "layer":
            # SPEC §3.4: after every channel event, whether or not it removed anything
            self._k = erk_counts(self._live_shapes(), self.budget)
        k = cfg.slim_every
        if k and ch.events % k == 0:
            scores = self._slim(scores)
        return scores

    def _after_removal(self) -> None:
        self._rebuild_live()
        for i, p in enumerate(self._params):
            r, c = self._live_rows[i], self._live_cols[i]
            if r is None and c is None:
                continue
            m = self._mask_dict[self._names[i]]
            # write only the dead slices (reading the whole mask cost ~20 ms on ResNet-50)
            for dim, live in ((0, r), (1, c)):
                if live is not None:
                    dead = torch.nonzero(~live).flatten()  # live is on the CPU: no device sync
                    if dead.numel():
                        m.index_fill_(dim, dead.to(m.device), False)
        self._masked_apply()

    # ------------------------------------------------------------------ slimming
    def slim_(self) -> "ChaseOptimizer":
        """Physically remove every removed channel (SPEC §5). Returns self."""
        self._align_masks()
        with torch.no_grad():
            self._slim(None)
        return self

    def _slim(self, scores):
        ch = self._ch
        if ch is None:
            return scores
        keep = ch.pending_keep()
        if all(k is None for k in keep):
            return scores
        idx = self._gather_index(keep)
        self._apply_slim(keep)
        if self._wrapped_in_ddp and not self._rewraps_ddp:  # rewrap_ddp(ddp, self) was never called
            warnings.warn("parameters shrank under DistributedDataParallel: re-wrap the model before the next "
                          "forward, e.g. ddp = chase_ext.rewrap_ddp(ddp, chase)", stacklevel=3)
        if scores is not None:
            out = []
            for s, (ri, ci) in zip(scores, idx):
                if ri is not None:
                    s = s.index_select(0, ri.to(s.device))
                if ci is not None:
                    s = s.index_select(1, ci.to(s.device))
                out.append(s)
            scores = out
        return scores

    def _gather_index(self, keep):
        out = []
        for i in range(len(self._params)):
            ri = ci = None
            g = self._row_group[i]
            if g is not None and keep[g] is not None:
                ri = keep[g]
            gc = self._col_group[i]
            if gc is not None and keep[gc[0]] is not None:
                k, rep = keep[gc[0]], gc[1]
                ci = (k.view(-1, 1) * rep + torch.arange(rep).view(1, -1)).flatten()
            out.append((ri, ci))
        return out

    def _apply_slim(self, keep, with_state: bool = True) -> None:
        from .slim import slim_ as _slim_model

        gather = self.ops.gather_channels_
        opt = self.optimizer if with_state else None
        _slim_model(self.model, self.groups, list(keep), optimizer=opt, masks=self._mask_dict, gather=gather)
        self._ch.commit_slim(keep)
        self._rebuild_live()

    # ------------------------------------------------------------------ checkpoints
    def _chase_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "t": self._t,
            "names": list(self._names),
            "orig_shapes": [list(s) for s in self._orig_shapes],
            "total_sparse": self.total_sparse,
            "budget": self.budget,
            "config": self.config.fingerprint(),
            "masks": [self._mask_dict[n].detach().clone() for n in self._names],
            "k": list(self._k),
            "rng": self._gen.get_state(),
            "channels": None if self._ch is None else self._ch.state_dict(),
            "groups": [g.name for g in self.groups],
            "settings": self._settings(),
        }

    def _settings(self) -> dict:
        """The resolved schedule and channel knobs (beyond ``config.fingerprint()``), compared on load."""
        c = self.config
        return {
            "grow": c.grow, "update_interval": c.update_steps, "t_end": c.t_end_steps,
            "t_explore_end": c.t_explore_end_steps, "soft_bound": c.soft_bound, "soft_bound_end": c.soft_bound_end,
            "swap_fraction": c.swap_fraction, "swap_fraction_end": c.swap_fraction_end,
            "channel_interval": c.channel_interval_steps, "channel_end": c.channel_end_steps,
            "min_channel_ratio": c.min_channel_ratio, "channel_score": c.channel_score, "round_to": c.round_to,
            "slim_during_training": c.slim_every, "coupled_channels": c.coupled_channels,
        }

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus a ``"chase"`` entry (masks, counters, RNG
        state, channel and slim records, settings). Runs the state-dict hooks registered on
        this object, as ``torch.optim.Optimizer.state_dict`` does."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._align_masks()
        sd = dict(self.optimizer.state_dict())
        sd["chase"] = self._chase_state()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def _expected_shapes(self, present: list[torch.Tensor]) -> list[tuple[int, ...]]:
        out = []
        for i, shp in enumerate(self._orig_shapes):
            s = list(shp)
            g = self._row_group[i] if self._ch is not None else None
            if g is not None:
                s[0] = len(present[g])
            gc = self._col_group[i] if self._ch is not None else None
            if gc is not None:
                s[1] = len(present[gc[0]]) * gc[1]
            out.append(tuple(s))
        return out

    def _check_checkpoint(self, state_dict):
        """Every check of ``load_state_dict``, touching nothing. Returns (chase entry,
        wrapped optimizer's state dict, RNG state, channel state, slim records to replay)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("chase"), dict):
            raise ValueError("not a ChaseOptimizer state dict (no 'chase' entry)")
        cs = state_dict["chase"]
        inner = {k: v for k, v in state_dict.items() if k != "chase"}

        def entry(d, key, where="chase"):
            if not isinstance(d, dict) or key not in d:
                raise ValueError(f"checkpoint's {where!r} entry has no {key!r}")
            return d[key]

        if entry(cs, "version") != _STATE_VERSION:
            raise ValueError(f"ChaseOptimizer checkpoint version {cs.get('version')!r}, expected {_STATE_VERSION}")
        if not isinstance(inner.get("state"), dict) or not isinstance(inner.get("param_groups"), list):
            raise ValueError("checkpoint has no wrapped-optimizer 'state' / 'param_groups'")
        names = entry(cs, "names")
        if list(names) != self._names:
            raise ValueError(
                "checkpoint does not match this model: sparse tensors differ "
                f"(checkpoint {len(names)}: {list(names)[:3]}..., model {len(self._names)}: {self._names[:3]}...)"
            )
        if [tuple(s) for s in entry(cs, "orig_shapes")] != self._orig_shapes:
            raise ValueError("checkpoint does not match this model: original sparse tensor shapes differ")
        fp, theirs = self.config.fingerprint(), entry(cs, "config")
        diff = [k for k in fp if not isinstance(theirs, dict) or theirs.get(k) != fp[k]]
        if diff:
            raise ValueError(
                "checkpoint was written with a different config: "
                + ", ".join(f"{k}={theirs.get(k) if isinstance(theirs, dict) else None!r} (now {fp[k]!r})"
                            for k in diff)
            )
        if entry(cs, "total_sparse") != self.total_sparse or entry(cs, "budget") != self.budget:
            raise ValueError(
                f"checkpoint does not match: N/B {cs['total_sparse']}/{cs['budget']} vs {self.total_sparse}/{self.budget}"
            )
        if list(entry(cs, "groups")) != [g.name for g in self.groups]:
            raise ValueError("checkpoint does not match: channel groups differ")
        if "settings" in cs:  # written since the settings were recorded
            mine, theirs = self._settings(), cs["settings"]
            changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            hard = [k for k in changed if k in _DECIDES_CHANNELS]
            if hard:
                raise ValueError("checkpoint was written with different " + ", ".join(
                    f"{k}={changed[k][0]!r} (now {changed[k][1]!r})" for k in hard))
            if changed:
                warnings.warn("resuming with changed settings (the run will differ from the uninterrupted one): "
                              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=3)
        _check_count(entry(cs, "t"), "t")
        _check_count(entry(cs, "k"), "k", len(self._names))
        rng = entry(cs, "rng")
        if not isinstance(rng, torch.Tensor):
            raise ValueError(f"checkpoint's random-generator state must be a tensor, got {type(rng).__name__}")
        # a checkpoint loaded with map_location="cuda" has its generator state on the GPU
        rng = rng.detach().to("cpu", torch.uint8)
        try:
            torch.Generator().set_state(rng)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint's random-generator state is not valid: {e}") from None

        chs, replay = entry(cs, "channels"), []
        if self._ch is None:
            present = None
        else:
            present = self._check_channel_state(chs)
            mine_recs, theirs_recs = self._ch.slim_records, list(entry(chs, "slim_records", "channels"))
            if theirs_recs[: len(mine_recs)] != mine_recs:
                raise ValueError("checkpoint's slim records do not extend this model's (cannot un-slim a model)")
            replay = theirs_recs[len(mine_recs):]
            # replay on paper: the records must fit, one after the other, and end at `present`
            from .slim import _as_keep

            cur = [p.tolist() for p in self._ch.present]
            for j, rec in enumerate(replay):
                where = f"checkpoint's slim record {len(mine_recs) + j}"
                if not isinstance(rec, (list, tuple)) or len(rec) != len(cur):
                    raise ValueError(f"{where} must hold one entry per channel group ({len(cur)})")
                for g, k in enumerate(rec):
                    if k is not None:
                        try:
                            idx = _as_keep(k, len(cur[g]), f"{where}, group {g}").tolist()
                        except (TypeError, RuntimeError) as e:
                            raise ValueError(f"{where}, group {g}: keep is not a list of ints ({e})") from None
                        cur[g] = [cur[g][i] for i in idx]
            if cur != [p.tolist() for p in present]:
                raise ValueError("checkpoint's slim records and its present channels disagree")
        masks = entry(cs, "masks")
        exp = self._expected_shapes(present) if present is not None else list(self._orig_shapes)
        if not isinstance(masks, (list, tuple)) or len(masks) != len(exp):
            raise ValueError(f"checkpoint's 'masks' must be a list of {len(exp)} tensors")
        for n, m, e in zip(self._names, masks, exp):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != e:
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"checkpoint's mask of {n!r} must be a bool tensor of shape {e}, got {got}")
        groups = inner["param_groups"]
        if len(groups) != len(self.optimizer.param_groups) or any(
            not isinstance(a, dict) or len(a.get("params", ())) != len(b["params"])
            for a, b in zip(groups, self.optimizer.param_groups)
        ):
            raise ValueError("checkpoint's optimizer param_groups do not match the wrapped optimizer's")
        return cs, inner, rng, chs, replay

    def _check_channel_state(self, chs) -> list[torch.Tensor]:
        """The checkpoint's channel state fits the groups; returns its present channels."""
        ch = self._ch
        if not isinstance(chs, dict):
            raise ValueError("checkpoint has no channel state, but this run has channel groups")
        for key in ("channels", "alive", "present", "events", "done", "slim_records"):
            if key not in chs:
                raise ValueError(f"checkpoint's channel state has no {key!r}")
        if list(chs["channels"]) != ch.channels:
            raise ValueError("checkpoint does not match: channel counts of the groups differ")
        _check_count(chs["events"], "events")
        if not isinstance(chs["done"], bool):
            raise ValueError(f"checkpoint's channel 'done' must be a bool, got {chs['done']!r:.80}")
        alive, present = chs["alive"], chs["present"]
        G = len(ch.channels)
        if not isinstance(alive, (list, tuple)) or not isinstance(present, (list, tuple)) or len(alive) != G \
                or len(present) != G:
            raise ValueError(f"checkpoint's channel 'alive' and 'present' must hold one tensor per group ({G})")
        out = []
        for g, (C, a, p) in enumerate(zip(ch.channels, alive, present)):
            name = self.groups[g].name
            if not isinstance(a, torch.Tensor) or a.dtype != torch.bool or tuple(a.shape) != (C,):
                raise ValueError(f"checkpoint's alive channels of group {name!r} must be a bool tensor of {C}")
            if not isinstance(p, torch.Tensor) or p.dtype != torch.int64 or p.dim() != 1 or p.numel() == 0:
                raise ValueError(f"checkpoint's present channels of group {name!r} must be a non-empty int64 vector")
            p = p.detach().cpu()
            if int(p.min()) < 0 or int(p.max()) >= C or (p.numel() > 1 and not bool((p[1:] > p[:-1]).all())):
                raise ValueError(f"checkpoint's present channels of group {name!r} must be increasing in [0, {C})")
            gone = torch.ones(C, dtype=torch.bool)
            gone[p] = False
            if bool(a.detach().cpu()[gone].any()):
                raise ValueError(f"checkpoint's group {name!r} has channels alive that were slimmed away")
            out.append(p)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()``, replaying the slims this model has not seen.

        Everything is checked first (``ValueError`` naming the entry, nothing changed):
        model, config, counters, masks, RNG state, channel records (the slim records are
        replayed on paper and must end at the recorded channels), and the wrapped
        optimizer's state, which is loaded before the model is touched (restored if its
        own ``load_state_dict`` fails). Then the model is slimmed to the recorded widths.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        cs, inner, rng, chs, replay = self._check_checkpoint(state_dict)
        saved = dict(self.optimizer.__dict__)
        try:
            self.optimizer.load_state_dict(inner)
        except Exception as e:  # noqa: BLE001 - any failure: put the optimizer back as it was
            self.optimizer.__dict__.clear()
            self.optimizer.__dict__.update(saved)
            raise ValueError(
                f"checkpoint's optimizer state does not load into the wrapped {type(self.optimizer).__name__}: {e!r}"
            ) from e
        if replay and self._wrapped_in_ddp:
            warnings.warn("load_state_dict shrank parameters under DistributedDataParallel: re-wrap the model "
                          "before the next forward, e.g. ddp = chase_ext.rewrap_ddp(ddp, chase)", stacklevel=2)
        with torch.no_grad():
            for rec in replay:  # the loaded optimizer state already has the slim shapes
                self._apply_slim([None if k is None else torch.as_tensor(k, dtype=torch.int64) for k in rec],
                                 with_state=False)
        self._t = int(cs["t"])
        for n, p, m in zip(self._names, self._params, cs["masks"]):
            self._mask_dict[n] = m.detach().clone().to(device=p.device)
        self._k = [int(x) for x in cs["k"]]
        self._gen.set_state(rng)
        if self._ch is not None:
            self._ch.load_state_dict(chs)
        self._rebuild_live()
        with torch.no_grad():
            self._masked_apply()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
