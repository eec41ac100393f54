"""Plain steps inside CUDA graphs (``torch.cuda.graph`` capture and replay).

A plain step (no mask update, no channel event, no closure) runs no host sync and, on
CUDA, only ``masked_apply_`` among chase_ext's ops, which can be captured (its tensor
list travels as kernel parameters under capture, ``csrc/cuda/multi_tensor.cuh``). So a
training loop may capture ``forward + backward + chase.step()`` once and replay it for the
plain steps, running update and event steps eagerly::

    while training:
        if chase.plain_steps_ahead() != 0:     # the next step is plain
            static_x.copy_(x); static_y.copy_(y)
            graph.replay()
            chase.replayed()                   # count it: the host did not run step()
        else:
            eager_step(x, y)                   # forward, backward, chase.step()
            if chase.capture_key() != key:     # an event or a slim replaced tensors
                graph, key = capture(), chase.capture_key()

Rules (the host cannot see a replay, so the schedule is told):

* ``step()`` while the current CUDA stream is capturing must be a plain step, else it
  raises ``RuntimeError`` with nothing changed. It does not count as a step: captured
  work runs only when replayed, and each replay is counted by ``replayed()``.
* ``replayed(n)`` counts ``n`` replayed plain steps; it refuses (``ValueError``, nothing
  counted) when one of them is an update or event step, which must run eagerly.
* A graph holds the addresses of the tensors it read and wrote. Masks change in place at
  updates, so a graph stays valid across them; a channel event rebuilds the removed
  channels' bias masks and a slim reallocates parameters and optimizer state, so capture
  again when ``capture_key()`` changed (it is made of those addresses).
* The wrapped optimizer must itself be capturable (SGD is; Adam/AdamW need
  ``capturable=True``) and its state must exist before the capture (warm up eagerly).
"""
from __future__ import annotations

import torch

from .schedules import channel_event_offset

__all__ = ["is_capturing", "CaptureMixin"]


def is_capturing() -> bool:
    """Is the current CUDA stream capturing a graph? (False without CUDA.)"""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class CaptureMixin:
    """``plain_steps_ahead``, ``replayed``, ``capture_key`` and the capture check of ``step``
    (module docstring)."""

    def _next_eager_step(self) -> int | None:
        """The next step (1-based, after ``t``) that is an update step or may hold a
        channel event, or None when no such step is due any more (the same predicates as
        ``step``)."""
        cfg = self.config
        t = self._t
        ui = cfg.update_steps
        upd = (t // ui + 1) * ui
        nxt = upd if upd < cfg.t_end_steps else None
        if self._ch is not None and not self._ch.done:
            ci = cfg.channel_interval_steps
            ev = t + 1 + (channel_event_offset(ci, ui) - (t + 1)) % ci  # >= t + 1 >= 1
            nxt = ev if nxt is None else min(nxt, ev)
        return nxt

    def plain_steps_ahead(self) -> int | None:
        """How many of the next steps are plain (no update, no channel event), i.e. may
        be replayed from a captured graph: 0 when the next step must run eagerly (also after
        weights or masks were written from outside, which a replay would not mask), None
        when every remaining step is plain."""
        if self._written_since():  # weights or masks written since: the next step masks them, eagerly
            return 0
        nxt = self._next_eager_step()
        return None if nxt is None else nxt - (self._t + 1)

    def capture_key(self) -> tuple:
        """The addresses (and shapes) of every tensor a captured plain step reads or writes
        besides the gradients: the wrapped optimizer's parameters and tensor state, the
        masks and the removed channels' bias masks. A graph captured under one key replays
        correctly while the key stays the same (host-side, no sync)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = self.optimizer.state
        return (
            tuple((p.data_ptr(), tuple(p.shape)) for p in params),
            tuple(v.data_ptr() for p in params for v in state.get(p, {}).values() if isinstance(v, torch.Tensor)),
            tuple(self._mask_dict[n].data_ptr() for n in self._names),
            tuple((b.data_ptr(), m.data_ptr()) for b, m in self._bias_masks),
        )

    def replayed(self, n: int = 1) -> None:
        """Counts ``n`` replays of a captured plain step as steps taken (module docstring)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ChaseOptimizer.replayed: n must be an int >= 1, got {n!r}")
        ahead = self.plain_steps_ahead()
        if ahead is not None and n > ahead:
            raise ValueError(
                f"ChaseOptimizer.replayed({n}): step {self._t + ahead + 1} is an update or channel-event step, "
                f"which must run eagerly (chase.step() outside the graph); only {ahead} plain step(s) are due "
                "before it. Nothing was counted")
        self._t += n

    def _check_capture(self, t: int, upd: bool, ev: bool, closure) -> None:
        """Raises, before anything changed, when step ``t`` cannot be captured."""
        why = ("an update step" if upd else "a channel-event step" if ev
               else "a step with a closure" if closure is not None else None)
        if why is not None:
            raise RuntimeError(
                f"ChaseOptimizer: step {t} is {why}, which cannot be captured in a CUDA graph (it reads "
                "values back on the host); capture only plain steps (plain_steps_ahead() > 0) and run "
                "the others eagerly. Nothing was changed")
