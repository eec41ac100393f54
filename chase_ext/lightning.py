"""PyTorch Lightning: a callback for a ``ChaseOptimizer`` returned by ``configure_optimizers``.

Training, gradient accumulation (``accumulate_grad_batches``: Lightning steps the optimizer
once per accumulated batch, so ``chase.t`` counts real steps) and mixed precision
(``precision="bf16-mixed"``, ``"16-mixed"``; on CUDA the latter adds a GradScaler,
which ``ChaseOptimizer`` supports) need nothing: ``ChaseOptimizer`` is a ``torch.optim.Optimizer`` and evaluates
Lightning's step closure before reading the gradients. Two things need the Trainer's cooperation once a run slims during training,
and :class:`ChaseCallback` does both::

    trainer = lightning.Trainer(..., callbacks=[chase_ext.lightning.ChaseCallback()])

* **DDP** (``strategy="ddp"``; ``"ddp_spawn"`` does not fit a run that slims, see the
  README): a slim shrinks parameters, which the DDP wrapper Lightning built cannot follow;
  after every training batch that slimmed, the callback replaces ``trainer.strategy.model``
  by a new wrapper (``chase_ext.rewrap_ddp``; every rank slims at the same step, so every
  rank re-wraps together). DDP communication hooks registered through the strategy are not
  carried over (the re-wrap names them in a warning).
* **Weight averaging** (Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` callbacks,
  or any callback keeping a ``torch.optim.swa_utils.AveragedModel`` in ``_average_model``):
  the averaged copy is slimmed like the model right after every step that slimmed
  (``chase_ext.ema.follow_slims``), before the averaging callback updates it. Resuming such
  a run from a checkpoint is not supported.
* **Resuming a slimmed checkpoint** (``trainer.fit(model, ckpt_path=...)``): Lightning loads
  the model's weights before it calls ``configure_optimizers``, into the freshly built
  full-width model, which fails on the narrower tensors. The callback sets such weights
  aside, lets the ``ChaseOptimizer`` load its state (which replays the slims, as in a plain
  resume), then loads them, and re-wraps DDP. The checkpoint must hold the optimizer state
  (``ModelCheckpoint(save_weights_only=False)``, the default).

One ``ChaseOptimizer`` per ``LightningModule``, built on ``self`` (the module; Lightning's
DDP wrapper is applied around it).
"""
from __future__ import annotations

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same framework
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("chase_ext.lightning needs PyTorch Lightning: pip install lightning") from e

from .distributed import rewrap_ddp
from .ema import follow_slims
from .optimizer import ChaseOptimizer

__all__ = ["ChaseCallback"]


def _chase_of(trainer, pl_module) -> ChaseOptimizer | None:
    found = [o for o in trainer.optimizers if isinstance(o, ChaseOptimizer)]
    if len(found) > 1:
        raise ValueError(f"ChaseCallback: configure_optimizers returned {len(found)} ChaseOptimizers; one is supported")
    if found and found[0].model is not pl_module:
        raise ValueError("ChaseCallback: the ChaseOptimizer was built for another model than the LightningModule "
                         "(build it in configure_optimizers on self)")
    return found[0] if found else None


class ChaseCallback(pl.Callback):
    """DDP re-wrap after slims and resume of slimmed checkpoints (see the module doc)."""

    def __init__(self) -> None:
        self._pending: dict | None = None  # checkpoint weights set aside until the slims are replayed
        self._hook = None

    # ---------------------------------------------------------------- resume
    def setup(self, trainer, pl_module, stage: str) -> None:
        # only while Lightning restores the model: a user's own load_state_dict later must fail as usual
        if stage == "fit" and self._hook is None:
            register = getattr(pl_module, "register_load_state_dict_pre_hook", None)
            if register is None:  # torch < 2.5 has only the private spelling
                self._hook = pl_module._register_load_state_dict_pre_hook(self._set_aside, with_module=True)
            else:
                self._hook = register(self._set_aside)

    def _set_aside(self, module, state_dict, prefix, *args) -> None:
        if prefix:
            return
        own = module.state_dict(keep_vars=True)
        narrower = [k for k, v in state_dict.items()
                    if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
        if narrower:
            self._pending = dict(state_dict)
            for k in narrower:  # load the module's own tensors for now: a no-op
                state_dict[k] = own[k].detach()

    def on_fit_start(self, trainer, pl_module) -> None:
        # the model is restored and the optimizers exist; their state is loaded next
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        chase = _chase_of(trainer, pl_module)
        if chase is not None:
            seen = [chase.slim_count]

            def after_step(*_):
                if chase.slim_count != seen[0]:  # this step slimmed: averaged copies follow
                    seen[0] = chase.slim_count
                    self._follow_averages(trainer, chase)

            chase.register_step_post_hook(after_step)
        if self._pending is not None:
            if chase is None:
                raise ValueError("ChaseCallback: the checkpoint holds slimmed weights but configure_optimizers "
                                 "returned no ChaseOptimizer to replay the slims")
            chase.register_load_state_dict_post_hook(lambda _opt: self._load_pending(trainer, pl_module))

    def _load_pending(self, trainer, pl_module) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pl_module.load_state_dict(pending, strict=pl_module.strict_loading)
        except RuntimeError as e:
            raise RuntimeError("ChaseCallback: the checkpoint's weights do not fit the model even after the "
                               f"ChaseOptimizer replayed its slims: {e}") from e
        self._rewrap(trainer, pl_module)

    @staticmethod
    def _follow_averages(trainer, chase) -> None:
        from torch.optim.swa_utils import AveragedModel

        for cb in trainer.callbacks:
            avg = getattr(cb, "_average_model", None)
            if isinstance(avg, AveragedModel):
                follow_slims(avg, chase)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:  # the optimizer state was never loaded (weights-only checkpoint?)
            raise ValueError("ChaseCallback: the checkpoint holds slimmed weights but no ChaseOptimizer state to "
                             "replay the slims (save it with ModelCheckpoint(save_weights_only=False))")

    # ---------------------------------------------------------------- DDP
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._rewrap(trainer, pl_module)

    def _rewrap(self, trainer, pl_module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            chase = _chase_of(trainer, pl_module)
            if chase is not None:
                trainer.strategy.model = rewrap_ddp(model, chase)  # the same wrapper when nothing slimmed
