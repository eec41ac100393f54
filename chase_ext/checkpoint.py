"""Checkpoints of :class:`chase_ext.ChaseOptimizer`: build, validate, replay (SPEC §8).

:class:`CheckpointMixin` provides ``state_dict`` and ``load_state_dict``:

* ``state_dict()`` is the wrapped optimizer's state dict plus a ``"chase"`` entry (masks,
  ``t``, RNG state, per-tensor counts, channel records and slim records, the settings).
  To resume a slimmed run in a fresh full-width model, build model + optimizer +
  ChaseOptimizer, load the ChaseOptimizer state dict, then the model state dict.
* Masks are stored (and checkpointed) as ``torch.bool`` tensors shaped like their
  parameters, on the parameter's device; not bit-packed.
* ``load_state_dict`` validates everything first, raising ``ValueError`` naming the entry
  with nothing changed: it checks the type and structure of every entry it reads (lists of
  str / ints / shapes, dicts, bool / int64 tensors with data of the right shape) before
  using it, compares the mask-deciding config fields (density, total_steps,
  channel_sparsity, init, scope, seed), the sparse tensor names and original shapes, N, B,
  the group names and widths, and the wrapped optimizer's group sizes; it checks every
  counter, mask and channel record, replays the slim records on paper (they must end at
  the recorded channels), refuses a changed ``round_to`` / ``min_channel_ratio`` and warns
  about other changed settings. The wrapped optimizer's state is loaded before the model
  is slimmed (and put back if that load fails), so a refused load changes nothing. Then
  it replays the slims the current model has not seen and restores the counters, masks,
  RNG and channel state.

It is a mixin: it works on the attributes ``ChaseOptimizer.__init__`` sets and replays
slims through :class:`chase_ext.events.ChannelEventsMixin`. ``tests/test_old_checkpoint.py``
keeps a checkpoint written by an earlier version loading.
"""
from __future__ import annotations

import numbers
import warnings

import torch

__all__ = ["CheckpointMixin"]

_STATE_VERSION = 1
# settings whose change would make the recorded channel state inconsistent: refused on load
_DECIDES_CHANNELS = ("round_to", "min_channel_ratio")
# settings recorded since a later version: a checkpoint without them ran with these values
_SETTINGS_ADDED_LATER = {"channel_allocation": "umm", "gated_channels": False, "grouped_channels": False,
                         "concat_channels": False}


def _what(v) -> str:
    """A short description of a checkpoint value for error messages."""
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r:.60}"


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_shape(s) -> bool:
    return isinstance(s, (list, tuple)) and all(_is_int(d) and d >= 0 for d in s)


def _list_of(v, label: str, what: str, ok, n: int | None = None) -> list:
    """``v`` as a list, when it is a list or tuple (of ``n`` items) whose every item passes
    ``ok``; else ``ValueError`` naming the entry (``label``, e.g. ``"'names'"``)."""
    need = f"a list of {what}" if n is None else f"a list of {n} {what}"
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n):
        raise ValueError(f"checkpoint's {label} must be {need}, got {_what(v)}")
    for i, x in enumerate(v):
        if not ok(x):
            raise ValueError(f"checkpoint's {label} must be {need}, got {_what(x)} at index {i}")
    return list(v)


