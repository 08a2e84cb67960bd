"""Result dataclasses of the loss-landscape diagnostics (curves, surfaces,
interpolations, trajectory planes) and their artifact form (``to_arrays``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .directions import Direction


@dataclass
class LandscapeResult:
    """A 1D curve or 2D surface of the loss around the model's weights.

    ``losses[i]`` is the loss at ``theta + alphas[i] d1`` (1D; the median over
    directions when ``n_directions > 1``, each direction's curve is a row of
    ``losses_per_direction``), and ``losses[i, j]`` the loss at
    ``theta + alphas[i] d1 + betas[j] d2`` (2D): the FIRST axis runs along
    ``d1``. To draw it with ``alphas`` on the x axis, pass ``losses.T`` to
    ``contour(alphas, betas, ...)``.
    """

    dims: int
    alphas: np.ndarray
    betas: np.ndarray | None
    losses: np.ndarray
    directions: list[Direction]
    seed: int | None
    direction_norms: list[float]
    weight_norm: float
    axis_cosine: float | None
    batch_size: int
    bn_policy: str
    center_loss: float
    span: float
    resolution: int
    method: str
    n_evaluations: int
    losses_per_direction: np.ndarray | None = None
    band_min: np.ndarray | None = None
    band_median: np.ndarray | None = None
    band_max: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    evaluated: np.ndarray | None = None
    seconds: float = 0.0

    @property
    def coords(self) -> tuple[np.ndarray, ...]:
        """``(alphas,)`` in 1D, ``(alphas, betas)`` in 2D."""
        return (self.alphas,) if self.betas is None else (self.alphas, self.betas)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able metadata for :meth:`RunStore.write_artifact`."""
        arrays: dict[str, np.ndarray] = {"alphas": self.alphas, "losses": self.losses}
        if self.betas is not None:
            arrays["betas"] = self.betas
        for name in ("losses_per_direction", "band_min", "band_median", "band_max", "evaluated"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value)
        for k, v in self.extra.items():
            arrays[f"extra.{k}"] = v
        meta = {
            "dims": self.dims,
            "seed": self.seed,
            "direction_norms": self.direction_norms,
            "weight_norm": self.weight_norm,
            "axis_cosine": self.axis_cosine,
            "batch_size": self.batch_size,
            "bn_policy": self.bn_policy,
            "center_loss": self.center_loss,
            "span": self.span,
            "resolution": self.resolution,
            "method": self.method,
            "n_evaluations": self.n_evaluations,
            "n_directions": len(self.directions) if self.dims == 1 else 2,
        }
        return arrays, meta


@dataclass
class InterpolationResult:
    """``losses[k]`` is the loss at ``(1 - t[k]) theta_a + t[k] theta_b``;
    ``t`` contains 0.0 and 1.0 exactly (indices ``index_a`` and ``index_b``)."""

    t: np.ndarray
    losses: np.ndarray
    index_a: int
    index_b: int
    batch_size: int
    bn_policy: str
    extend: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def loss_a(self) -> float:
        return float(self.losses[self.index_a])

    @property
    def loss_b(self) -> float:
        return float(self.losses[self.index_b])

    @property
    def barrier(self) -> float:
        """Loss barrier of the segment: the largest loss for t in [0, 1] minus the
        larger of the two endpoint losses (Frankle et al. 2020); 0 when the loss
        never rises above the endpoints."""
        return float(np.max(self.losses[self.index_a:self.index_b + 1]) - max(self.loss_a, self.loss_b))

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"t": self.t, "losses": self.losses, **{f"extra.{k}": v for k, v in self.extra.items()}}
        meta = {"batch_size": self.batch_size, "bn_policy": self.bn_policy, "extend": self.extend,
                "index_a": self.index_a, "index_b": self.index_b}
        return arrays, meta


@dataclass
class TrajectoryPlane:
    """Loss on the plane of the top-2 PCA directions of ``theta_i - theta_final``.

    ``losses[i, j]`` is at ``theta_final + alphas[i] u1 + betas[j] u2`` (u1, u2
    orthonormal); ``path[k] = (<theta_k - theta_final, u1>, <..., u2>)``, so the
    final checkpoint sits at (0, 0).
    """

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    path: np.ndarray
    explained_variance_ratio: np.ndarray
    directions: list[Direction]
    center_loss: float
    batch_size: int
    bn_policy: str
    n_checkpoints: int

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"alphas": self.alphas, "betas": self.betas, "losses": self.losses, "path": self.path,
                  "explained_variance_ratio": self.explained_variance_ratio}
        meta = {"center_loss": self.center_loss, "batch_size": self.batch_size, "bn_policy": self.bn_policy,
                "n_checkpoints": self.n_checkpoints,
                "explained_variance_ratio": [float(v) for v in self.explained_variance_ratio]}
        return arrays, meta
