"""Loss landscapes: filter-normalized random directions, 1D curves and 2D
surfaces, linear interpolation between checkpoints, and the PCA plane of a
training trajectory.

Definitions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets";
metrics reference section 4):

* Filter-normalized direction: a Gaussian d with, for every weight with
  ``ndim >= 2``, each output unit's row ``d.flatten(1)[i]`` rescaled to the norm
  of the matching weight row: ``d_i <- d_i / ||d_i|| * ||theta_i||``. Biases
  and normalization-layer parameters are zero in the direction unless
  ``include_bias_bn=True``.
* 1D curve ``L(theta + a d)``; 2D surface ``L(theta + a d1 + b d2)`` with
  ``a, b`` on ``numpy.linspace(-span, span, resolution)``.
* Interpolation ``L((1 - t) theta_a + t theta_b)`` (Goodfellow et al. 2015).
* Trajectory plane: the top-2 PCA directions of ``theta_i - theta_final``
  over the kept checkpoints, with the path projected onto the plane.

Evaluation moves the live model's weights in place under ``torch.no_grad``
(one preallocated copy of the centre, no per-point allocation), and restores
the model exactly afterwards (parameters, buffers, modes, ``.grad``, RNG),
also on error (architecture invariant 3).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._guard import preserved_state
from ._batch import (
    Forward,
    LossFn,
    as_pairs,
    batch_size,
    default_forward,
    model_device_dtype,
    move_to,
    trainable_named_parameters,
)

__all__ = [
    "LandscapeResult",
    "InterpolationResult",
    "TrajectoryPlane",
    "filter_normalized_direction",
    "loss_landscape",
    "interpolate",
    "trajectory_plane",
    "NORM_LAYERS",
]

Direction = dict[str, torch.Tensor]
MetricFn = Callable[[Any, Any], "float | torch.Tensor | Mapping[str, float | torch.Tensor]"]
BNPolicy = Literal["eval", "recompute"]

#: Module types whose parameters count as normalization-layer parameters.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Directions
# ---------------------------------------------------------------------------------------------------------------
def _norm_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def _is_filter_weight(p: torch.Tensor, norm_ids: set[int]) -> bool:
    return p.ndim >= 2 and id(p) not in norm_ids


def _row_normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d_i <- d_i / ||d_i|| * ||w_i||`` per row of ``flatten(1)``; zero rows of
    ``w`` (or of ``d``) give zero rows, never a division by zero."""
    work = torch.promote_types(w.dtype, torch.float32)  # float32 at least, float64 for float64 models
    d2 = d.flatten(1).to(work)
    w2 = w.detach().flatten(1).to(work)
    dn = torch.linalg.vector_norm(d2, dim=1, keepdim=True)
    wn = torch.linalg.vector_norm(w2, dim=1, keepdim=True)
    scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
    return (d2 * scale).reshape(d.shape)


def filter_normalized_direction(
    model: nn.Module,
    seed: int | None = 0,
    *,
    generator: torch.Generator | None = None,
    include_bias_bn: bool = False,
    params: Iterable[str] | nn.Module | None = None,
) -> Direction:
    """A random Gaussian direction, filter-normalized as in Li et al. (2018).

    For every trainable weight with ``ndim >= 2`` outside normalization layers,
    each row of ``d.flatten(1)`` (one output unit / filter) is rescaled to the
    norm of the matching row of the weight. Biases, other 1-D parameters and
    normalization-layer parameters are zero unless ``include_bias_bn=True``;
    then each such tensor is rescaled as a whole to the tensor's norm (the
    reference code instead copies the weight itself into the direction).

    The Gaussian is drawn in float32 on the CPU from ``generator`` (or a fresh
    one seeded with ``seed``), one tensor per trainable parameter in model
    order, so the direction is reproducible and the same on every device; it is
    returned on each parameter's device and dtype, keyed by parameter name.
    """
    if generator is None:
        if seed is None:
            raise ValueError("give seed= (an int) or generator= so the direction is reproducible")
        generator = torch.Generator().manual_seed(int(seed))
    norm_ids = _norm_param_ids(model)
    out: Direction = {}
    for name, p in trainable_named_parameters(model, params):
        g = torch.randn(p.shape, generator=generator, dtype=torch.float32)  # drawn for every tensor: stable stream
        g = g.to(device=p.device)
        if _is_filter_weight(p, norm_ids):
            d = _row_normalize(g, p)
        elif include_bias_bn:
            d = _row_normalize(g.reshape(1, -1), p.detach().reshape(1, -1)).reshape(p.shape)
        else:
            d = torch.zeros_like(g)
        out[name] = d.to(dtype=p.dtype)
    return out


