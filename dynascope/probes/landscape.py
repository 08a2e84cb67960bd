"""Loss landscapes during training: the surface around the weights at chosen
steps, and at the end the PCA plane of the trajectory through weight snapshots
kept along the way (Li et al. 2018), plus the interpolation from the first
snapshot to the final weights (Goodfellow et al. 2015).

Records (see docs/landscape.md):

* artifact ``landscape.surface`` at each due step: ``alphas``, ``losses``
  (and ``betas`` in 2D; ``losses_per_direction`` and the band in 1D), meta with
  seed, direction norms, axis cosine, BN policy, batch size, centre loss;
* scalar ``landscape.center_loss`` at the same steps;
* artifact ``landscape.trajectory`` at close: ``alphas``, ``betas``,
  ``losses``, ``path``, ``path_steps``, ``explained_variance_ratio``;
* artifact ``landscape.interpolation`` at close: ``t``, ``losses`` (meta
  ``step_a``, ``step_b``), and scalar ``landscape.interpolation_barrier``;
  with ``interpolation="consecutive"`` instead at every snapshot, from the
  previous snapshot to the current weights (what ``dynascope analyze
  --interpolate`` records between consecutive checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from ..core.checks import one_of
from ..diagnostics._batch import Forward, LossFn
from ..diagnostics._dist import gathered
from ..diagnostics.landscape import interpolate, loss_landscape, trajectory_plane
from .scheduled import Scheduled, ScheduledContext

__all__ = ["Landscape"]


class Landscape(Scheduled):
    """Scheduled loss-landscape diagnostic.

    ``Landscape(at="end", batch=(x, y), loss_fn=F.cross_entropy)`` draws the 2D
    surface once at the end; ``every=N`` draws it every N steps. Weight
    snapshots (CPU copies of the state dict) are kept every
    ``checkpoint_every`` steps, at most ``keep_checkpoints`` of them: when the
    budget is full every other snapshot is dropped and the interval doubles, so
    the kept ones stay evenly spread over the whole run. At close they give the
    trajectory plane and the interpolation curve (``trajectory=False`` /
    ``interpolation=False`` to skip). ``interpolation="consecutive"``
    interpolates at every snapshot from the previous kept snapshot instead
    (and not at close). ``keep_checkpoints=0`` keeps none.
    """

    name = "landscape"

    def __init__(
        self,
        every: int | None = None,
        at: Sequence[int] | str | None = None,
        *,
        batch: Any,
        loss_fn: LossFn,
        resolution: int = 25,
        dims: int = 2,
        span: float = 1.0,
        seed: int = 0,
        n_directions: int = 1,
        include_bias_bn: bool = False,
        bn_policy: str = "eval",
        forward: Forward | None = None,
        keep_checkpoints: int = 20,
        checkpoint_every: int = 1,
        trajectory: bool = True,
        trajectory_resolution: int | None = None,
        interpolation: bool | Literal["consecutive"] = True,
        progress: bool | None = False,
    ) -> None:
        super().__init__(every=every, at=at)
        if not callable(loss_fn):
            raise TypeError(f"Landscape: loss_fn must be callable, got {type(loss_fn).__name__}")
        if not isinstance(keep_checkpoints, int) or keep_checkpoints < 0:
            raise ValueError(f"Landscape: keep_checkpoints must be an integer >= 0, got {keep_checkpoints!r}")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"Landscape: checkpoint_every must be a positive integer, got {checkpoint_every!r}")
        if dims not in (1, 2):
            raise ValueError(f"Landscape: dims must be 1 or 2, got {dims!r}")
        if not isinstance(resolution, int) or resolution < 2:
            raise ValueError(f"Landscape: resolution must be an integer >= 2, got {resolution!r}")
        if span <= 0:
            raise ValueError(f"Landscape: span must be positive, got {span!r}")
        if interpolation not in (True, False, "consecutive"):
            raise ValueError(f"Landscape: interpolation must be True, False or 'consecutive', got {interpolation!r}")
        one_of("bn_policy", bn_policy, ("eval", "recompute"), "Landscape")
        self.batch = batch
        self.loss_fn = loss_fn
        self.resolution = resolution
        self.dims = dims
        self.span = span
        self.seed = seed
        self.n_directions = n_directions
        self.include_bias_bn = include_bias_bn
        self.bn_policy = bn_policy
        self.forward = forward
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_every = checkpoint_every
        self.trajectory = trajectory
        self.trajectory_resolution = trajectory_resolution or resolution
        self.interpolation = interpolation
        self.progress = progress
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

    # -- scheduling --------------------------------------------------------------
    def _surface_due(self, step: int) -> bool:
        return super().due(step)

    def _snapshot_due(self, step: int) -> bool:
        return self.keep_checkpoints > 0 and step % self.checkpoint_every == 0

    def due(self, step: int) -> bool:
        return self._surface_due(step) or self._snapshot_due(step)

    # -- work --------------------------------------------------------------------
    def _snapshot(self, ctx: ScheduledContext) -> None:
        if self.snapshots and self.snapshots[-1][0] == ctx.step:
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}
        self.snapshots.append((ctx.step, state))
        if len(self.snapshots) > self.keep_checkpoints:
            # Thin: keep every other snapshot (always the first), double the interval.
            self.snapshots = self.snapshots[::2]
            self.checkpoint_every *= 2

    def _interpolation(self, ctx: ScheduledContext, step_a: int, state_a: dict[str, torch.Tensor],
                       step_b: int, state_b: dict[str, torch.Tensor]) -> None:
        curve = interpolate(
            ctx.model, state_a, state_b, self.loss_fn, self.batch,
            n_points=self.trajectory_resolution, bn_policy=self.bn_policy,  # type: ignore[arg-type]
            forward=self.forward, progress=self.progress,
        )
        arrays, meta = curve.to_arrays()
        meta.update(step_a=int(step_a), step_b=int(step_b))
        ctx.save_artifact("landscape.interpolation", arrays, meta)
        ctx.log("landscape.interpolation_barrier", curve.barrier)

    def run(self, ctx: ScheduledContext) -> None:
        # torch.distributed: the global batch (diagnostics/_dist.py); FSDP2: on the whole parameters, gathered
        with gathered(ctx.model):
            self._run(ctx)

    def _run(self, ctx: ScheduledContext) -> None:
        if self._snapshot_due(ctx.step) and not ctx.final:
            prev = self.snapshots[-1] if self.snapshots else None
            self._snapshot(ctx)
            if self.interpolation == "consecutive" and prev is not None and prev[0] != ctx.step:
                current = next((st for s, st in self.snapshots if s == ctx.step), None)
                if current is None:  # thinned away at once: a copy, never the live tensors interpolate writes
                    current = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}
                self._interpolation(ctx, prev[0], prev[1], ctx.step, current)
        if not (self._surface_due(ctx.step) or (ctx.final and self.at_end)):
            return
        res = loss_landscape(
            ctx.model, self.loss_fn, self.batch, dims=self.dims, resolution=self.resolution, span=self.span,
            seed=self.seed, n_directions=self.n_directions, include_bias_bn=self.include_bias_bn,
            bn_policy=self.bn_policy,  # type: ignore[arg-type]
            forward=self.forward, progress=self.progress,
        )
        arrays, meta = res.to_arrays()
        ctx.save_artifact("landscape.surface", arrays, meta)
        ctx.log("landscape.center_loss", res.center_loss)

    def on_close(self, ctx: ScheduledContext) -> None:
        if self.keep_checkpoints == 0 or not (self.trajectory or self.interpolation is True):
            return
        with gathered(ctx.model):
            self._close(ctx)

    def _close(self, ctx: ScheduledContext) -> None:
        # The final weights always end the trajectory.
        state = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}
        snaps = [s for s in self.snapshots if s[0] != ctx.step] + [(ctx.step, state)]
        steps = np.array([s for s, _ in snaps])
        states = [st for _, st in snaps]
        if self.trajectory and len(states) >= 3:
            try:
                plane = trajectory_plane(
                    ctx.model, states, self.loss_fn, self.batch, resolution=self.trajectory_resolution,
                    bn_policy=self.bn_policy,  # type: ignore[arg-type]
                    forward=self.forward, progress=self.progress,
                )
            except ValueError:  # e.g. weights that never moved: no plane to draw; say so in the run
                ctx.log("landscape.trajectory_skipped", 1.0)
            else:
                arrays, meta = plane.to_arrays()
                arrays["path_steps"] = steps
                ctx.save_artifact("landscape.trajectory", arrays, meta)
        if self.interpolation is True and len(states) >= 2:
            self._interpolation(ctx, int(steps[0]), states[0], int(steps[-1]), states[-1])
