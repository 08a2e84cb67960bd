"""The public landscape functions: ``loss_landscape``, ``interpolate`` and
``trajectory_plane``."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ...core.guard import preserved_state
from .. import _dist
from .._batch import (
    Forward,
    LossFn,
    model_device_dtype,
    trainable_named_parameters,
)
from .directions import (
    Direction,
    _check_direction,
    _dot,
    _is_filter_weight,
    _norm_param_ids,
    filter_normalized_direction,
)
from .engine import BNPolicy, MetricFn, _choose_method, _Evaluator, _Mover, _progress, _run_points, _saved_bn_momenta
from .grid import _adaptive_grid
from .results import InterpolationResult, LandscapeResult, TrajectoryPlane


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


@_dist.on_gathered  # FSDP2: the whole parameters, plain, for the call
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


@_dist.on_gathered  # FSDP2: the whole parameters, plain, for the call
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


@_dist.on_gathered  # FSDP2: the whole parameters, plain, for the call
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
