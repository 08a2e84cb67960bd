"""Scheduled gradient noise scale (McCandlish et al. 2018, appendix A) on a fixed batch split into micro-batches.

Recorded (layer ``""``): ``gns.simple`` (B_simple = tr(Sigma) / |G|^2; left out
at a step where the |G|^2 estimate is not positive), ``gns.grad_sq`` (|G|^2),
``gns.trace_cov`` (tr(Sigma)), their standard errors over the micro-batches
``gns.simple_stderr``, ``gns.grad_sq_stderr``, ``gns.trace_cov_stderr``, and
``gns.batch_size``, the run's training batch size the report compares with.
Formulas: :mod:`dynascope.diagnostics.noise_scale`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from ..core.checks import check_mode, positive_int
from ..diagnostics._batch import Forward, LossFn, batch_size
from ..diagnostics._dist import active, sum_number
from ..diagnostics.noise_scale import gradient_noise_scale
from ._eval import DeviceBatch
from .scheduled import Scheduled, ScheduledContext

__all__ = ["NoiseScale"]


class NoiseScale(Scheduled):
    """B_simple every ``every`` steps from ``batch`` (one ``(inputs, targets)`` pair) split into
    ``micro_batches`` micro-batches, with ``loss_fn(outputs, targets)`` the mean training loss.

    ``batch_size``: the training batch size drawn beside B_simple in the report
    (default: the size of ``batch``). ``mode``: "eval" (default), "train" or
    "current" (see :func:`dynascope.gradient_noise_scale`). ``params``: the
    parameters whose gradient counts (default: all trainable ones).
    """

    name = "noise_scale"

    def __init__(
        self,
        every: int | None = None,
        batch: Any = None,
        loss_fn: LossFn | None = None,
        micro_batches: int = 8,
        *,
        batch_size: int | None = None,
        at: Sequence[int] | str | None = None,
        params: Any = None,
        forward: Forward | None = None,
        mode: Literal["eval", "train", "current"] = "eval",
    ) -> None:
        super().__init__(every=every, at=at)
        if not callable(loss_fn):
            raise TypeError("NoiseScale: loss_fn= is required (the mean training loss, loss_fn(outputs, targets))")
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
            raise ValueError(f"NoiseScale: micro_batches must be an integer >= 2, got {micro_batches!r}")
        check_mode(mode, "NoiseScale")
        self.batch = DeviceBatch(batch, "NoiseScale")
        if len(self.batch.pairs) != 1:
            raise ValueError(f"NoiseScale: give one (inputs, targets) batch to split into micro-batches, got "
                             f"{len(self.batch.pairs)} pairs")
        n = _size(self.batch.pairs[0][0])
        if n // micro_batches < 1 and not active():  # torch.distributed: checked on the global batch at the run
            raise ValueError(f"NoiseScale: a batch of {n} examples cannot be split into {micro_batches} micro-batches")
        self.batch_size = n if batch_size is None else positive_int("batch_size", batch_size, owner="NoiseScale")
        self._own_size = batch_size is None  # the batch's size: under torch.distributed the global batch's
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.params = params
        self.forward = forward
        self.mode = mode

    def run(self, ctx: ScheduledContext) -> None:
        res = gradient_noise_scale(ctx.model, self.loss_fn, self.batch.on(ctx.model)[0], self.micro_batches,
                                   params=self.params, forward=self.forward, mode=self.mode)
        size = float(self.batch_size)
        if self._own_size and active():  # each rank holds its shard: the global batch's size
            size = sum_number(size)
        # B_simple is undefined where the |G|^2 estimate is not positive, the standard errors with 2
        # micro-batches: such rows are left out rather than recorded as NaN (which would read as a divergence)
        for metric, value in (("gns.simple", res.b_simple), ("gns.grad_sq", res.grad_sq),
                              ("gns.trace_cov", res.trace_cov), ("gns.simple_stderr", res.b_simple_stderr),
                              ("gns.grad_sq_stderr", res.grad_sq_stderr),
                              ("gns.trace_cov_stderr", res.trace_cov_stderr),
                              ("gns.batch_size", size)):
            if math.isfinite(value):
                ctx.log(metric, value)


def _size(inputs: Any) -> int:
    return batch_size(inputs)
