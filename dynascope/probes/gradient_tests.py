"""Scheduled gradient tests: Cockpit's per-example quantities on a fixed batch every N steps.

Recorded (layer ``""``): ``gradtest.gsnr``, ``gradtest.norm_test``, ``gradtest.inner_test``,
``gradtest.ortho_test``, ``gradtest.cabs`` (with a learning rate: ``lr=`` or the optimizer's single one),
``gradtest.eb``, ``gradtest.tic_trace``, ``gradtest.tic_diag`` (when the exact Hessian diagonal was
computed), ``gradtest.grad_norm`` and ``gradtest.batch_size``; artifacts ``gradtest.hist1d`` (``counts``,
``edges``) and ``gradtest.hist2d`` (``counts``, ``x_edges``, ``y_edges``). A value that is not finite
(e.g. a test at a zero gradient) is left out. Formulas: :mod:`dynascope.diagnostics.gradient_tests`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..core.checks import check_mode, one_of
from ..diagnostics._batch import Forward, LossFn
from ..diagnostics.gradient_tests import gradient_tests
from ..diagnostics.per_example import MEMORY_BYTES
from ._eval import DeviceBatch
from .scheduled import Scheduled, ScheduledContext, step_pair

__all__ = ["GradientTests"]


def _single_lr(opt: torch.optim.Optimizer | None) -> float | None:
    if opt is None:
        return None
    lrs = {float(g["lr"]) for g in opt.param_groups if "lr" in g}
    return lrs.pop() if len(lrs) == 1 else None


class GradientTests(Scheduled):
    """Cockpit's gradient tests, GSNR, CABS, EB criterion, TIC and gradient histograms every ``every`` steps
    on ``batch`` (one ``(inputs, targets)`` pair), with ``loss_fn(outputs, targets)`` the mean training loss.
    ``batch="step"``: each due step's own minibatch, as handed to ``run.step(loss, batch=(inputs, targets))``
    (Cockpit's setting: the quantities of the batch the step trained on; measured at the weights after the
    step, since ``run.step`` follows ``optimizer.step()``); a due step without a batch records
    ``diagnostic.failed`` and training goes on.

    ``lr``: the learning rate for CABS (default: the first optimizer's, when all its parameter groups share
    one; CABS is left out otherwise). ``mode`` (default "eval"), ``batchnorm``, ``params``, ``forward``,
    ``hist1d``, ``hist2d``, ``tic``, ``tic_max_params``, ``memory_bytes``: as
    :func:`dynascope.gradient_tests`.
    """

    name = "gradient_tests"

    def __init__(
        self,
        every: int | None = None,
        batch: Any = None,
        loss_fn: LossFn | None = None,
        *,
        lr: float | None = None,
        at: Sequence[int] | str | None = None,
        params: Any = None,
        forward: Forward | None = None,
        mode: Literal["eval", "train", "current"] = "eval",
        batchnorm: Literal["eval", "loop"] = "eval",
        hist1d: bool = True,
        hist2d: bool = True,
        tic: bool = True,
        tic_max_params: int = 20_000,
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        super().__init__(every=every, at=at)
        if not callable(loss_fn):
            raise TypeError("GradientTests: loss_fn= is required (the mean training loss, loss_fn(outputs, targets))")
        check_mode(mode, "GradientTests")
        one_of("batchnorm", batchnorm, ("eval", "loop"), "GradientTests")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)):
            raise ValueError(f"GradientTests: lr must be a finite number or None, got {lr!r}")
        if isinstance(batch, str):
            if batch != "step":
                raise ValueError(f"GradientTests: batch must be (inputs, targets) or 'step', got {batch!r}")
            self.batch: DeviceBatch | None = None  # each due step's own, from run.step(loss, batch=...)
        else:
            self.batch = DeviceBatch(batch, "GradientTests")
            if len(self.batch.pairs) != 1:
                raise ValueError(f"GradientTests: give one (inputs, targets) batch, got {len(self.batch.pairs)} "
                                 "pairs")
        self.loss_fn = loss_fn
        self.lr = lr
        self.params = params
        self.forward = forward
        self.mode = mode
        self.batchnorm = batchnorm
        self.hist1d = hist1d
        self.hist2d = hist2d
        self.tic = tic
        self.tic_max_params = tic_max_params
        self.memory_bytes = memory_bytes
        self._noted: set[str] = set()

    def run(self, ctx: ScheduledContext) -> None:
        lr = self.lr if self.lr is not None else _single_lr(ctx.optimizer)
        pair = step_pair(self, ctx) if self.batch is None else self.batch.on(ctx.model)[0]
        res = gradient_tests(ctx.model, self.loss_fn, pair, lr=lr, params=self.params,
                             forward=self.forward, mode=self.mode, batchnorm=self.batchnorm, hist1d=self.hist1d,
                             hist2d=self.hist2d, tic=self.tic, tic_max_params=self.tic_max_params,
                             memory_bytes=self.memory_bytes)
        for note in res.notes:  # a fallback is said once per run, not at every step
            if note not in self._noted:
                self._noted.add(note)
                warnings.warn(f"dynascope: GradientTests: {note}", RuntimeWarning, stacklevel=2)
        for metric, value in (("gradtest.gsnr", res.gsnr), ("gradtest.norm_test", res.norm_test),
                              ("gradtest.inner_test", res.inner_test), ("gradtest.ortho_test", res.ortho_test),
                              ("gradtest.cabs", res.cabs), ("gradtest.eb", res.eb_criterion),
                              ("gradtest.tic_trace", res.tic_trace), ("gradtest.tic_diag", res.tic_diag),
                              ("gradtest.grad_norm", res.grad_norm), ("gradtest.batch_size", float(res.batch_size))):
            if math.isfinite(value):
                ctx.log(metric, value)
        if res.hist1d is not None:
            ctx.save_artifact("gradtest.hist1d", {"counts": res.hist1d.counts, "edges": res.hist1d.edges},
                              {"batch_size": res.batch_size, "mode": self.mode})
        if res.hist2d is not None:
            ctx.save_artifact("gradtest.hist2d", {"counts": res.hist2d.counts, "x_edges": res.hist2d.x_edges,
                                                  "y_edges": res.hist2d.y_edges},
                              {"batch_size": res.batch_size, "mode": self.mode})