def _dot(a: Direction, b: Direction) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in a if k in b))


def _check_direction(model: nn.Module, d: Mapping[str, torch.Tensor], which: str) -> Direction:
    named = dict(model.named_parameters())
    unknown = [k for k in d if k not in named]
    if unknown:
        raise ValueError(f"direction {which} names parameters the model does not have: {unknown[:5]}")
    out: Direction = {}
    for k, v in d.items():
        p = named[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"direction {which}[{k!r}] has shape {shape}, the parameter has {tuple(p.shape)}")
        out[k] = v.detach().to(device=p.device, dtype=p.dtype)
    if not out:
        raise ValueError(f"direction {which} is empty")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation engine
# ---------------------------------------------------------------------------------------------------------------
def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Evaluator:
    """Loss (and metrics) of the model as it is now, on fixed pairs, no autograd."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        forward: Forward | None,
        bn_policy: str,
        metric_fn: MetricFn | None,
    ) -> None:
        if bn_policy not in ("eval", "recompute"):
            raise ValueError(f"bn_policy must be 'eval' or 'recompute', got {bn_policy!r}")
        device, _ = model_device_dtype(model)
        self.model = model
        self.loss_fn = loss_fn
        self.forward = forward or default_forward
        self.pairs = [(move_to(x, device), move_to(y, device)) for x, y in as_pairs(batch)]
        self.sizes = [batch_size(x) for x, _ in self.pairs]
        self.total = float(sum(self.sizes))
        self.weights = [n / self.total for n in self.sizes]
        self.bn_policy = bn_policy
        self.metric_fn = metric_fn
        self.bns = _bn_modules(model) if bn_policy == "recompute" else []

    def prepare(self) -> None:
        """Modes for the whole evaluation (restored by preserved_state)."""
        self.model.eval()
        for m in self.bns:
            m.momentum = None  # cumulative average over the batch's pairs

    def _recompute_bn(self) -> None:
        for m in self.bns:
            m.reset_running_stats()
            m.train()
        for x, _ in self.pairs:
            self.forward(self.model, x)
        for m in self.bns:
            m.eval()

    def __call__(self) -> tuple[torch.Tensor, dict[str, float]]:
        if self.bns:
            self._recompute_bn()
        loss = None
        metrics: dict[str, float] = {}
        for (x, y), w in zip(self.pairs, self.weights):
            out = self.forward(self.model, x)
            value = self.loss_fn(out, y)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar tensor (the mean loss of the pair), got {shape}")
            term = value.detach().reshape(()).double() * w
            loss = term if loss is None else loss + term
            if self.metric_fn is not None:
                m = self.metric_fn(out, y)
                items = m.items() if isinstance(m, Mapping) else [("metric", m)]
                for k, v in items:
                    metrics[k] = metrics.get(k, 0.0) + float(v) * w
        assert loss is not None
        return loss, metrics


def _saved_bn_momenta(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    return [(m, m.momentum) for m in _bn_modules(model)]


def _progress(total: int, progress: bool | None, desc: str) -> Any:
    from tqdm import tqdm  # a stderr bar; tqdm.auto warns in a notebook without ipywidgets

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    # delay: the bar appears only for grids that take more than a few seconds.
    return tqdm(total=total, desc=desc, disable=disable, delay=0 if progress else 3, file=sys.stderr, leave=False)


class _Mover:
    """Sets ``theta = base + sum_k c_k d_k`` in place on the directed parameters."""

    def __init__(self, model: nn.Module, directions: Sequence[Direction]) -> None:
        named = dict(model.named_parameters())
        keys = [k for k in named if any(k in d and bool(d[k].any()) for d in directions)]
        if not keys:
            raise ValueError("every direction is zero on every parameter: nothing to move")
        self.keys = keys
        self.params = [named[k] for k in keys]
        with torch.no_grad():
            self.base = [p.detach().clone() for p in self.params]
        self.dirs = [[d[k] if k in d else torch.zeros_like(named[k]) for k in keys] for d in directions]

    @torch.no_grad()
    def set(self, coeffs: Sequence[float]) -> None:
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(self.params, self.base)
        else:  # pragma: no cover - older torch
            for p, b in zip(self.params, self.base):
                p.copy_(b)
        for c, d in zip(coeffs, self.dirs):
            if c != 0.0:
                torch._foreach_add_(self.params, d, alpha=float(c))

    @torch.no_grad()
    def restore(self) -> None:
        for p, b in zip(self.params, self.base):
            p.copy_(b)


def _evaluate_points_loop(
    mover: _Mover, ev: _Evaluator, points: np.ndarray, bar: Any
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n = len(points)
    device = mover.params[0].device
    out = torch.empty(n, dtype=torch.float64, device=device)
    extras: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for k in range(n):
            mover.set(points[k])
            loss, metrics = ev()
            out[k] = loss
            for name, v in metrics.items():
                extras.setdefault(name, np.full(n, np.nan))[k] = v
            bar.update(1)
    return out.cpu().numpy(), extras


def _evaluate_points_vmap(
    model: nn.Module, mover: _Mover, ev: _Evaluator, points: np.ndarray, chunk: int, bar: Any
) -> np.ndarray:
    """Batched evaluation: ``torch.func.vmap`` over stacked parameter sets
    (``chunk`` grid points per call, one preallocated stack reused)."""
    from torch.func import vmap

    named_params = dict(model.named_parameters())
    named_buffers = dict(model.named_buffers())
    fixed = {k: v for k, v in named_params.items() if k not in mover.keys}
    device = mover.params[0].device
    stacks = [torch.empty((chunk, *b.shape), dtype=b.dtype, device=device) for b in mover.base]
    out = torch.empty(len(points), dtype=torch.float64, device=device)

    def loss_at(stacked: dict[str, torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        values = {**fixed, **named_buffers, **stacked}
        return ev.loss_fn(ev.forward(_Functional(model, values), x), y)

    with torch.no_grad():
        for start in range(0, len(points), chunk):
            pts = points[start:start + chunk]
            c = len(pts)
            coeff = torch.as_tensor(pts, dtype=mover.base[0].dtype, device=device)
            for s, b, *ds in zip(stacks, mover.base, *mover.dirs):
                view = s[:c]
                view.copy_(b.unsqueeze(0).expand_as(view))
                for axis, d in enumerate(ds):
                    shape = (c,) + (1,) * d.ndim
                    view.add_(coeff[:, axis].reshape(shape).to(d.dtype) * d.unsqueeze(0))
            stacked = {k: s[:c] for k, s in zip(mover.keys, stacks)}
            total = None
            for (x, y), w in zip(ev.pairs, ev.weights):
                vals = vmap(loss_at, in_dims=(0, None, None))(stacked, x, y).double() * w
                total = vals if total is None else total + vals
            out[start:start + c] = total
            bar.update(c)
    return out.cpu().numpy()


class _Functional(nn.Module):
    """Wraps ``functional_call`` so user ``forward(model, x)`` callables work under vmap."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_values", values)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self._model, self._values, args, kwargs)


