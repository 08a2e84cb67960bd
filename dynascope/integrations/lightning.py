"""PyTorch Lightning: record a run without touching the LightningModule.

::

    from dynascope.integrations.lightning import DynascopeCallback
    trainer = L.Trainer(max_epochs=3, callbacks=[DynascopeCallback(every=10)])
    trainer.fit(model, loader)   # -> <trainer.log_dir>/dynascope

The callback opens a :class:`dynascope.Session` at ``on_train_start`` on the
LightningModule and the trainer's (first) optimizer and closes it at
``on_train_end`` (or marks the run failed on an exception). A dynascope step
is one optimizer step: dynascope step ``s`` is the step after which
``trainer.global_step == s + 1``. Its ``loss`` is the sum of the micro-batch
losses ``outputs["loss"]``, which Lightning has divided by
``accumulate_grad_batches``: the mean loss of the step.

Lightning runs the forward and backward pass inside ``optimizer.step(closure)``,
so the optimizer's pre-step hook fires before the gradients exist; the
callback therefore reads the gradients again in ``on_before_optimizer_step``
(after backward and gradient clipping, just before the update). Manual
optimization is supported as long as ``optimizer.step()`` is called once per
training step.

Same keyword options as :func:`dynascope.probe`; ``run_dir`` defaults to
``<trainer.log_dir>/dynascope`` (next to the logger's files), or
``<default_root_dir>/dynascope`` without a logger. Works with the ``lightning``
package (``lightning.pytorch``) and falls back to ``pytorch_lightning``; both
are imported only when this module is.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..capture.session import Session
from ..core.checks import positive_int

try:  # the unified package first: its Trainer only accepts its own Callback class
    from lightning.pytorch import Callback as _Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback as _Callback

__all__ = ["DynascopeCallback", "DEFAULT_SUBDIR"]

DEFAULT_SUBDIR = "dynascope"


class DynascopeCallback(_Callback):
    """Lightning ``Callback`` that records the run with dynascope.

    ``run_dir``: where to write (default ``<trainer.log_dir>/dynascope``);
    ``every``: record the probes every this many optimizer steps; other
    keywords go to :func:`dynascope.probe` (``probes``, ``modules``,
    ``curvature``, ``tensorboard``, ...). ``session`` holds the live
    :class:`~dynascope.Session` during training.
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, every: int = 10, **probe_options: Any) -> None:
        positive_int("every", every)
        self.run_dir = run_dir
        self.every = every
        self.options = probe_options
        self.session: Session | None = None
        self._losses: list[torch.Tensor] = []
        self._global_step = 0

    def _default_run_dir(self, trainer: Any) -> str:
        log_dir = getattr(trainer, "log_dir", None)
        base = log_dir if log_dir else trainer.default_root_dir
        return os.path.join(base, DEFAULT_SUBDIR)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.session is not None:
            self.session.close()
        optimizers = [getattr(o, "_optimizer", o)  # a LightningOptimizer wraps the torch one
                      for o in list(getattr(trainer, "optimizers", []) or [])]
        optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
        run_dir = self.run_dir if self.run_dir is not None else self._default_run_dir(trainer)
        session = Session(pl_module, optimizers, run_dir, every=self.every, **self.options)
        session.step_index = int(trainer.global_step)
        session.start()
        self.session = session
        self._global_step = int(trainer.global_step)
        self._losses = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.session is not None:  # gradients exist only now: read them again (replaces the pre-hook's reading)
            self.session.before_optimizer_step(getattr(optimizer, "_optimizer", optimizer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.session is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
        if int(trainer.global_step) == self._global_step:
            return  # gradient accumulation: no optimizer step yet
        self._global_step = int(trainer.global_step)
        losses, self._losses = self._losses, []
        if losses:
            self.session.step(loss=torch.stack(losses).float().sum())
        else:
            self.session.step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(failed=True, error=exception)
            self.session = None
