"""Scheduled diagnostics: run a (possibly expensive) diagnostic every N steps
or at chosen steps, under the state guard, and record its results.

A scheduled diagnostic subclasses :class:`Scheduled` and implements
``run(ctx)``; the session calls it when ``due(step)`` is true (and once more at
the end of the run when ``at="end"``), inside
:func:`dynascope.core.guard.preserved_state`, so training continues bit-identically
(architecture invariant 3). ``run`` writes through the context:

* ``ctx.log(metric, value, layer="")`` for scalar rows,
* ``ctx.save_artifact(name, arrays, meta)`` for array artifacts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import positive_int
from ..core.guard import preserved_state

__all__ = ["Scheduled", "ScheduledContext", "run_guarded"]


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

    def __post_init__(self) -> None:
        if not self.optimizers and self.optimizer is not None:
            self.optimizers = [self.optimizer]

    def log(self, metric: str, value: float, layer: str = "") -> None:
        self.log_fn(metric, float(value), layer)

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


def run_guarded(diag: Scheduled, ctx: ScheduledContext, *, close: bool = False) -> None:
    """``diag.run(ctx)`` (or ``diag.on_close(ctx)`` with ``close=True``) under the
    state guard and with autograd on: how a scheduled diagnostic runs, at a due
    step of a live run or on a checkpoint in ``dynascope analyze``."""
    with preserved_state(ctx.model), torch.enable_grad():
        if close:
            diag.on_close(ctx)
        else:
            diag.run(ctx)