def _choose_method(method: str, ev: _Evaluator, metric_fn: MetricFn | None) -> str:
    """``"loop"``, ``"vmap"`` or ``"measure"`` (time both on the first chunks, keep the faster)."""
    if method not in ("auto", "loop", "vmap", "measure"):
        raise ValueError(f"method must be 'auto', 'loop', 'vmap' or 'measure', got {method!r}")
    if method in ("vmap", "measure"):
        if ev.bn_policy == "recompute":
            raise ValueError(f"method={method!r} needs bn_policy='eval' (recomputing statistics updates buffers "
                             "in place)")
        if metric_fn is not None:
            raise ValueError(f"method={method!r} evaluates the loss only; use method='loop' with metric_fn")
        return method
    # auto: the in-place loop. It is deterministic (the same seed gives bit-identical grids, whichever
    # machine load), supports every option and costs one forward pass per point. vmap over stacked
    # parameters was 1.1-3x slower on CPU in issue 4's measurement but 0.6x the loop in ours on a heavily
    # loaded 2-core machine (docs/landscape.md); it stays opt-in (method="vmap" or "measure").
    return "loop"


def _vmap_or_loop(
    model: nn.Module, mover: _Mover, ev: _Evaluator, points: np.ndarray, chunk: int, bar: Any, warn: bool = True
) -> tuple[np.ndarray, str]:
    try:
        return _evaluate_points_vmap(model, mover, ev, points, chunk, bar), "vmap"
    except Exception as exc:  # vmap cannot trace every model; fall back (and say so when vmap was asked for)
        import warnings

        if warn:
            warnings.warn(f"vmap evaluation failed ({type(exc).__name__}: {exc}); using the loop", stacklevel=4)
        bar.reset(total=bar.total)
        return _evaluate_points_loop(mover, ev, points, bar)[0], "loop"


