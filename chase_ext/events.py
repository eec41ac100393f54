"""The channel part of :class:`chase_ext.ChaseOptimizer`: groups, events, slimming.

:class:`ChannelEventsMixin` holds

* the setup: which sparse tensor is a producer (rows) or consumer (columns) of which
  channel group, their fan-ins and biases, the per-group floors (``_setup_channels``);
* the channel event of SPEC §4 (step 5 of SPEC §3.0): scores of the alive channels
  (``_channel_scores``), the selection of what to remove and the removal from the masks
  (``_channel_event``, ``_after_removal``), the layer-scope re-split, and the slim every
  ``slim_during_training`` events;
* slimming (SPEC §5): physically removing the removed channels from the model, its
  masks and the optimizer state, and narrowing growth scores to match (``_slim``,
  ``_gather_index``, ``_apply_slim``).

The rules themselves (targets, floors, scores, selection, channel records) live in
:mod:`chase_ext.channels`; the model surgery in :mod:`chase_ext.slim`. It is a mixin: it
works on the attributes ``ChaseOptimizer.__init__`` sets (``model``, ``config``,
``_params``, ``_names``, ``_index``, ``_orig_shapes``, ``_mask_dict``, ``ops``,
``optimizer``, ``_k``, ``budget``) and on :class:`chase_ext.masking.MaskingMixin`, and
sets ``groups``, ``_ch`` (the :class:`chase_ext.channels.ChannelState`), ``_floors`` and
the index tables ``_row_group``, ``_col_group``, ``_g_prod``, ``_g_fan_in``, ``_g_bias``, and
``_reader_segs`` / ``_segs`` for the layers that read groups inside a concatenation.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from . import layout as _layout
from . import sparsity as _sp
from .channels import ChannelState, channel_floor, group_scores, group_step, select_channels, target_live
from .density import erk_counts
from .groups import at_widths
from .wrappers import forget_compiled

__all__ = ["ChannelEventsMixin"]


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ChannelEventsMixin:
    """Channel groups, channel events and slimming (module docstring)."""

    def _setup_channels(self) -> None:
        cfg = self.config
        spec = cfg.channel_groups
        if spec is not None:
            from .graph import check_against_trace, explicit_groups

            groups = explicit_groups(self.model, spec)
            if cfg.example_inputs is not None:
                check_against_trace(self.model, groups, cfg.example_inputs)
        else:
            from .graph import find_channel_groups

            groups = find_channel_groups(
                self.model,
                cfg.example_inputs,
                exclude=cfg.exclude,
                exclude_channels=cfg.exclude_channels,
                coupled=cfg.coupled_channels,
                gated=cfg.gated_channels,
                grouped=cfg.grouped_channels,
                concat=cfg.concat_channels,
            )
        if not groups:
            warnings.warn(f"channel_sparsity={cfg.channel_sparsity} but the model has no prunable channel group "
                          "(see exclude_channels, or give channel_groups): only the unstructured part runs",
                          stacklevel=3)
        modules = dict(self.model.named_modules())
        self.groups = groups
        n = len(self._params)
        self._row_group: list[int | None] = [None] * n
        self._col_group: list[tuple[int, int, int] | None] = [None] * n  # (group, repeat, conv groups)
        # readers inside a concatenation (``concat_channels``): module -> [(group, repeat, offset at full
        # width)]; parameter -> (dim, module) for the sparse ones among them
        self._reader_segs: dict[str, list[tuple[int, int, int]]] = {}
        self._segs: list[tuple[int, str] | None] = [None] * n
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
                if f in g.offsets:
                    self._reader_segs.setdefault(f, []).append((gi, 1, int(g.offsets[f])))
                    i = self._index.get(f"{f}.weight")
                    if i is not None:  # a depthwise conv after a concatenation
                        self._segs[i] = (0, f)
                    continue
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
                if c.module in g.offsets:
                    off = int(g.offsets[c.module])
                    if off + C * c.repeat > self._orig_shapes[i][1]:
                        raise ValueError(f"channel group {g.name!r}: consumer {c.module!r} reads "
                                         f"{self._orig_shapes[i][1]} inputs, fewer than offset {off} + "
                                         f"channels*repeat = {C}*{c.repeat}")
                    self._reader_segs.setdefault(c.module, []).append((gi, int(c.repeat), off))
                    self._segs[i] = (1, c.module)
                    continue
                if self._orig_shapes[i][1] * c.groups != C * c.repeat:
                    raise ValueError(
                        f"channel group {g.name!r}: consumer {c.module!r} reads {self._orig_shapes[i][1]} inputs"
                        f"{f' per conv group ({c.groups} groups)' if c.groups > 1 else ''}, "
                        f"expected channels*repeat = {C}*{c.repeat}{f' / {c.groups}' if c.groups > 1 else ''}"
                    )
                if self._col_group[i] is not None:
                    raise ValueError(f"{c.module!r} is a consumer of two channel groups")
                self._col_group[i] = (gi, int(c.repeat), int(c.groups))
            self._g_prod.append(prods)
            self._g_fan_in.append(fans)
            self._g_bias.append(biases)
            channels.append(C)
        self._ch = ChannelState(channels)
        self._steps = [group_step(cfg.round_to, g.blocks) for g in groups]  # round_to, and whole conv groups
        self._floors = [
            channel_floor(C, cfg.channel_sparsity, cfg.min_channel_ratio, st) for C, st in zip(channels, self._steps)
        ]
        # a grouped conv reading a group's channels keeps different columns in each conv group,
        # and a layer reading a concatenation reads several groups: no row x column mask of one
        # group describes them, so such groups are slimmed at the event that removes their
        # channels (``_channel_event``)
        self._slim_at_removal = [any(c.groups > 1 for c in g.consumers) or bool(g.offsets) for g in groups]
        for segs in self._reader_segs.values():  # in column order (spans are disjoint: tracing, explicit_groups)
            segs.sort(key=lambda t: t[2])
        self._latency = None
        if cfg.channel_allocation == "latency" and groups:
            from .allocation import resolve_latency_table

            self._latency = resolve_latency_table(cfg.latency_table, self.model, groups, cfg.example_inputs,
                                                  self._floors, batch=cfg.latency_batch, step=cfg.round_to or 8)

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
            if getattr(self, "_latency", None) is not None:  # channel_allocation="latency" (not SPEC)
                from .allocation import allocate, pick_in_groups

                counts = allocate([g.name for g in self.groups], live, self._floors, need, self._latency,
                                  self._steps)
                removed = pick_in_groups(sc, counts, [g.blocks for g in self.groups], ch.channels)
            else:
                removed = select_channels(sc, live, self._floors, ch.channels, need, cfg.round_to,
                                          [g.blocks for g in self.groups])
            if any(removed):
                for g, r in enumerate(removed):
                    ch.remove(g, r)
                now = [g for g, r in enumerate(removed) if r and self._slim_at_removal[g]]
                if now:
                    scores = self._slim(scores, only=now)
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

    def _note_slim_under_ddp(self, t: int) -> None:
        """Parameters shrank at step ``t``: under DistributedDataParallel the wrapper must be
        rebuilt before the next backward; ``rewrap_ddp(ddp, chase)`` clears this, else the
        next step warns. Known DDP (the wrapper was given to ChaseOptimizer): at every such
        slim. Several processes and a bare model (DDP may have been built around it after
        the ChaseOptimizer, as accelerate does; or there is no DDP at all): once a run."""
        if self._wrapped_in_ddp or (not self._warned_unwrapped and _several_processes()):
            self._unwrapped_slim = t

    def _warn_if_not_rewrapped(self) -> None:
        """Said at the step after a slim, not at the slim: the documented loop re-wraps
        right after ``step()``, so only a step that comes without it is a problem."""
        if self._unwrapped_slim is not None:
            self._warned_unwrapped = True
            warnings.warn(
                f"ChaseOptimizer: parameters shrank at step {self._unwrapped_slim} and rewrap_ddp(ddp, chase) was not "
                "called since: if the model runs under DistributedDataParallel, the old wrapper reduced none of this "
                "step's gradients (each rank applies its own, and the ranks drift apart); call "
                "ddp = chase_ext.rewrap_ddp(ddp, chase) after every chase.step()", stacklevel=3)
            self._unwrapped_slim = None

    def _slim(self, scores, only: Sequence[int] | None = None):
        """Slim every group with removed channels still present (``only``: those groups)."""
        ch = self._ch
        if ch is None:
            return scores
        keep = ch.pending_keep()
        if only is not None:
            keep = [k if g in only else None for g, k in enumerate(keep)]
        if all(k is None for k in keep):
            return scores
        from .slim import _gather_blocks

        idx = self._gather_index(keep)
        self._apply_slim(keep)
        self._note_slim_under_ddp(self._t)
        if scores is not None:
            out = []
            for s, (ri, ci, blocks) in zip(scores, idx):
                if ri is not None:
                    s = s.index_select(0, ri.to(s.device))
                if ci is not None:
                    s = s.index_select(1, ci.to(s.device)) if blocks == 1 else _gather_blocks(s, ci, blocks)
                out.append(s)
            scores = out
        return scores

    def _gather_index(self, keep):
        """Per parameter: (rows kept, columns kept, conv groups of a grouped consumer)."""
        from .slim import _expand, _in_span

        out = []
        now = self._groups_now() if self._reader_segs else None
        for i in range(len(self._params)):
            ri = ci = None
            g = self._row_group[i]
            if g is not None and keep[g] is not None:
                ri = keep[g]
            gc = self._col_group[i]
            blocks = 1
            if gc is not None and keep[gc[0]] is not None:
                k, rep, blocks = keep[gc[0]], gc[1], gc[2]
                ci = _expand(k, rep)
            if self._segs[i] is not None:
                dim, m = self._segs[i]
                idx = torch.arange(self._params[i].shape[dim])
                changed = False
                for g, rep, _ in reversed(self._reader_segs[m]):  # the last span first: the offsets hold
                    if keep[g] is not None:
                        n = len(self._ch.present[g]) * rep
                        idx = idx[_in_span(_expand(keep[g], rep), now[g].offsets[m], n, len(idx))]
                        changed = True
                if changed:
                    ri, ci = (idx, ci) if dim == 0 else (ri, idx)
            out.append((ri, ci, blocks))
        return out

    def _groups_now(self):
        """The groups with the offsets of their concatenation readers as the model is now."""
        return at_widths(self.groups, [len(p) for p in self._ch.present])

    def _apply_slim(self, keep, with_state: bool = True) -> None:
        from .slim import slim_ as _slim_model

        gather = self.ops.gather_channels_
        opt = self.optimizer if with_state else None
        _slim_model(self.model, self._groups_now(), list(keep), optimizer=opt, masks=self._mask_dict, gather=gather)
        if isinstance(self.optimizer, torch.optim.LBFGS):  # also when its state came slimmed from a checkpoint
            self.optimizer._numel_cache = None
        self._ch.commit_slim(keep)
        self._rebuild_live()
        forget_compiled(self.model)  # torch.compile's graphs of the old shapes never run again
