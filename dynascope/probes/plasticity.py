"""Scheduled plasticity probe: dead / dormant units, feature rank and weight
magnitude from one extra forward pass on a fixed probe batch.

Recorded per selected layer (module name): ``plasticity.dead`` (fraction of
units zero on every example and position), ``plasticity.dormant`` (fraction of
Sokar et al.'s tau-dormant units), ``plasticity.erank`` (Roy-Vetterli effective
rank, L1-normalised singular values), ``plasticity.srank`` (Kumar et al.
srank_delta); and ``weight.magnitude`` (mean |theta|) per module that owns
parameters plus layer ``""`` for the whole network. See
:mod:`dynascope.diagnostics.plasticity` for the formulas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..core.checks import check_mode
from ..diagnostics._batch import _is_pair
from ..diagnostics._dist import unwrap
from ..diagnostics.plasticity import LayerSpec, plasticity_metrics, select_modules
from .scheduled import Scheduled, ScheduledContext

__all__ = ["Plasticity"]


class Plasticity(Scheduled):
    """Run the plasticity metrics every ``every`` steps (and/or ``at`` steps).

    ``batch``: the fixed probe inputs (a tensor, a mapping for Hugging Face
    style models, or an ``(inputs, targets)`` pair whose targets are ignored).
    ``layers``: None (every activation module), module types or name patterns.
    ``tau``: dormant threshold; ``delta``: srank threshold; ``mode``: the
    train/eval mode of the probe pass (default ``"eval"``; restored afterwards).
    """

    name = "plasticity"

    def __init__(
        self,
        every: int | None = None,
        batch: Any = None,
        layers: LayerSpec = None,
        tau: float = 0.025,
        delta: float = 0.01,
        at: Sequence[int] | str | None = None,
        mode: str = "eval",
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        super().__init__(every=every, at=at)
        if batch is None:
            raise ValueError("Plasticity: batch= is required (a fixed batch of probe inputs)")
        if tau < 0:
            raise ValueError(f"Plasticity: tau must be >= 0, got {tau!r}")
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"Plasticity: delta must be in [0, 1), got {delta!r}")
        check_mode(mode, "Plasticity", ("eval", "train"))
        self.inputs = batch[0] if _is_pair(batch) else batch
        self.layers = layers
        self.tau = tau
        self.delta = delta
        self.mode = mode
        self.forward = forward
        self._checked: int | None = None

    def run(self, ctx: ScheduledContext) -> None:
        if self._checked != id(ctx.model):
            select_modules(unwrap(ctx.model), self.layers)  # fail early with a clear message
            self._checked = id(ctx.model)
        res = plasticity_metrics(ctx.model, self.inputs, layers=self.layers, tau=self.tau, delta=self.delta,
                                 mode=self.mode, forward=self.forward)
        for metric, value, layer in res.rows():
            ctx.log(metric, value, layer)
