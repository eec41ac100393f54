"""ChaseOptimizer: the schedule that drives masks, channel events and slimming.

``ChaseOptimizer(optimizer, model, *, density, total_steps, ..., backend="native")`` is a
real ``torch.optim.Optimizer`` that shares ``param_groups``, ``state`` and ``defaults``
with the optimizer it wraps, so LR schedulers, ``GradScaler``, ``zero_grad`` and
``state_dict`` work on it as on the wrapped one.

This module holds construction, the step order below and the public API. Each step
stage lives in its own module, mixed into the class: masks, liveness and the masked apply
of weights and state in :mod:`chase_ext.masking`; channel groups, the channel event and
slimming in :mod:`chase_ext.events`; checkpoints in :mod:`chase_ext.checkpoint`. The
rules they apply are plain functions in :mod:`chase_ext.sparsity` (counts, init, the
update counts), :mod:`chase_ext.density`, :mod:`chase_ext.schedules` and
:mod:`chase_ext.channels`; the kernel calls go through :mod:`chase_ext.layout`.

Step order (SPEC §3.0, §4): ``t`` counts the steps that actually ran (``GradScaler`` calls
``step()`` only when the gradients are finite, so a skipped step never reaches us and
does not count; ``grad_scale`` / ``found_inf`` set by hand on a wrapped fused Adam are not
read: that optimizer skips its step, but ChaseOptimizer counts it, so scale through
``GradScaler.step(chase)``). On step ``t``:

1. if ``t`` is an update step (``t % update_interval == 0 and t < t_end``): the sparse
   weights (and, for gradient growth, their gradients) are checked finite with a single
   host sync, raising ``FloatingPointError`` with nothing changed; the gradients are the
   growth scores, read as they are before the wrapped step: handed over uncopied when the
   wrapped optimizer leaves them alone (:mod:`chase_ext.grad_masking`; checked by their
   version counters), else copied;
2. the wrapped optimizer steps;
3. one ``masked_apply_`` zeroes masked weights and every same-shape optimizer-state tensor
   (and the bias entries of removed channels); on an update step without an event only the
   biases, as the mask update of step 6 zeroes the same slots of weights and state (if
   the step ends before it, they are masked then). On a plain step (no update, no event; a
   closure has run by then) whose wrapped optimizer keeps a zero slot at zero, it zeroes the masked
   *gradients* before step 2 instead: masked weights and state are 0 already and stay 0,
   the active slots step as they would anyway, and fewer bytes move; for ``torch.optim.SGD``
   and ``Adam`` / ``AdamW(fused=True)`` on the CPU the masking and the sparse weights'
   step are then one op (:mod:`chase_ext.fused_step`: bit for bit the same, checked on the
   machine first);
4. on an update step, the weights are checked again (the wrapped step can overflow, and
   random growth does not check gradients): non-finite ones raise ``FloatingPointError``
   with the step taken but no event or update run (masks, channels and the generator
   unchanged); a second host sync, on update steps only;
5. a channel event, if one falls on ``t`` (and slimming, if due); non-finite channel
   scores raise ``FloatingPointError`` before anything is removed;
6. the parameter update: one ``mask_update_`` call for the whole model.

Non-update, non-event steps do no host sync: they only build the ``masked_apply_`` call.
The active count the update needs is counted once and then carried on the host from each
update's prune/grow counts (recounted after a channel event, slim, load or a read of
``masks``), so an update step without an event syncs for its finiteness checks only.

Choices where SPEC is vague:

* **Closures**: ``step(closure)`` runs the closure first (under ``torch.enable_grad``), so
  the finiteness check and the gradient growth scores see this step's gradients, as with a
  closure-free step (Lightning's automatic optimization puts forward and backward in the
  closure). The wrapped optimizer gets a closure that returns that loss on its first call
  and evaluates the closure again on later calls (LBFGS-style optimizers). A plain step with
  a closure masks the gradients as one without (the listed optimizers call the closure
  once); if the wrapped step evaluates it again, weights and state are masked after it.
* **Gradients are masked in place on plain steps** of the optimizers listed in
  :mod:`chase_ext.grad_masking` (``.grad`` reads 0 at masked slots after such a step);
  otherwise, and on update and event steps, masked slots of weights and states are zeroed
  after the step (an elementwise optimizer's active slots are unaffected either way).
* **DDP / DataParallel / torch.compile** models are unwrapped (``.module``, ``._orig_mod``;
  :mod:`chase_ext.wrappers`) so parameter names have no ``module.`` prefix; after a slim the
  graphs ``torch.compile`` built for the old shapes are dropped. DTensor parameters (FSDP2)
  are refused at construction. Decisions depend only on weights, DDP-averaged gradients and the
  seeded CPU generator, so every rank takes the same ones without communication.
  Slimming changes parameter shapes, which a built DDP wrapper cannot follow: re-wrap with
  ``ddp = chase_ext.rewrap_ddp(ddp, chase)`` after ``chase.step()`` (a no-op on steps that
  did not slim); the step after a slim warns when no ``rewrap_ddp`` came in between (built
  on a DDP wrapper, or with several processes running).
* **Explicit groups**: ``channel_groups`` is any spec accepted by
  ``chase_ext.graph.explicit_groups`` (``ChannelGroup`` objects or dicts); it wins over
  tracing when both it and ``example_inputs`` are given.
* Every producer and consumer weight of a group must be a sparse tensor (else
  ``ValueError`` at construction); a depthwise follower that is not sparse (excluded) is
  left alone.
* ``slim_during_training=k`` slims after the k-th, 2k-th, ... event (events counted from 1,
  including events that removed nothing); call ``slim_()`` at the end for the rest.
* **Checkpoints**: ``state_dict()`` / ``load_state_dict`` as documented in
  :mod:`chase_ext.checkpoint` (validated first, slims replayed, nothing changed on refusal).
* ``FloatingPointError`` (a subclass of ``ArithmeticError``) is raised for non-finite
  weights or gradients at an update step.
* **CUDA graphs**: a plain step may be captured (``torch.cuda.graph``) and replayed; a
  capture does not count as a step, each replay is counted with ``replayed()``, and
  update and event steps run eagerly (:mod:`chase_ext.capture`).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from . import fused_step as _fused_step
from . import layout as _layout
from . import sparsity as _sp
from .capture import CaptureMixin, is_capturing
from .channels import ChannelState
from .checkpoint import CheckpointMixin
from .config import ChaseConfig
from .events import ChannelEventsMixin
from .grad_masking import has_step_hooks, keeps_zero_slots, leaves_gradients_alone
from .groups import ChannelGroup
from .masking import MaskingMixin, MaskView
from .schedules import is_channel_event, is_update_step
from .wrappers import check_not_sharded, is_ddp, unwrap_model

__all__ = ["ChaseOptimizer"]


def _load_backend(backend: str):
    if backend == "reference":
        from . import reference

        return reference
    if backend == "native":
        try:
            from . import _ops
        except Exception as e:  # no silent fallback: the loader's cause and fix, and the reference path
            raise ImportError(
                f"ChaseOptimizer(backend='native'): chase_ext native ops could not be loaded: {e} "
                "(or pass backend='reference')"
            ) from e
        return _ops
    raise ValueError(f"backend must be 'native' or 'reference', got {backend!r}")


class _RanFirst:
    """Runs ``closure`` now; called, gives its loss back once, then runs it again and
    counts those runs (``reruns``): a rerun computes new gradients, unmasked."""

    def __init__(self, closure: Callable):
        self.closure = closure
        self.reruns = 0
        with torch.enable_grad():
            self.first = [closure()]

    def __call__(self):
        if self.first:
            return self.first.pop()
        self.reruns += 1
        with torch.enable_grad():
            return self.closure()


class ChaseOptimizer(CheckpointMixin, ChannelEventsMixin, MaskingMixin, CaptureMixin, torch.optim.Optimizer):
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
      ``coupled_channels``, ``channel_groups``, ``dense_first_layer``, ``seed``; beyond
      SPEC ``gated_channels``, ``grouped_channels``, ``concat_channels``, ``channel_allocation``, ``latency_table``,
      ``latency_batch``;
      see ``chase_ext.config``). Keywords given with ``config`` override its fields.
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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
        self.model = unwrap_model(model)
        check_not_sharded(self.model)
        self._wrapped_in_ddp = is_ddp(model)
        self._unwrapped_slim: int | None = None  # step of a slim under DDP not yet followed by rewrap_ddp
        self._warned_unwrapped = False  # said once for a bare model in a run of several processes

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
        self._check_dtypes()
        self._check_devices()
        hint = _fused_step.slow_default_adam(optimizer, self._params)
        if hint:
            warnings.warn(hint, stacklevel=2)
        self._unmasked_states: set[tuple[int, Any]] = set()  # (id(param), state key) warned about
        self._fused_steps = 0  # plain steps taken by a fused op (fused_step.py)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._orig_shapes = [tuple(p.shape) for p in self._params]
        self.total_sparse = int(sum(p.numel() for p in self._params))
        self.budget = int(round(cfg.density * self.total_sparse))
        self._t = 0
        self._gen = torch.Generator()
        self._gen.manual_seed(cfg.seed)

        ending = cfg.final_soft_bound()
        if ending is not None and round(ending[1] * self.total_sparse) > 0:
            warnings.warn(
                f"ChaseOptimizer: the last mask update (step {ending[0]}) falls in phase A (before t_explore_end="
                f"{cfg.t_explore_end_steps} steps), so the run ends with {round(ending[1] * self.total_sparse)} "
                f"weights active above the budget of {self.budget} (soft bound {ending[1]:.3g}); set "
                "t_explore_end <= t_end to end at the budget", stacklevel=2)
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
            unused = [k for k in ("exclude_channels", "coupled_channels", "gated_channels", "grouped_channels",
                                "concat_channels", "channel_groups", "round_to")
                      if getattr(cfg, k) not in ((), False, None)]
            if unused:
                warnings.warn(f"channel_sparsity=0 (no channel part): {', '.join(unused)} ignored", stacklevel=2)
        self._rebuild_live()
        with torch.no_grad():
            self._masked_apply()
        self._masks_out = False  # ``masks`` handed out: their version counters are watched too
        self._note_versions()

    # ------------------------------------------------------------------ step (SPEC §3.0, §4)
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One optimizer step with masking, and on schedule a channel event and a mask
        update (module docstring, "Step order"). Returns the closure's loss, if any."""
        if closure is not None:
            closure = _RanFirst(closure)
        cfg = self.config
        self._warn_if_not_rewrapped()
        self._align_masks()
        t = self._t + 1
        upd = is_update_step(t, cfg.update_steps, cfg.t_end_steps)
        ev = (
            self._ch is not None
            and not self._ch.done
            and is_channel_event(t, cfg.channel_interval_steps, cfg.update_steps)
        )
        capturing = is_capturing()
        if capturing:  # CUDA graph capture: plain steps only, counted at replay (capture.py)
            self._check_capture(t, upd, ev, closure)
        scores, watched = None, []
        if upd:  # 1. finite weights (and gradients), growth scores read before the step
            gradient = cfg.grow == "gradient"
            bad = self._nonfinite(grads=gradient)
            if bad:
                raise FloatingPointError(
                    f"ChaseOptimizer: non-finite values at update step {t} in {', '.join(bad)}; "
                    "nothing was changed (step not taken)"
                )
            if gradient:
                # a closure or a slim in this step's event would write the gradients
                scores, watched = self._growth_scores(closure is None and not ev)
        # 3. (before 2.) a plain step masks the gradients when that keeps masked weights and
        # state at 0 (grad_masking.py, masking.py); else weights and state after the step.
        # For torch.optim.SGD and Adam / AdamW(fused=True) on the CPU the masking and the
        # sparse weights' step are one op (fused_step.py; the biases' gradients are masked
        # first, as on the unfused path).
        # A closure ran above, so its gradients are this step's; the listed optimizers call
        # it once (its first loss comes back, no new gradients); should one run it again,
        # the step masks weights and state after it instead (below).
        # Weights or masks written since the last step (a loaded state dict, an edited mask)
        # may hold non-zeros at masked slots: this step masks weights and state after it.
        plain = not upd and not ev and not self._written_since()
        with torch.no_grad():
            zero_safe = plain and keeps_zero_slots(self.optimizer, self._params[0].dtype)
            fused = _fused_step.plan(self) if zero_safe and not capturing else None
            if fused is not None and not self._mask_gradients(sparse=False):
                fused = None
            premasked = fused is not None or (zero_safe and self._mask_gradients())
            if fused is not None:
                loss = _fused_step.step(self, fused, closure)  # 2.
        if fused is None:
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)  # 2.
        if closure is not None and closure.reruns:
            premasked = False
        if not capturing:
            self._t = t
        # On an update step without an event the mask update zeroes every masked slot of the
        # weights and their state itself (slot 0 -> anything is zeroed), so only removed
        # channels' biases are masked now; whatever ends the step early masks the rest.
        deferred = upd and not ev and not premasked
        with torch.no_grad():
            try:
                if not premasked:
                    self._masked_apply(sparse=not deferred)  # 3. (masking.py)
                if upd:  # 4.
                    changed = [self._names[i] for i, g, v in watched if g._version != v]
                    if changed:
                        raise RuntimeError(
                            f"ChaseOptimizer: the wrapped {type(self.optimizer).__name__} changed the gradients "
                            f"of {', '.join(changed[:3])} in place during step {t}, which chase_ext.grad_masking "
                            "lists as leaving them alone; the step was taken, no mask update ran. Please report "
                            "this with your torch version and optimizer settings"
                        )
                    # the wrapped step itself can overflow (or, with random growth, apply a
                    # non-finite gradient, which SPEC §3.0 does not check): refuse the update.
                    # Only active slots count: a masked slot the step overflowed is zeroed.
                    bad = self._nonfinite(grads=False)
                    if bad and deferred:
                        self._masked_apply()
                        deferred = False
                        bad = self._nonfinite(grads=False)
                    if bad:
                        raise FloatingPointError(
                            f"ChaseOptimizer: the wrapped optimizer's step {t} made {', '.join(bad)} "
                            "non-finite; that step was taken, but no channel event or mask update ran "
                            "(masks, channels and the random generator are unchanged)"
                        )
                if ev:  # 5. (events.py)
                    scores = self._channel_event(t, scores)
                if upd:  # 6.
                    self._update(t, scores)
                    deferred = False
            finally:
                if deferred:
                    self._masked_apply()
        self._note_versions()
        return loss

    def _growth_scores(self, may_share: bool) -> tuple[list[torch.Tensor], list]:
        """The gradients as growth scores (the op ranks by |score|), read before the wrapped
        step: the tensors themselves when ``may_share`` (the caller found nothing of its own
        that writes them before the mask update), the wrapped optimizer leaves them alone
        and no step hook runs, else copies. Returns (scores, [(index, gradient, version) of
        the shared ones])."""
        inner = self.optimizer
        as_they_are = may_share and leaves_gradients_alone(inner) and not has_step_hooks(inner)
        scores, watched = [], []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                scores.append(torch.zeros_like(p))
            elif as_they_are:
                scores.append(g.detach())
                watched.append((i, g, g._version))
            else:
                scores.append(g.detach().clone())
        return scores, watched

    def _update(self, t: int, scores: list[torch.Tensor] | None) -> None:
        """The parameter update (SPEC §3): prune/grow counts, then one ``mask_update_``."""
        cfg = self.config
        if cfg.scope == "global":
            prune, grow, _ = _sp.global_counts(
                t,
                self._nnz_total(),
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
                t, self._nnz(), self._k, self._live_numels(),
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
        self._carry_counts(pc, gc, per_tensor=cfg.scope != "global")

    # ------------------------------------------------------------------ public API
    @property
    def masks(self) -> MaskView:
        """Parameter name -> bool mask (True = active), current physical shapes, on each
        parameter's device and in its memory layout. The masks may be written through this,
        in place or by replacing an entry with a bool tensor of the parameter's shape (the
        next step masks the weights by them, and the next update counts the active weights
        again); entries cannot be added or removed (:class:`chase_ext.masking.MaskView`)."""
        self._align_masks()
        self._forget_counts()
        if not self._masks_out:  # from now on the masks' counters count too
            self._masks_out = True
            if self._versions is not None:
                masks = [self._mask_dict[n] for n in self._names]
                self._watched = self._watched + masks
                self._versions = self._versions + [m._version for m in masks]
        return MaskView(self)

    @property
    def t(self) -> int:
        """Optimizer steps actually taken."""
        return self._t

    @property
    def slim_count(self) -> int:
        """How many times channels were physically removed (``slim_()`` or during training)."""
        return 0 if self._ch is None else len(self._ch.slim_records)

    def active_count(self) -> int:
        """Active (unmasked) weights over all sparse tensors now (one host sync, unless
        carried from the last update)."""
        self._align_masks()
        return self._nnz_total()

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

    def slim_(self) -> "ChaseOptimizer":
        """Physically remove every removed channel (SPEC §5). Returns self."""
        self._align_masks()
        with torch.no_grad():
            self._slim(None)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Adds to the wrapped optimizer; new parameters are trained dense (they are not sparse tensors)."""
        self.optimizer.add_param_group(param_group)

    # shared with the wrapped optimizer

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
