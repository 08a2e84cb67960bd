"""Hugging Face Trainer: record a run without touching the training loop.

::

    from dynascope.integrations.transformers import DynascopeCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[DynascopeCallback(every=10)])
    trainer.train()            # -> <args.output_dir>/dynascope

The callback opens a :class:`dynascope.Session` when training begins (on the
Trainer's model and its optimizer, unwrapped from Accelerate), ends a step at
``on_step_end`` (after the optimizer step, once per optimizer step also with
gradient accumulation) and closes the session when training ends. Steps are
numbered like the Trainer's: dynascope step ``s`` is the optimizer step after
which ``state.global_step == s + 1``. Numbers the Trainer logs (``loss``,
``grad_norm``, ``learning_rate``, ``epoch``, ``eval_*``) are recorded under
their own names at the step they describe. Gradients are read in the
optimizer's pre-step hook, i.e. after the Trainer's gradient clipping.

Same keyword options as :func:`dynascope.probe`; ``run_dir`` defaults to
``<args.output_dir>/dynascope``. Needs ``transformers`` (and ``accelerate``,
which its Trainer requires), imported only when this module is.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers import TrainerCallback

from ..capture.session import Session
from ..core.checks import positive_int

__all__ = ["DynascopeCallback", "DEFAULT_SUBDIR"]

DEFAULT_SUBDIR = "dynascope"


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (its step hooks are the ones that run)."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 4:
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class DynascopeCallback(TrainerCallback):
    """``transformers.TrainerCallback`` that records the run with dynascope.

    ``run_dir``: where to write (default ``<output_dir>/dynascope``);
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

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("the Trainer passed no model to DynascopeCallback.on_train_begin")
        if self.session is not None:  # a second train() call: close the first run
            self.session.close()
        run_dir = self.run_dir if self.run_dir is not None else os.path.join(args.output_dir, DEFAULT_SUBDIR)
        session = Session(model, unwrap_optimizer(optimizer), run_dir, every=self.every, **self.options)
        session.step_index = int(state.global_step)  # resumed Trainer runs keep their step numbers
        session.start()
        self.session = session

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session is not None:
            self.session.step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.session is None or not logs:
            return
        step = max(int(state.global_step) - 1, 0)
        for key, value in logs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                if key == "total_flos" or (key.startswith("train_") and key != "train_loss"):  # run summary
                    continue
                self.session.log(key, float(value), step=step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
