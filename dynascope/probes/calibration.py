"""Scheduled calibration: ECE, MCE, NLL, accuracy and confidence on a fixed held-out batch (Guo et al. 2017).

Recorded (layer ``""``): ``calibration.ece``, ``calibration.mce``,
``calibration.nll``, ``calibration.accuracy``, ``calibration.confidence``, and
the artifact ``calibration.reliability`` (arrays ``edges``, ``accuracy``,
``confidence``, ``count`` per confidence bin) for the reliability diagram.
Formulas: :mod:`dynascope.diagnostics.calibration`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..core.checks import check_mode, positive_int, set_mode
from ..core.guard import preserved_state
from ..diagnostics._batch import Forward, default_forward
from ..diagnostics._dist import gather_rows
from ..diagnostics.calibration import calibration
from ._eval import DeviceBatch, logits_of
from .scheduled import Scheduled, ScheduledContext

__all__ = ["Calibration"]


class Calibration(Scheduled):
    """Calibration of the model on ``batch`` (an ``(inputs, targets)`` pair or a list of pairs; targets are class
    indices) every ``every`` steps (and/or ``at`` steps), in ``mode`` "eval" (default), "train" or "current";
    ``n_bins`` equal-width confidence bins (Guo et al.: 15); ``forward(model, inputs)`` for models not called
    as ``model(inputs)``. The logits are the output, or its ``.logits``."""

    name = "calibration"

    def __init__(
        self,
        every: int | None = None,
        batch: Any = None,
        *,
        n_bins: int = 15,
        at: Sequence[int] | str | None = None,
        mode: Literal["eval", "train", "current"] = "eval",
        forward: Forward | None = None,
    ) -> None:
        super().__init__(every=every, at=at)
        positive_int("n_bins", n_bins, owner="Calibration")
        check_mode(mode, "Calibration")
        self.batch = DeviceBatch(batch, "Calibration")
        self.n_bins = n_bins
        self.mode = mode
        self.forward = forward or default_forward

    def run(self, ctx: ScheduledContext) -> None:
        model = ctx.model
        with preserved_state(model, params=False, grads=False), torch.no_grad():
            set_mode(model, self.mode)
            logits, targets = [], []
            for x, y in self.batch.on(model):
                logits.append(logits_of(self.forward(model, x)).detach())
                targets.append(y)
        # torch.distributed: every rank's shard of the batch, in rank order (one process on the global batch)
        res = calibration(*gather_rows(torch.cat(logits), torch.cat(targets)), self.n_bins)
        for metric, value in res.rows():
            ctx.log(metric, value)
        ctx.save_artifact("calibration.reliability", res.bins.to_arrays(),
                          {"n": res.n, "n_bins": self.n_bins, "ece": res.ece, "mce": res.mce, "nll": res.nll,
                           "accuracy": res.accuracy, "confidence": res.confidence, "mode": self.mode,
                           "step": int(ctx.step)})
