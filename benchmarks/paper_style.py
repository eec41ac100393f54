"""How the paper's released code updates masks (for the benchmark only).

Mirrors its structure: per-layer boolean indexing, concatenation of all scores,
``torch.topk`` for the global prune threshold, a full descending sort of the masked
gradient for growth, float masks. Ties are not handled (``>=`` the threshold keeps all
of them), so results only match the exact ops on inputs without ties.
"""
from __future__ import annotations

import torch


def mask_update(weights, masks, grads, states, state_owner, prune_k: int, grow_k: int):
    fmasks = [m.float() for m in masks]
    # prune: global magnitude threshold over active weights
    active = torch.cat([w.abs()[m.bool()] for w, m in zip(weights, fmasks)])
    keep = active.numel() - prune_k
    if keep > 0:
        threshold = torch.topk(active, keep, sorted=True)[0][-1]
    else:
        threshold = torch.tensor(float("inf"))
    new = [((w.abs() >= threshold) & m.bool()).float() for w, m in zip(weights, fmasks)]
    # grow: global top-|grad| among inactive slots
    scores = torch.cat([(g.abs() * (n == 0)).flatten() for g, n in zip(grads, new)])
    idx = torch.sort(scores, descending=True)[1][:grow_k]
    flat = torch.cat([n.flatten() for n in new])
    flat[idx] = 1.0
    off = 0
    out = []
    for n in new:
        out.append(flat[off:off + n.numel()].view_as(n))
        off += n.numel()
    for w, m, n in zip(weights, masks, out):
        w.mul_(m.float() * n)  # zero pruned; grown start at 0 (they were 0)
        m.copy_(n.bool())
    for s, o in zip(states, state_owner):
        s.mul_(masks[o].float())
    return masks