def _run_points(
    model: nn.Module,
    mover: _Mover,
    ev: _Evaluator,
    points: np.ndarray,
    method: str,
    chunk: int,
    progress: bool | None,
    desc: str,
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """Evaluate ``points`` (rows of coefficients, one per direction); returns the
    losses, per-point metrics and the method actually used."""
    with _progress(len(points), progress, desc) as bar:
        if method == "measure" and len(points) >= 2 * chunk:
            warn = True
            t0 = time.perf_counter()
            first, _ = _evaluate_points_loop(mover, ev, points[:chunk], bar)
            t_loop = time.perf_counter() - t0
            t0 = time.perf_counter()
            second, used = _vmap_or_loop(model, mover, ev, points[chunk:2 * chunk], chunk, bar, warn)
            t_vmap = time.perf_counter() - t0
            if used == "vmap" and t_vmap < t_loop:
                rest, used = _vmap_or_loop(model, mover, ev, points[2 * chunk:], chunk, bar, warn)
            else:
                rest, _ = _evaluate_points_loop(mover, ev, points[2 * chunk:], bar)
                used = "loop"
            return np.concatenate([first, second, rest]), {}, used
        if method == "vmap":  # ("measure" with too few points for a fair trial: the loop)
            losses, used = _vmap_or_loop(model, mover, ev, points, chunk, bar)
            return losses, {}, used
        losses, extras = _evaluate_points_loop(mover, ev, points, bar)
        return losses, extras, "loop"


# ---------------------------------------------------------------------------------------------------------------
# Adaptive 2D grid
# ---------------------------------------------------------------------------------------------------------------
def _adaptive_grid(
    evaluate: Callable[[list[tuple[int, int]]], np.ndarray],
    resolution: int,
    tol: float,
    coarse: int | None,
    known: dict[tuple[int, int], float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Quadtree refinement on the index lattice of the full grid.

    Starts from a coarse lattice (stride ``s``), then for each cell evaluates
    its centre and edge midpoints and compares them with the bilinear
    interpolation of the corners; a cell whose largest error exceeds ``tol``
    times the range of the values seen so far is split into four (those points
    are the children's corners). Unevaluated lattice
    points are filled by linear interpolation on the Delaunay triangulation of
    the evaluated ones. Returns ``(values, evaluated_mask)``.
    """
    from scipy.interpolate import griddata

    R = resolution
    values = np.full((R, R), np.nan)
    done = np.zeros((R, R), dtype=bool)
    for (i, j), v in (known or {}).items():  # points already evaluated (the centre)
        values[i, j] = v
        done[i, j] = True

    def ensure(idx: list[tuple[int, int]]) -> None:
        need = sorted({(i, j) for i, j in idx if not done[i, j]})
        if need:
            vals = evaluate(need)
            for (i, j), v in zip(need, vals):
                values[i, j] = v
                done[i, j] = True

    if coarse is None:
        stride = 1
        while (R - 1) / (stride * 2) >= 4:
            stride *= 2
    else:
        stride = max(1, int(coarse))
    ticks = sorted(set(list(range(0, R, stride)) + [R - 1]))
    ensure([(i, j) for i in ticks for j in ticks])
    cells = [(ticks[a], ticks[a + 1], ticks[b], ticks[b + 1]) for a in range(len(ticks) - 1)
             for b in range(len(ticks) - 1)]
    def probes(i0: int, i1: int, j0: int, j1: int) -> list[tuple[int, int]]:
        im, jm = (i0 + i1) // 2, (j0 + j1) // 2
        return [(im, jm), (im, j0), (im, j1), (i0, jm), (i1, jm)]

    while cells:
        cells = [c for c in cells if c[1] - c[0] >= 2 or c[3] - c[2] >= 2]  # cells with lattice points inside
        ensure([q for c in cells for q in probes(*c)])
        finite = values[done & np.isfinite(values)]
        scale = float(finite.max() - finite.min()) if finite.size else 1.0
        nxt = []
        for i0, i1, j0, j1 in cells:
            err = 0.0
            for i, j in probes(i0, i1, j0, j1):  # centre and edge midpoints against the bilinear patch
                u = (i - i0) / (i1 - i0)
                v = (j - j0) / (j1 - j0)
                bil = ((1 - u) * (1 - v) * values[i0, j0] + u * (1 - v) * values[i1, j0]
                       + (1 - u) * v * values[i0, j1] + u * v * values[i1, j1])
                err = max(err, abs(values[i, j] - bil)) if np.isfinite(bil) else np.inf
            if not np.isfinite(err) or err > tol * scale:
                im, jm = (i0 + i1) // 2, (j0 + j1) // 2
                rows = [(i0, im), (im, i1)] if i1 - i0 >= 2 else [(i0, i1)]
                cols = [(j0, jm), (jm, j1)] if j1 - j0 >= 2 else [(j0, j1)]
                nxt.extend((a0, a1, b0, b1) for a0, a1 in rows for b0, b1 in cols)
        cells = nxt
    if not done.all():
        ii, jj = np.nonzero(done)
        qi, qj = np.nonzero(~done)
        filled = griddata(np.stack([ii, jj], 1), values[ii, jj], np.stack([qi, qj], 1), method="linear")
        values[qi, qj] = filled
    return values, done


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------
def _check_grid_args(dims: int, resolution: int, span: float) -> None:
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    if not isinstance(span, (int, float)) or not math.isfinite(span) or span <= 0:
        raise ValueError(f"span must be a positive finite number, got {span!r}")


def _axis(span: float, resolution: int) -> np.ndarray:
    a = np.linspace(-span, span, resolution)
    if resolution % 2 == 1:
        a[resolution // 2] = 0.0  # the unperturbed model exactly at the centre
    return a


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    dims: int = 2,
    resolution: int = 25,
    span: float = 1.0,
    directions: str | Sequence[Mapping[str, torch.Tensor]] = "filter",
    seed: int = 0,
    *,
    n_directions: int = 1,
    include_bias_bn: bool = False,
    bn_policy: BNPolicy = "eval",
    metric_fn: MetricFn | None = None,
    forward: Forward | None = None,
    params: Iterable[str] | nn.Module | None = None,
    method: Literal["auto", "loop", "vmap", "measure"] = "auto",
    chunk: int = 8,
    adaptive: bool = False,
    adaptive_tol: float = 0.01,
    adaptive_coarse: int | None = None,
    progress: bool | None = None,
) -> LandscapeResult:
    """Loss on a line (``dims=1``) or plane (``dims=2``) through the model's weights.

    ``alphas = betas = numpy.linspace(-span, span, resolution)`` (an odd
    resolution puts the unperturbed model exactly at the centre).
    ``directions="filter"`` draws filter-normalized Gaussian directions from
    ``seed`` (Li et al. 2018); pass a result's ``.directions`` back to reuse
    them (on this or another checkpoint with the same parameter names).
    ``n_directions > 1`` (1D only) draws several lines and reports the band
    min / median / max over them. ``bn_policy="eval"`` evaluates in eval mode
    with the model's running statistics; ``"recompute"`` resets BatchNorm
    statistics and recomputes them on the batch at every point (one extra
    forward pass per point). ``metric_fn(outputs, targets)`` returns a float or
    a dict of floats, recorded per point in ``extra`` (sample-weighted mean
    over the batch's pairs). ``adaptive=True`` (2D) evaluates a quadtree-refined
    subset of the grid and interpolates the rest; ``evaluated`` marks the
    points actually computed. ``method``: ``"loop"`` sets the weights in place
    and runs one forward per point; ``"vmap"`` runs ``chunk`` points per call
    with ``torch.func.vmap`` over stacked parameters (eval policy, loss only);
    ``"measure"`` times both on the first chunks and keeps the faster;
    ``"auto"`` is the loop (deterministic; see docs/landscape.md for the
    measurements); ``result.method`` says which ran. The centre is always
    evaluated by the loop, so ``center_loss`` is exactly the model's loss. The
    model is restored exactly afterwards.
    """
    _check_grid_args(dims, resolution, span)
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive integer, got {n_directions!r}")
    if dims == 2 and n_directions != 1:
        raise ValueError("n_directions > 1 is for dims=1 (a band of random lines); a 2D plane uses two directions")
    if adaptive and dims != 2:
        raise ValueError("adaptive=True refines a 2D grid; use dims=2")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    n_dirs = 2 if dims == 2 else n_directions

    t0 = time.perf_counter()
    if isinstance(directions, str):
        if directions != "filter":
            raise ValueError(f"directions must be 'filter' or a sequence of direction dicts, got {directions!r}")
        gen = torch.Generator().manual_seed(int(seed))
        dirs = [filter_normalized_direction(model, generator=gen, include_bias_bn=include_bias_bn, params=params)
                for _ in range(n_dirs)]
        used_seed: int | None = int(seed)
    else:
        given = list(directions)
        if len(given) != n_dirs:
            raise ValueError(f"dims={dims}, n_directions={n_directions} needs {n_dirs} directions, got {len(given)}")
        dirs = [_check_direction(model, d, str(i)) for i, d in enumerate(given)]
        used_seed = None

    named = dict(model.named_parameters())
    keys = [k for k in named if any(k in d and bool(d[k].any()) for d in dirs)]  # the parameters that move
    weight_norm = math.sqrt(sum(float(named[k].detach().double().pow(2).sum()) for k in keys))
    norms = [math.sqrt(_dot(d, d)) for d in dirs]
    axis_cos = None
    if dims == 2:
        axis_cos = _dot(dirs[0], dirs[1]) / (norms[0] * norms[1]) if norms[0] > 0 and norms[1] > 0 else float("nan")

    alphas = _axis(span, resolution)
    betas = _axis(span, resolution) if dims == 2 else None
    ev = _Evaluator(model, loss_fn, batch, forward, bn_policy, metric_fn)
    chosen = _choose_method(method, ev, metric_fn)
    momenta = _saved_bn_momenta(model)
    mover: _Mover | None = None
    try:
        with preserved_state(model, params=False):
            mover = _Mover(model, dirs)
            try:
                ev.prepare()
                extra: dict[str, np.ndarray] = {}
                evaluated = None
                per_dir = band = None
                mid = resolution // 2 if resolution % 2 == 1 else None  # index of the exact centre, if on the grid
                with torch.no_grad():  # the centre once, by the loop: exactly the model's loss
                    c_loss, c_metrics = ev()
                center = float(c_loss)
                if dims == 1:
                    cols = [i for i in range(resolution) if i != mid]
                    pts = np.zeros((n_dirs * len(cols), n_dirs))
                    for k in range(n_dirs):
                        pts[k * len(cols):(k + 1) * len(cols), k] = alphas[cols]
                    vals, ex, used = _run_points(model, mover, ev, pts, chosen, chunk, progress, "landscape 1D")
                    per_dir = np.empty((n_dirs, resolution))
                    per_dir[:, cols] = vals.reshape(n_dirs, len(cols))
                    for name, v in ex.items():
                        extra[name] = np.empty((n_dirs, resolution))
                        extra[name][:, cols] = v.reshape(n_dirs, len(cols))
                    if mid is not None:
                        per_dir[:, mid] = center
                        for name in extra:
                            extra[name][:, mid] = c_metrics.get(name, np.nan)
                    band = (per_dir.min(0), np.median(per_dir, 0), per_dir.max(0))
                    losses = band[1].copy()
                    n_eval = len(pts) + 1
                elif not adaptive:
                    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
                    keep = np.ones(resolution * resolution, dtype=bool)
                    if mid is not None:
                        keep[mid * resolution + mid] = False  # filled from the centre evaluation
                    pts = np.stack([aa.ravel(), bb.ravel()], 1)[keep]
                    vals, ex, used = _run_points(model, mover, ev, pts, chosen, chunk, progress, "landscape 2D")
                    full = np.full(resolution * resolution, center)
                    full[keep] = vals
                    losses = full.reshape(resolution, resolution)
                    for name, v in ex.items():
                        e = np.full(resolution * resolution, float(c_metrics.get(name, np.nan)))
                        e[keep] = v
                        extra[name] = e.reshape(resolution, resolution)
                    n_eval = len(pts) + 1
                else:
                    used = chosen
                    assert betas is not None

                    def evaluate(idx: list[tuple[int, int]]) -> np.ndarray:
                        nonlocal used
                        p = np.array([[alphas[i], betas[j]] for i, j in idx])
                        v, _, got = _run_points(model, mover, ev, p, used, chunk, False, "")
                        if used == "measure" and len(p) >= 2 * chunk:
                            used = got  # decided once, on the first large enough call
                        return v

                    known = {} if mid is None else {(mid, mid): center}
                    losses, evaluated = _adaptive_grid(evaluate, resolution, adaptive_tol, adaptive_coarse, known)
                    used = "loop" if used == "measure" else used
                    n_eval = int(evaluated.sum()) + (0 if mid is not None else 1)  # + the centre off the grid
            finally:
                mover.restore()
    finally:
        for m, mom in momenta:
            m.momentum = mom
    return LandscapeResult(
        dims=dims,
        alphas=alphas,
        betas=betas,
        losses=losses,
        directions=dirs,
        seed=used_seed,
        direction_norms=norms,
        weight_norm=weight_norm,
        axis_cosine=axis_cos,
        batch_size=int(ev.total),
        bn_policy=bn_policy,
        center_loss=center,
        span=float(span),
        resolution=int(resolution),
        method=used,
        n_evaluations=n_eval,
        losses_per_direction=per_dir,
        band_min=None if band is None else band[0],
        band_median=None if band is None else band[1],
        band_max=None if band is None else band[2],
        extra=extra,
        evaluated=evaluated,
        seconds=time.perf_counter() - t0,
    )


def _state_mismatches(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, Any], which: str) -> list[str]:
    problems = []
    for k in model_sd:
        if k not in sd:
            problems.append(f"{which}: missing {k!r}")
    for k in sd:
        if k not in model_sd:
            problems.append(f"{which}: unexpected {k!r}")
    for k, v in sd.items():
        if k in model_sd and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(model_sd[k].shape)):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            problems.append(f"{which}: {k!r} has shape {shape}, the model has {tuple(model_sd[k].shape)}")
    return problems


def _check_states(model: nn.Module, states: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    model_sd = model.state_dict()
    problems: list[str] = []
    for sd, name in zip(states, names):
        if not isinstance(sd, Mapping):
            raise TypeError(f"{name} must be a state dict (a mapping of names to tensors), got {type(sd).__name__}")
        problems += _state_mismatches(model_sd, sd, name)
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError("state dicts do not match the model: " + "; ".join(problems[:6]) + more)


def interpolate(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    batch: Any,
    n_points: int = 25,
    extend: float = 0.25,
    *,
    bn_policy: BNPolicy = "eval",
    metric_fn: MetricFn | None = None,
    forward: Forward | None = None,
    progress: bool | None = None,
) -> InterpolationResult:
    """Loss along ``theta(t) = (1 - t) theta_a + t theta_b`` (Goodfellow et al. 2015).

    ``n_points`` points lie on ``[0, 1]`` (``t = i / (n_points - 1)``), and the
    same spacing continues for ``round(extend * (n_points - 1))`` points on each
    side, so ``t`` runs from about ``-extend`` to ``1 + extend`` and contains
    0.0 and 1.0 exactly (the two endpoints are the checkpoints bit for bit).
    Buffers: floating-point buffers (BatchNorm running statistics) are
    interpolated with the same ``t``, running variances clamped at 0 when
    extrapolating (``bn_policy="eval"``), or recomputed on the batch at every
    point (``"recompute"``); integer buffers are taken from the nearer endpoint.
    """
    if not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    if not math.isfinite(extend) or extend < 0:
        raise ValueError(f"extend must be a finite number >= 0, got {extend!r}")
    _check_states(model, [state_a, state_b], ["state_a", "state_b"])
    k_ext = int(round(extend * (n_points - 1)))
    idx = np.arange(-k_ext, n_points + k_ext)
    t = idx / (n_points - 1)
    ev = _Evaluator(model, loss_fn, batch, forward, bn_policy, metric_fn)
    sd = model.state_dict(keep_vars=True)
    targets = {k: v for k, v in sd.items()}
    device, _ = model_device_dtype(model)
    a = {k: state_a[k].detach().to(device=targets[k].device, dtype=targets[k].dtype) for k in targets}
    b = {k: state_b[k].detach().to(device=targets[k].device, dtype=targets[k].dtype) for k in targets}
    float_keys = [k for k in targets if targets[k].is_floating_point()]
    other_keys = [k for k in targets if not targets[k].is_floating_point()]
    losses = np.empty(len(t))
    extras: dict[str, np.ndarray] = {}
    momenta = _saved_bn_momenta(model)
    try:
        with preserved_state(model), torch.no_grad(), _progress(len(t), progress, "interpolate") as bar:
            ev.prepare()
            for n, tk in enumerate(t):
                tk = float(tk)
                for k in float_keys:
                    dst = targets[k]
                    dst.copy_(a[k]).mul_(1.0 - tk).add_(b[k], alpha=tk)  # exact at t = 0 and t = 1
                    if k.endswith("running_var") and (tk < 0 or tk > 1):
                        dst.clamp_(min=0)
                for k in other_keys:
                    targets[k].copy_(a[k] if tk < 0.5 else b[k])
                loss, metrics = ev()
                losses[n] = float(loss)
                for name, v in metrics.items():
                    extras.setdefault(name, np.full(len(t), np.nan))[n] = v
                bar.update(1)
    finally:
        for m, mom in momenta:
            m.momentum = mom
    return InterpolationResult(t=t, losses=losses, index_a=k_ext, index_b=k_ext + n_points - 1,
                               batch_size=int(ev.total), bn_policy=bn_policy, extend=k_ext / (n_points - 1),
                               extra=extras)


def trajectory_plane(
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    batch: Any,
    resolution: int = 25,
    *,
    margin: float = 0.2,
    include_bias_bn: bool = True,
    bn_policy: BNPolicy = "eval",
    forward: Forward | None = None,
    method: Literal["auto", "loop", "vmap", "measure"] = "auto",
    chunk: int = 8,
    progress: bool | None = None,
) -> TrajectoryPlane:
    """Loss on the plane of the top-2 principal directions of a trajectory (Li et al. 2018, sec. 7).

    ``states`` are checkpoints in training order (state dicts); the last one is
    the centre. Rows ``theta_i - theta_final`` over the trainable parameters
    (all of them, or only ``ndim >= 2`` weights outside normalization layers
    with ``include_bias_bn=False``) are centred and decomposed (PCA via the
    Gram matrix in float64); the top-2 components ``u1, u2`` span the plane,
    the path is ``((theta_i - theta_final) . u1, (...) . u2)``, and the grid
    covers the path's bounding box widened by ``margin`` of its extent on each
    side. The grid is evaluated with the final checkpoint's buffers (BN running
    statistics) under ``bn_policy``. ``explained_variance_ratio`` is each
    component's share of the total variance of the rows.
    """
    _check_grid_args(2, resolution, 1.0)
    if len(states) < 3:
        raise ValueError(f"trajectory_plane needs at least 3 checkpoints for two PCA directions, got {len(states)}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    _check_states(model, states, [f"states[{i}]" for i in range(len(states))])
    norm_ids = _norm_param_ids(model)
    named = trainable_named_parameters(model)
    keys = [n for n, p in named if include_bias_bn or _is_filter_weight(p, norm_ids)]
    final = states[-1]
    # PCA of the rows theta_i - theta_final through the n x n Gram matrix, accumulated one parameter
    # tensor at a time in float64 on the CPU (never the whole n x P matrix at once).
    def rows_of(k: str) -> torch.Tensor:
        f = final[k].detach().double().cpu().flatten()
        return torch.stack([s[k].detach().double().cpu().flatten() - f for s in states])

    n_states = len(states)
    gram = torch.zeros(n_states, n_states, dtype=torch.float64)
    for k in keys:
        r = rows_of(k)
        r = r - r.mean(0, keepdim=True)
        gram += r @ r.T
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    if float(evals[1]) <= 1e-12 * max(float(evals[0]), 1e-300):  # std ratio 1e-6: numerical noise
        raise ValueError("the checkpoints span fewer than two directions (identical or collinear states)")
    weights = evecs[:, :2] / evals[:2].sqrt()  # component c = centred^T weights[:, c] (orthonormal)
    ratio = (evals[:2] / evals.sum()).numpy()
    pdict = dict(model.named_parameters())
    dirs: list[Direction] = [{}, {}]
    path_t = torch.zeros(n_states, 2, dtype=torch.float64)
    for k in keys:
        r = rows_of(k)
        comp = (r - r.mean(0, keepdim=True)).T @ weights  # (numel, 2)
        path_t += r @ comp
        p = pdict[k]
        for c in range(2):
            dirs[c][k] = comp[:, c].reshape(p.shape).to(device=p.device, dtype=p.dtype)
    path = path_t.numpy()
    lo, hi = path.min(0), path.max(0)
    ext = np.maximum(hi - lo, 1e-12)
    lo, hi = lo - margin * ext, hi + margin * ext
    alphas = np.linspace(lo[0], hi[0], resolution)
    betas = np.linspace(lo[1], hi[1], resolution)

    ev = _Evaluator(model, loss_fn, batch, forward, bn_policy, None)
    chosen = _choose_method(method, ev, None)
    momenta = _saved_bn_momenta(model)
    try:
        with preserved_state(model):
            with torch.no_grad():
                for k, v in model.state_dict(keep_vars=True).items():
                    v.copy_(final[k].detach().to(device=v.device, dtype=v.dtype))
            mover = _Mover(model, dirs)
            ev.prepare()
            with torch.no_grad():
                center = float(ev()[0])
            aa, bb = np.meshgrid(alphas, betas, indexing="ij")
            pts = np.stack([aa.ravel(), bb.ravel()], 1)
            vals, _, _ = _run_points(model, mover, ev, pts, chosen, chunk, progress, "trajectory plane")
    finally:
        for m, mom in momenta:
            m.momentum = mom
    return TrajectoryPlane(alphas=alphas, betas=betas, losses=vals.reshape(resolution, resolution), path=path,
                           explained_variance_ratio=ratio, directions=dirs, center_loss=center,
                           batch_size=int(ev.total), bn_policy=bn_policy, n_checkpoints=len(states))
