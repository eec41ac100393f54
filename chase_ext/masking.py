"""Mask and optimizer-state bookkeeping of :class:`chase_ext.ChaseOptimizer`.

:class:`MaskingMixin` holds what the step pipeline (SPEC §3.0) does to masks and state
around the wrapped optimizer's step:

* alignment: each mask stays on its parameter's device and in its memory layout, and all
  sparse weights on one device and one dtype the backend has kernels for (``_align_masks``,
  ``_check_devices``, ``_check_dtypes``); masks replaced through ``ChaseOptimizer.masks``
  are checked there (``MaskView``, ``_set_mask``);
* writes from outside: the version counters of weights and masks as each step leaves them
  (``_note_versions``); a plain step that finds them moved (``_written_since``: the user
  loaded weights or wrote a mask) masks weights and state after the wrapped step, not
  gradients before it, so what was written is masked too;
* liveness: the live row/column vectors of channel groups and the bias masks of removed
  channels, rebuilt after every channel change (``_rebuild_live``);
* the masked apply: one ``masked_apply_`` zeroes masked weights, the same-shape
  optimizer state and removed channels' biases (``_masked_apply``, ``_states_of``,
  ``_state_list``, ``_mask_list``), or, on a plain step with a wrapped optimizer that
  keeps zero slots at zero (:mod:`chase_ext.grad_masking`), their gradients before the
  wrapped step (``_mask_gradients``; for ``torch.optim.SGD`` and ``Adam`` / ``AdamW(fused=True)``
  on the CPU, masking and the step of the sparse weights in one op, :mod:`chase_ext.fused_step`);
* the finiteness check of weights and gradients on update steps (``_nonfinite``);
* the counts the update reads: active weights (``_nnz``, ``_nnz_total``; counted once
  and then carried on the host from each update's prune/grow counts, recounted after
  anything else that may change a mask), live slots and shapes (``_live_numels``,
  ``_live_shapes``).

It is a mixin: it works on the attributes ``ChaseOptimizer.__init__`` sets (``_names``,
``_params``, ``_mask_dict``, ``optimizer``, ``ops``, ``backend``, ``_ch``) and those of
the channel setup (``_row_group``, ``_col_group``, ``_g_bias``,
:mod:`chase_ext.events`), and sets ``_live_rows``, ``_live_cols``, ``_live_arg``,
``_bias_masks``, ``_any_removed`` and the carried counts ``_nnz_per`` / ``_nnz_sum``.
"""
from __future__ import annotations

import warnings
from collections.abc import MutableMapping

import torch
from torch import nn

from . import layout as _layout
from . import sparsity as _sp

