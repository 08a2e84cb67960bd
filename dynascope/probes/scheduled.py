"""Scheduled diagnostics: run a (possibly expensive) diagnostic every N steps
or at chosen steps, under the state guard, and record its results.

A scheduled diagnostic subclasses :class:`Scheduled` and implements
``run(ctx)``; the session calls it when ``due(step)`` is true (and once more at
the end of the run when ``at="end"``), inside
:func:`dynascope.core.guard.preserved_state`, so training continues bit-identically
(architecture invariant 4). ``run`` writes through the context:

* ``ctx.log(metric, value, layer="")`` for scalar rows,
* ``ctx.save_artifact(name, arrays, meta)`` for array artifacts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import positive_int
from ..core.errors import describe
from ..core.guard import preserved_state
from ..diagnostics._batch import as_pairs
from ..diagnostics._dist import Agreement
from .base import Collected, Probe

__all__ = ["Scheduled", "ScheduledContext", "ScheduledRunner", "run_guarded", "step_batch", "step_pair"]


@dataclass
class ScheduledContext:
    """What a scheduled diagnostic sees: the live model and optimizer, the step,
    and writers into the run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    step: int
    final: bool
    log_fn: Callable[[str, float, str], None]
    artifact_fn: Callable[[str, dict[str, np.ndarray], dict[str, Any]], None]
    extra: dict[str, Any] = field(default_factory=dict)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)  # all of them (``optimizer``: the first)
    #: the step's own batch, from ``run.step(loss, batch=(inputs, targets))`` (None when not given): what a
    #: diagnostic built with ``batch="step"`` measures on (:func:`step_batch`)
    batch: Any = None
    #: writes a row at another step than ``step`` (step, metric, value, layer); None: at ``step``
    log_at_fn: Callable[[int, str, float, str], None] | None = None

    def __post_init__(self) -> None:
        if not self.optimizers and self.optimizer is not None:
            self.optimizers = [self.optimizer]

    def log(self, metric: str, value: float, layer: str = "") -> None:
        self.log_fn(metric, float(value), layer)

    def log_at(self, step: int, metric: str, value: float, layer: str = "") -> None:
        """A row at ``step`` (an earlier step a diagnostic completes now, e.g. ``step.alpha``)."""
        if self.log_at_fn is None:
            self.log(metric, value, layer)
        else:
            self.log_at_fn(step, metric, float(value), layer)

    def save_artifact(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        self.artifact_fn(name, arrays, meta or {})


class Scheduled:
    """Base class: when to run. ``every=N`` runs at steps 0, N, 2N, ...;
    ``at`` is a sequence of steps, or ``"end"`` (once, when the probe closes),
    or ``"start"``. Both may be given."""

    name: str = "scheduled"

    def __init__(self, every: int | None = None, at: Sequence[int] | str | None = None) -> None:
        if every is not None:
            positive_int("every", every, owner=type(self).__name__)
        if isinstance(at, str) and at not in ("end", "start"):
            raise ValueError(f"{type(self).__name__}: at must be 'start', 'end' or a sequence of steps, got {at!r}")
        if every is None and at is None:
            raise ValueError(f"{type(self).__name__}: give every=N or at=... to say when it runs")
        self.every = every
        self.at = at

    def due(self, step: int) -> bool:
        if self.every is not None and step % self.every == 0:
            return True
        if self.at == "start":
            return step == 0
        if self.at is not None and not isinstance(self.at, str):
            return step in self.at
        return False

    @property
    def at_end(self) -> bool:
        return self.at == "end"

    def run(self, ctx: ScheduledContext) -> None:  # pragma: no cover - interface
        """Do the work for step ``ctx.step`` (also called with ``ctx.final=True``
        once at close when ``at="end"``)."""
        raise NotImplementedError

    def on_close(self, ctx: ScheduledContext) -> None:
        """Called once when the probe closes (after a final ``run`` if any), under
        the state guard; e.g. to turn kept checkpoints into a trajectory plane."""


def step_batch(diag: Scheduled, batch: Any, ctx: ScheduledContext) -> Any:
    """The batch a scheduled diagnostic measures on: its fixed ``batch``, or with ``batch="step"`` the step's
    own (``ctx.batch``, given as ``run.step(loss, batch=(inputs, targets))``); a ValueError saying how to give
    it when the step has none (the runner records ``diagnostic.failed`` and training goes on)."""
    if not (isinstance(batch, str) and batch == "step"):
        return batch
    if ctx.batch is None:
        raise ValueError(f"{type(diag).__name__}(batch='step') at step {ctx.step}: this step gave no batch; call "
                         "run.step(loss, batch=(inputs, targets)) with the step's inputs and targets")
    return ctx.batch


def step_pair(diag: Scheduled, ctx: ScheduledContext) -> tuple[Any, Any]:
    """The step's own batch (:func:`step_batch` with ``batch="step"``) as its one ``(inputs, targets)`` pair; a
    ValueError when the step gave several."""
    pairs = as_pairs(step_batch(diag, "step", ctx))
    if len(pairs) != 1:
        raise ValueError(f"{type(diag).__name__} at step {ctx.step}: the step gave {len(pairs)} (inputs, targets) "
                         "pairs in run.step(batch=...); give one")
    return pairs[0]


def run_guarded(diag: Scheduled, ctx: ScheduledContext, *, close: bool = False) -> None:
    """``diag.run(ctx)`` (or ``diag.on_close(ctx)`` with ``close=True``) under the
    state guard and with autograd on: how a scheduled diagnostic runs, at a due
    step of a live run or on a checkpoint in ``dynascope analyze``."""
    with preserved_state(ctx.model), torch.enable_grad():
        if close:
            diag.on_close(ctx)
        else:
            diag.run(ctx)


class ScheduledRunner(Probe):
    """A scheduled diagnostic as an instrument of the session: at the end of each step where it is due
    (after the probes collected and were disarmed) it runs under the state guard, and at the normal end of
    the run its ``at="end"`` run and ``on_close``. A failure is restored by the guard, recorded as a
    ``diagnostic.failed`` row and warned about (training goes on), or re-raised with
    ``on_error="raise"``."""

    every_step = True

    def __init__(self, diagnostic: Scheduled, on_error: str = "warn") -> None:
        if not isinstance(diagnostic, Scheduled):
            raise TypeError(f"scheduled diagnostics must be dynascope Scheduled objects, got "
                            f"{type(diagnostic).__name__}")
        self.diagnostic = diagnostic
        self.on_error = on_error
        self.name = type(diagnostic).__name__

    def collect(self, step: int) -> Collected | None:
        return None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """A diagnostic that observes the weights before the step (e.g. :class:`dynascope.Alpha`) copies them
        now, before the step's first optimizer step."""
        hook = getattr(self.diagnostic, "before_optimizer_step", None)
        if hook is None:
            return
        try:
            hook(self.ctx.model, self.ctx.step)
        except Exception as exc:  # noqa: BLE001 - inside the optimizer's pre-hook: never stop training
            if self.on_error == "raise":
                raise
            if self.ctx.log_row is not None:
                self.ctx.log_row(self.ctx.step, "diagnostic.failed", self.name, 1.0)
            warnings.warn(f"dynascope: {self.name} failed before the optimizer step of step {self.ctx.step} "
                          f"({describe(exc)}); training goes on", RuntimeWarning, stacklevel=3)

    def runs_model(self, step: int) -> bool:
        return self.diagnostic.due(step)

    def after_step(self, step: int) -> None:
        if self.diagnostic.due(step):
            self.run(step, final=False)

    def end_run(self, step: int) -> None:
        if self.diagnostic.at_end:
            self.run(step, final=True)
        self.run(step, final=True, close=True)

    def run(self, step: int, final: bool, close: bool = False) -> None:
        ctx = self.ctx
        log_row, write_artifact = ctx.log_row, ctx.write_artifact

        def log_fn(metric: str, value: float, layer: str) -> None:
            if log_row is not None:
                log_row(step, metric, layer, value)

        def artifact_fn(name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
            if write_artifact is not None:
                write_artifact(name, step, arrays, meta)

        def log_at_fn(at: int, metric: str, value: float, layer: str) -> None:
            if log_row is not None:
                log_row(at, metric, layer, value)

        sctx = ScheduledContext(ctx.model, ctx.optimizer, step, final, log_fn, artifact_fn,
                                optimizers=list(ctx.optimizers), batch=ctx.step_batch, log_at_fn=log_at_fn)
        # under torch.distributed every rank agrees on the outcome (diagnostics/_dist.py): a diagnostic that
        # fails on one rank fails on every rank, at the same collective, and no rank waits in one alone
        error: Exception | None = None
        with Agreement() as agreement:
            try:
                run_guarded(self.diagnostic, sctx, close=close)
            except Exception as exc:  # noqa: BLE001 - reported below (or re-raised with on_error="raise")
                error = exc
        outcome = agreement.finish(error)
        if outcome is not None:
            exc = outcome
            # the guard has restored the model: training can go on unchanged, and the failure stays on record
            if self.on_error == "raise":
                raise exc
            log_fn("diagnostic.failed", 1.0, self.name)
            warnings.warn(f"dynascope: {self.name} failed at step {step} ({describe(exc)}); training goes on "
                          f"unchanged and the failure is recorded as 'diagnostic.failed' (pass "
                          f"on_diagnostic_error='raise' to stop instead)", RuntimeWarning, stacklevel=6)