def _is_tensor(v, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> bool:
    """A dense tensor with data (not sparse, not on the meta device) of this dtype (and shape)."""
    return (isinstance(v, torch.Tensor) and v.dtype == dtype and v.layout == torch.strided and not v.is_meta
            and (shape is None or tuple(v.shape) == shape))


def _same(a, b) -> bool:
    """``a == b`` for plain checkpoint values; False where that comparison is not a plain
    truth value (tensors, arrays) or fails."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an odd value is just not equal
        return False


def _check_count(v, name: str, n: int | None = None) -> None:
    """A checkpoint entry that is an int >= 0 (or, with n, a list of n of them)."""
    if n is not None and (not isinstance(v, (list, tuple)) or len(v) != n):
        raise ValueError(f"checkpoint's {name!r} must be a list of {n} counts, got {v!r:.80}")
    for x in (v if n is not None else [v]):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise ValueError(f"checkpoint's {name!r} must hold ints >= 0, got {x!r:.80}")


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of a ChaseOptimizer (module docstring)."""

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
            "gated_channels": c.gated_channels,
            "grouped_channels": c.grouped_channels,
            "concat_channels": c.concat_channels,
            "channel_allocation": c.channel_allocation,
        }

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
        with torch.no_grad():
            for rec in replay:  # the loaded optimizer state already has the slim shapes
                self._apply_slim([None if k is None else torch.as_tensor(k, dtype=torch.int64) for k in rec],
                                 with_state=False)
        self._t = int(cs["t"])
        if replay:
            self._note_slim_under_ddp(self._t)
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

    def _check_checkpoint(self, state_dict):
        """Every check of ``load_state_dict``, touching nothing. Returns (chase entry,
        wrapped optimizer's state dict, RNG state, channel state, slim records to replay).

        The type and structure of every entry read is checked before it is used, so a
        damaged checkpoint fails with a ``ValueError`` naming the entry."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("chase"), dict):
            raise ValueError("not a ChaseOptimizer state dict (no 'chase' entry)")
        cs = state_dict["chase"]
        inner = {k: v for k, v in state_dict.items() if k != "chase"}

        def entry(d, key, where="chase"):
            if not isinstance(d, dict) or key not in d:
                raise ValueError(f"checkpoint's {where!r} entry has no {key!r}")
            return d[key]

        version = entry(cs, "version")
        if not _is_int(version) or version != _STATE_VERSION:
            raise ValueError(f"ChaseOptimizer checkpoint version {version!r:.80}, expected {_STATE_VERSION}")
        if not isinstance(inner.get("state"), dict) or not isinstance(inner.get("param_groups"), list):
            raise ValueError("checkpoint has no wrapped-optimizer 'state' / 'param_groups'")
        names = _list_of(entry(cs, "names"), "'names'", "str", lambda x: isinstance(x, str))
        if names != self._names:
            raise ValueError(
                "checkpoint does not match this model: sparse tensors differ "
                f"(checkpoint {len(names)}: {names[:3]}..., model {len(self._names)}: {self._names[:3]}...)"
            )
        shapes = _list_of(entry(cs, "orig_shapes"), "'orig_shapes'", "shapes (lists of ints >= 0)", _is_shape)
        if [tuple(s) for s in shapes] != self._orig_shapes:
            raise ValueError("checkpoint does not match this model: original sparse tensor shapes differ")
        fp, theirs = self.config.fingerprint(), entry(cs, "config")
        if not isinstance(theirs, dict):
            raise ValueError(f"checkpoint's 'config' must be a dict, got {_what(theirs)}")
        diff = [k for k in fp if not _same(theirs.get(k), fp[k])]
        if diff:
            raise ValueError(
                "checkpoint was written with a different config: "
                + ", ".join(f"{k}={theirs.get(k)!r:.80} (now {fp[k]!r})" for k in diff)
            )
        _check_count(entry(cs, "total_sparse"), "total_sparse")
        _check_count(entry(cs, "budget"), "budget")
        if cs["total_sparse"] != self.total_sparse or cs["budget"] != self.budget:
            raise ValueError(
                f"checkpoint does not match: N/B {cs['total_sparse']}/{cs['budget']} vs {self.total_sparse}/{self.budget}"
            )
        groups = _list_of(entry(cs, "groups"), "'groups'", "str", lambda x: isinstance(x, str))
        if groups != [g.name for g in self.groups]:
            raise ValueError("checkpoint does not match: channel groups differ")
        changed = {}
        if "settings" in cs:  # written since the settings were recorded
            mine, theirs = self._settings(), cs["settings"]
            if not isinstance(theirs, dict):
                raise ValueError(f"checkpoint's 'settings' must be a dict, got {_what(theirs)}")
            theirs = {**_SETTINGS_ADDED_LATER, **theirs}  # older checkpoints ran with these defaults
            changed = {k: (theirs.get(k), v) for k, v in mine.items() if not _same(theirs.get(k), v)}
            hard = [k for k in changed if k in _DECIDES_CHANNELS]
            if hard:
                raise ValueError("checkpoint was written with different " + ", ".join(
                    f"{k}={changed[k][0]!r:.80} (now {changed[k][1]!r})" for k in hard))
        _check_count(entry(cs, "t"), "t")
        _check_count(entry(cs, "k"), "k", len(self._names))
        rng = entry(cs, "rng")
        if not isinstance(rng, torch.Tensor):
            raise ValueError(f"checkpoint's random-generator state must be a tensor, got {type(rng).__name__}")
        try:
            # a checkpoint loaded with map_location="cuda" has its generator state on the GPU
            rng = rng.detach().to("cpu", torch.uint8)
            torch.Generator().set_state(rng)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint's random-generator state is not valid: {e}") from None

        chs, replay = entry(cs, "channels"), []
        if self._ch is None:
            present = None
        else:
            present, chs = self._check_channel_state(chs)
            mine_recs, theirs_recs = self._ch.slim_records, chs["slim_records"]
            if theirs_recs[: len(mine_recs)] != mine_recs:
                raise ValueError("checkpoint's slim records do not extend this model's (cannot un-slim a model)")
            replay = theirs_recs[len(mine_recs):]
            # replay on paper: the records must fit, one after the other, and end at `present`
            from .slim import _as_keep

            cur = [p.tolist() for p in self._ch.present]
            for j, rec in enumerate(replay):
                where = f"checkpoint's slim record {len(mine_recs) + j}"
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
            raise ValueError(f"checkpoint's 'masks' must be a list of {len(exp)} tensors, got {_what(masks)}")
        for n, m, e in zip(self._names, masks, exp):
            if not _is_tensor(m, torch.bool, e):
                raise ValueError(f"checkpoint's mask of {n!r} must be a bool tensor of shape {e}, got {_what(m)}")
        groups = inner["param_groups"]
        if len(groups) != len(self.optimizer.param_groups) or any(
            not isinstance(a, dict) or not isinstance(a.get("params"), (list, tuple))
            or len(a["params"]) != len(b["params"])
            for a, b in zip(groups, self.optimizer.param_groups)
        ):
            raise ValueError("checkpoint's optimizer param_groups do not match the wrapped optimizer's")
        if changed:  # all checked: only now warn about the settings a resume changes
            warnings.warn("resuming with changed settings (the run will differ from the uninterrupted one): "
                          + ", ".join(f"{k} {a!r:.80} -> {b!r}" for k, (a, b) in changed.items()), stacklevel=3)
        return cs, inner, rng, chs, replay

    def _check_channel_state(self, chs) -> tuple[list[torch.Tensor], dict]:
        """The checkpoint's channel state fits the groups; returns its present channels and
        a copy of the state with its slim records as lists (``None`` or a list of ints per
        group)."""
        ch = self._ch
        if not isinstance(chs, dict):
            raise ValueError("checkpoint has no channel state, but this run has channel groups")
        for key in ("channels", "alive", "present", "events", "done", "slim_records"):
            if key not in chs:
                raise ValueError(f"checkpoint's channel state has no {key!r}")
        G = len(ch.channels)
        channels = _list_of(chs["channels"], "channel 'channels'", "ints >= 0", lambda x: _is_int(x) and x >= 0)
        if channels != ch.channels:
            raise ValueError("checkpoint does not match: channel counts of the groups differ")
        _check_count(chs["events"], "events")
        if not isinstance(chs["done"], bool):
            raise ValueError(f"checkpoint's channel 'done' must be a bool, got {chs['done']!r:.80}")
        alive, present = chs["alive"], chs["present"]
        if not isinstance(alive, (list, tuple)) or not isinstance(present, (list, tuple)) or len(alive) != G \
                or len(present) != G:
            raise ValueError(f"checkpoint's channel 'alive' and 'present' must hold one tensor per group ({G})")
        out = []
        for g, (C, a, p) in enumerate(zip(ch.channels, alive, present)):
            name = self.groups[g].name
            if not _is_tensor(a, torch.bool, (C,)):
                raise ValueError(f"checkpoint's alive channels of group {name!r} must be a bool tensor of {C}, "
                                 f"got {_what(a)}")
            if not _is_tensor(p, torch.int64) or p.dim() != 1 or p.numel() == 0:
                raise ValueError(f"checkpoint's present channels of group {name!r} must be a non-empty int64 vector, "
                                 f"got {_what(p)}")
            p = p.detach().cpu()
            if int(p.min()) < 0 or int(p.max()) >= C or (p.numel() > 1 and not bool((p[1:] > p[:-1]).all())):
                raise ValueError(f"checkpoint's present channels of group {name!r} must be increasing in [0, {C})")
            gone = torch.ones(C, dtype=torch.bool)
            gone[p] = False
            if bool(a.detach().cpu()[gone].any()):
                raise ValueError(f"checkpoint's group {name!r} has channels alive that were slimmed away")
            out.append(p)
        recs = []
        for i, rec in enumerate(_list_of(chs["slim_records"], "channel 'slim_records'", "slim records",
                                         lambda r: True)):
            where = f"checkpoint's slim record {i}"
            if not isinstance(rec, (list, tuple)) or len(rec) != G:
                raise ValueError(f"{where} must hold one entry per channel group ({G}), got {_what(rec)}")
            for g, k in enumerate(rec):
                if k is not None and not (isinstance(k, (list, tuple)) and all(_is_int(x) for x in k)):
                    raise ValueError(f"{where}, group {g}: keep must be None or a list of ints, got {_what(k)}")
            recs.append([None if k is None else [int(x) for x in k] for k in rec])
        return out, dict(chs, channels=channels, slim_records=recs)

    def _expected_shapes(self, present: list[torch.Tensor]) -> list[tuple[int, ...]]:
        out = []
        for i, shp in enumerate(self._orig_shapes):
            s = list(shp)
            g = self._row_group[i] if self._ch is not None else None
            if g is not None:
                s[0] = len(present[g])
            gc = self._col_group[i] if self._ch is not None else None
            if gc is not None:
                s[1] = len(present[gc[0]]) * gc[1] // gc[2]
            seg = self._segs[i] if self._ch is not None else None
            if seg is not None:  # inside a concatenation: less what each group read there lost
                dim, m = seg
                s[dim] -= sum((self._ch.channels[g] - len(present[g])) * r for g, r, _ in self._reader_segs[m])
            out.append(tuple(s))
        return out