__all__ = ["MaskingMixin", "MaskView"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MaskView(MutableMapping):
    """``ChaseOptimizer.masks``: parameter name -> the live bool mask. Masks may be written
    in place, or an entry replaced by a bool tensor of its parameter's shape (moved to the
    parameter's device and layout); entries are never added or removed. Pickles and copies
    as a plain dict of the masks."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "MaskingMixin") -> None:
        self._owner = owner

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._owner._mask_dict[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._owner._set_mask(name, mask)

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"ChaseOptimizer.masks: a sparse weight always has a mask ({name!r} cannot be removed); "
                        "write False into it, or exclude the weight when building the ChaseOptimizer")

    def __iter__(self):
        return iter(self._owner._mask_dict)

    def __len__(self) -> int:
        return len(self._owner._mask_dict)

    def __repr__(self) -> str:
        return repr(self._owner._mask_dict)

    def __reduce__(self):
        return (dict, (dict(self._owner._mask_dict),))

    def copy(self) -> dict:
        """A plain dict of the masks (the tensors themselves, as ``dict.copy``)."""
        return dict(self._owner._mask_dict)


class MaskingMixin:
    """Masks, liveness and masked state of the sparse tensors (module docstring)."""

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
        if self.backend == "native":
            dt = self._params[0].dtype
            if dt not in _KERNEL_DTYPES or any(p.dtype != dt for p in self._params):
                self._check_dtypes()
        for n, p in zip(self._names, self._params):
            m = self._mask_dict[n]
            if m.device != p.device:
                m = self._mask_dict[n] = m.to(p.device)
                self._versions = None  # new mask tensors: the watched counters are not theirs
            # the cheap test first: a flat layout match (size-1 dims aside) is all that counts
            if not _layout.same_flat_layout(m, p) and not _layout.same_layout(m, p):
                self._mask_dict[n] = _layout.like(m, p)
                self._versions = None
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
        if self.backend != "native" or self._params[0].device.type != "cuda":
            return
        info = self.ops.build_info()
        if not info["has_cuda"]:
            why = info.get("cuda_skipped")
            fix = (f"the build said why: {why}; fix that and reinstall (pip install --no-build-isolation .)"
                   if why and why != "CHASE_EXT_CUDA=0" else
                   "rebuild it with CHASE_EXT_CUDA=1 (pip install --no-build-isolation .)")
            raise RuntimeError(
                f"ChaseOptimizer: the model is on CUDA but chase_ext._C was built without CUDA kernels; "
                f"{fix}, or pass backend='reference'"
            )

    def _check_dtypes(self) -> None:
        """The native kernels take one of float32 / bfloat16 / float16, one dtype for all
        sparse weights: checked at construction, and a model converted after wrapping
        (``model.double()``) is refused at its next step before anything changes, not inside
        the kernel after the wrapped step."""
        if self.backend != "native":
            return
        kinds = {p.dtype for p in self._params}
        odd = [f"{n!r} is {p.dtype}" for n, p in zip(self._names, self._params) if p.dtype not in _KERNEL_DTYPES]
        if odd or len(kinds) > 1:
            raise TypeError(
                "ChaseOptimizer: the sparse weights must share one dtype among float32, bfloat16 and float16 "
                f"(got {', '.join(odd[:4]) if odd else sorted(map(str, kinds))}); convert the whole model "
                "(e.g. model.float()) or exclude those weights"
            )

    def _set_mask(self, name: str, mask: torch.Tensor) -> None:
        """``chase.masks[name] = mask``: checked, then on the parameter's device and layout."""
        i = self._index.get(name) if isinstance(name, str) else None
        if i is None:
            raise KeyError(f"ChaseOptimizer.masks: {name!r} is not a sparse weight (sparse_names() lists them)")
        p = self._params[i]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
            got = (f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"ChaseOptimizer.masks[{name!r}]: expected a torch.bool tensor of shape "
                             f"{tuple(p.shape)} (the parameter's), got {got}")
        # a copy: the entry must not share memory with another mask (or anything the kernels write)
        self._mask_dict[name] = _layout.like(mask.detach().to(p.device, copy=True), p)
        self._forget_counts()
        self._versions = None  # a new tensor's counter may equal the old one's: a write all the same

    def _note_versions(self) -> None:
        """Remember the version counters of the weights, and of the masks once ``masks``
        has handed them out (``_masks_out``), as ChaseOptimizer leaves them (about 0.2 us a
        tensor: the masks are left out until a user can reach them)."""
        self._watched = self._params + ([self._mask_dict[n] for n in self._names] if self._masks_out else [])
        self._versions = [t._version for t in self._watched]

    def _written_since(self) -> bool:
        """Whether a weight or mask was written in place (``model.load_state_dict``, an
        in-place op under ``no_grad``, a mask edited through ``masks``) since
        ``_note_versions``. Writes through ``.data`` bump no counter and go unseen."""
        return self._versions is None or [t._version for t in self._watched] != self._versions

    def _rebuild_live(self) -> None:
        """Live row/col vectors and bias masks from the channel state (after any change).
        Every change of channels, slims and checkpoint loads come through here, so the
        carried active counts are dropped here too (recounted at the next update)."""
        self._forget_counts()
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
            if gc is not None and gc[2] > 1:
                # a grouped conv's groups are slimmed at each removal: all it reads is live
                if not bool(phys[gc[0]].all()):
                    raise RuntimeError(f"chase_ext internal error: {self._names[i]!r} reads removed channels of a "
                                       "grouped conv's group that were not slimmed")
            elif gc is not None:
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

    def _masked_apply(self, sparse: bool = True) -> None:
        """Zero masked weights and their same-shape state, and removed channels' bias entries
        and their state; with ``sparse=False`` the biases only (an update step leaves the
        sparse weights to the mask update, which zeroes the same slots)."""
        tensors = [p.detach() for p in self._params] if sparse else []
        masks = self._mask_list() if sparse else []
        owner = list(range(len(tensors)))
        if sparse:
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

    def _mask_gradients(self, sparse: bool = True) -> bool:
        """Zero, in place, the gradients of masked slots and of removed channels' bias
        entries: a plain step's masking when the wrapped optimizer keeps zero slots at zero
        (:mod:`chase_ext.grad_masking`), as masked weights and state are 0 already. Returns
        False, with nothing changed, when a gradient cannot be masked in place (sparse,
        part of a graph, laid out unlike its mask); the step then masks weights and state
        after the wrapped step instead. ``sparse=False``: the biases' gradients only (the
        fused step masks the sparse weights' own, :mod:`chase_ext.fused_step`)."""
        masks = self._mask_list() if sparse else []
        tensors, owner = [], []
        for i, p in enumerate(self._params if sparse else ()):
            if p.grad is not None:
                tensors.append(p.grad)
                owner.append(i)
        for b, bm in self._bias_masks:
            if b.grad is not None:
                masks.append(bm)
                tensors.append(b.grad)
                owner.append(len(masks) - 1)
        for g, j in zip(tensors, owner):
            m = masks[j]
            if g.is_sparse or g.requires_grad or not g.is_floating_point() or not _layout.maskable_by(g, m):
                return False
        if tensors:  # every mask is dense (laid out like its parameter): the op takes them as they are
            self.ops.masked_apply_(tensors, masks, owner)
        return True

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
        if dev.type == "cuda":
            # one multi-tensor launch instead of one sum per tensor (the host time of ~100
            # launches is what an update step waits for): an L1 norm is non-finite exactly
            # when such a sum is (NaN spreads, inf stays); on the CPU it is 5x slower than sum
            sums = torch.stack([r.float() for r in torch._foreach_norm(ts, 1)])
        else:
            sums = torch.stack([x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).to(dev)
                                for x in ts])
        flagged = torch.nonzero(~torch.isfinite(sums).cpu()).flatten().tolist()  # one sync
        return [names[i] for i in flagged if not bool(torch.isfinite(ts[i]).all())]

    def _nnz(self) -> list[int]:
        """Active weights per tensor: carried from the last update in layer scope, else
        counted (one pass over the masks and a host sync)."""
        if self._nnz_per is None:
            ms = self._mask_list()
            dev = ms[0].device
            # count_nonzero on bool: 15 ms where sum() took 96 ms (25.5 M slots, 1 thread)
            self._nnz_per = [int(x) for x in torch.stack([torch.count_nonzero(m).to(dev) for m in ms]).tolist()]
            self._nnz_sum = sum(self._nnz_per)
        return list(self._nnz_per)

    def _nnz_total(self) -> int:
        """Active weights over all sparse tensors; carried from the last update (global
        scope too), else counted."""
        if self._nnz_sum is None:
            self._nnz()
        return self._nnz_sum

    def _carry_counts(self, prune: list[int], grow: list[int], per_tensor: bool) -> None:
        """The counts after a mask update that pruned and grew exactly these: per tensor in
        layer scope; in global scope only the total is known without counting."""
        if per_tensor:
            self._nnz_per = [n - p + g for n, p, g in zip(self._nnz(), prune, grow)]
            self._nnz_sum = sum(self._nnz_per)
        else:
            total = self._nnz_total() - sum(prune) + sum(grow)
            self._forget_counts()
            self._nnz_sum = total

    def _forget_counts(self) -> None:
        self._nnz_per: list[int] | None = None
        self._nnz_sum: int | None = None

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
