"""Masks and budgets of the sparse tensors; prune/grow counts (SPEC §1-§3).

This module knows the model only through the list of sparse tensors; the ops (reference
or native) do the selections. Everything that decides a count runs in Python ints.

Choices where SPEC is vague:

* **Which weights are sparse**: the ``weight`` of every module that ``isinstance`` of
  ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (subclasses included, e.g. the ``out_proj`` of
  ``nn.MultiheadAttention``; ``ConvTranspose`` and lazy modules before materialisation are
  not), in ``model.named_parameters()`` order, a shared weight once. ``exclude`` globs are
  matched (``fnmatch``) against the parameter name *and* its module name, so ``"fc"`` and
  ``"fc.weight"`` both exclude ``fc``'s weight. A pattern that excludes no weight (a typo,
  or a name that is not a Conv/Linear weight) gets a ``UserWarning`` naming it.
* **Counts when the live slots cannot hold the target** (SPEC §3 last bullet): the grow
  target is capped at the number of live slots, prune counts at the active count.
* **Phase A counts**: prune = max(nnz - B, 0); grow = min(B + round(δ(t)·N), L) - (nnz - prune)
  (clamped at 0), with L the live slot count.
* **Phase B counts**: s = round(r(t)·B); prune = min(nnz, max(nnz - B, 0) + s);
  grow = min(B, L) - (nnz - prune) (clamped at 0).
* **Layer scope**: per tensor, prune = min(nnz_l, round(r(t)·k_l) + max(nnz_l - k_l, 0)),
  grow = min(k_l, L_l) - (nnz_l - prune) (clamped at 0); r(t) is the phase-B cosine over
  [0, t_end) for the whole run and there is no phase A / soft bound.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Sequence

import torch
from torch import nn

from . import density as _density
from .layout import like
from .schedules import soft_bound, swap_fraction

__all__ = [
    "SPARSE_MODULES",
    "matches",
    "find_sparse",
    "init_counts",
    "init_masks",
    "global_counts",
    "layer_counts",
    "live_numel",
]

SPARSE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_sparse(model: nn.Module, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every sparse tensor in global order (SPEC §1).

    Warns once per ``exclude`` pattern that matched none of the candidate weights.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    used: set[str] = set()
    owners: dict[int, str] = {}
    embeddings: set[int] = set()  # never masked (SPEC §1), also when tied to a Linear head
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or isinstance(w, nn.parameter.UninitializedParameter):
            continue
        if isinstance(mod, SPARSE_MODULES):
            owners.setdefault(id(w), mname)
        elif isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            embeddings.add(id(w))
    out = []
    for pname, p in model.named_parameters():
        mname = owners.get(id(p))
        if mname is None or p.dim() < 2 or id(p) in embeddings:
            continue
        hit = [pat for pat in exclude if fnmatch.fnmatchcase(pname, pat) or fnmatch.fnmatchcase(mname, pat)]
        if hit:
            used.update(hit)
            continue
        out.append((pname, p))
    for pat in exclude:
        if pat not in used:
            warnings.warn(
                f"chase_ext: exclude pattern {pat!r} matches no Conv/Linear weight (names are "
                f"matched as in model.named_parameters() / named_modules(), e.g. 'fc' or 'fc.weight'); "
                "it excludes nothing",
                UserWarning,
                stacklevel=3,
            )
    return out


def init_counts(
    shapes: Sequence[Sequence[int]], budget: int, init: str, dense_first: bool, density: float
) -> list[int]:
    if init == "erk":
        return _density.erk_counts(shapes, budget)
    return _density.uniform_counts(shapes, budget, dense_first, density)


def init_masks(params: Sequence[torch.Tensor], counts: Sequence[int], gen: torch.Generator) -> list[torch.Tensor]:
    """Exactly k_l random active slots per tensor: ``randperm(n_l, generator=g)[:k_l]`` (SPEC §2).

    Slot indices are row-major; each mask is laid out in memory like its parameter.
    """
    masks = []
    for p, k in zip(params, counts):
        n = p.numel()
        idx = torch.randperm(n, generator=gen)[:k]
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        masks.append(like(m.view(p.shape).to(p.device), p))
    return masks


def live_numel(shape: Sequence[int], live_rows: int | None, live_cols: int | None) -> int:
    """Number of live slots of a tensor given its live row/column counts (None = all)."""
    dims = list(shape)
    if live_rows is not None:
        dims[0] = live_rows
    if live_cols is not None and len(dims) > 1:
        dims[1] = live_cols
    return int(math.prod(dims))


def global_counts(
    t: int,
    nnz: int,
    budget: int,
    total: int,
    live: int,
    *,
    t_explore_end: int,
    t_end: int,
    soft_bound0: float,
    soft_bound_end: float,
    swap0: float,
    swap_end: float,
) -> tuple[int, int, int]:
    """(prune, grow, target) for one global-scope update at step ``t`` (SPEC §3 counts)."""
    if t < t_explore_end:
        delta = soft_bound(t, t_explore_end, soft_bound0, soft_bound_end)
        prune = max(nnz - budget, 0)
        target = min(budget + round(delta * total), live)
    else:
        r = swap_fraction(t, t_end, swap0, swap_end)
        s = round(r * budget)
        prune = min(nnz, max(nnz - budget, 0) + s)
        target = min(budget, live)
    grow = max(target - (nnz - prune), 0)
    return int(prune), int(grow), int(nnz - prune + grow)


def layer_counts(
    t: int,
    nnz: Sequence[int],
    k: Sequence[int],
    live: Sequence[int],
    *,
    t_end: int,
    swap0: float,
    swap_end: float,
) -> tuple[list[int], list[int]]:
    """Per-tensor (prune, grow) for a layer-scope update (SPEC §3.4)."""
    r = swap_fraction(t, t_end, swap0, swap_end)
    prune, grow = [], []
    for n_l, k_l, L_l in zip(nnz, k, live):
        p = min(n_l, round(r * k_l) + max(n_l - k_l, 0))
        g = max(min(k_l, L_l) - (n_l - p), 0)
        prune.append(int(p))
        grow.append(int(g))
    return prune, grow
