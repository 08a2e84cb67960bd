"""Cockpit's normalised step length alpha, live: ``step.alpha`` at each start step of the schedule.

A start step n (due by ``every`` / ``at``) and the next step n+1 are observed on their own minibatches (given as
``run.step(loss, batch=(inputs, targets))``) at the weights before their optimizer steps, w_n and w_{n+1}
(copied just before each step: the scheduled runner's pre-step hook); the update d = w_{n+1} - w_n is the one
of step n. At step n+1, ``step.alpha`` is recorded at step n (Cockpit stores it under the start iteration too).
Formulas: :mod:`dynascope.diagnostics.alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.checks import check_mode, set_mode
from ..diagnostics import _dist
from ..diagnostics._batch import Forward, LossFn
from ..diagnostics.alpha import LineObservation, line_observation, normalized_step_length
from .scheduled import Scheduled, ScheduledContext, step_pair

__all__ = ["Alpha"]


class Alpha(Scheduled):
    """Cockpit's normalised step length alpha of the update of each scheduled step (``step.alpha``, recorded at
    that step once the next one has run; also ``step.alpha_t`` = ||d||). Needs each involved step's own batch:
    ``run.step(loss, batch=(inputs, targets))`` (a due step without one records ``diagnostic.failed``).

    ``loss_fn(outputs, targets)``: the mean training loss. ``mode`` (default "eval"): the model's mode for the
    per-example gradients (``torch.func``: BatchNorm in training mode cannot be vmapped; Cockpit observes the
    training pass, the same where the model has no dropout or batch statistics). ``params``: names of the
    parameters the direction spans (default: every trainable one). ``chunk``: examples per vmapped batch.
    Memory: on a start step, a copy of the trainable weights until the next step ends, and the update d.
    """

    name = "alpha"

    def __init__(self, every: int | None = None, loss_fn: LossFn | None = None, *,
                 at: Sequence[int] | str | None = None, mode: Literal["eval", "train", "current"] = "eval",
                 params: Sequence[str] | None = None, forward: Forward | None = None, chunk: int = 32) -> None:
        super().__init__(every=every, at=at)
        if not callable(loss_fn):
            raise TypeError("Alpha: loss_fn= is required (the mean training loss, loss_fn(outputs, targets))")
        check_mode(mode, "Alpha")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"Alpha: chunk must be a positive integer, got {chunk!r}")
        self.loss_fn, self.mode, self.params, self.forward, self.chunk = loss_fn, mode, params, forward, chunk
        self._before: dict[int, dict[str, torch.Tensor]] = {}  # step -> weights before its optimizer step
        self._start: tuple[int, dict[str, torch.Tensor], float, LineObservation] | None = None
        self._error: Exception | None = None  # raised in the pre-step hook, reported by run()

    def _is_start(self, step: int) -> bool:
        return super().due(step)

    def due(self, step: int) -> bool:
        """A start step, or the step after one (its end point)."""
        return super().due(step) or (step > 0 and super().due(step - 1))

    def _named(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.params is not None:
            keep = set(self.params)
            unknown = keep - {n for n, _ in named}
            if unknown:
                raise ValueError(f"Alpha: params names no trainable parameter of the model: {sorted(unknown)[:5]} "
                                 f"(trainable: {[n for n, _ in named][:5]}...)")
            named = [(n, p) for n, p in named if n in keep]
        return named

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Copy the weights before the step's first optimizer step, on the steps that observe (an error is kept
        for :meth:`run`, which the runner records as a failed diagnostic: never raised into the training step)."""
        if self.due(step) and step not in self._before:
            try:  # (FSDP2: copies of this rank's shards, DTensors, gathered by run())
                self._before = {step: {n: p.detach().clone() for n, p in self._named(_dist.unwrap(model))}}
            except Exception as exc:  # noqa: BLE001 - reported by run() at this step
                self._before, self._error = {}, exc

    def run(self, ctx: ScheduledContext) -> None:
        if ctx.final:
            return
        step = ctx.step
        error, self._error = self._error, None
        if error is not None:
            raise error
        weights = self._before.pop(step, None)
        start, self._start = self._start, None
        if weights is None:
            raise RuntimeError(f"Alpha at step {step}: no copy of the weights before the optimizer step (no "
                               "optimizer step in this step?)")
        inputs, targets = step_pair(self, ctx)
        model = _dist.unwrap(ctx.model)  # DDP: the module itself
        with _dist.gathered(model):  # FSDP2: the whole parameters (and the copies before the step) for the call
            self._observe(model, step, {n: _dist.full(w) for n, w in weights.items()}, start, inputs, targets, ctx)

    def _observe(self, model: nn.Module, step: int, weights: dict[str, torch.Tensor],
                 start: tuple[int, dict[str, torch.Tensor], float, LineObservation] | None, inputs: Any,
                 targets: Any, ctx: ScheduledContext) -> None:
        """The end observation of the previous step's update and the start observation of this one's."""
        set_mode(model, self.mode)
        if start is not None and start[0] == step - 1:  # the end point of the previous step's update
            _, d, t, obs0 = start
            obs1 = line_observation(model, self.loss_fn, inputs, targets, weights, d, forward=self.forward,
                                    chunk=self.chunk)
            alpha = normalized_step_length(obs0, obs1, t)
            if math.isfinite(alpha):
                ctx.log_at(step - 1, "step.alpha", alpha)
            ctx.log_at(step - 1, "step.alpha_t", t)
        if self._is_start(step):
            with torch.no_grad():
                d = {n: p.detach() - weights[n] for n, p in self._named(model) if n in weights}
            t = math.sqrt(sum(float(v.double().square().sum()) for v in d.values()))
            obs0 = line_observation(model, self.loss_fn, inputs, targets, weights, d, forward=self.forward,
                                    chunk=self.chunk)
            self._start = (step, d, t, obs0)
