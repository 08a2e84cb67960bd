"""Curvature of the loss: Hessian eigenvalues, trace, spectral density, per-layer
and preconditioned sharpness, and the optimizers' stability thresholds.

The operator is the Hessian of the MEAN loss over the batch (each
``(inputs, targets)`` pair weighted by its size), with respect to the trainable
parameters (or a subset, ``params=``), evaluated in a stated mode (``mode="eval"``
by default, so BatchNorm uses its running statistics and dropout is off: the
operator is deterministic).

How it is computed
------------------
* Hessian-vector products: :mod:`dynascope.diagnostics.hvp` (``HessianOperator``).
* Eigenvalues: :mod:`dynascope.diagnostics.lanczos`.
* **Trace**: Hutchinson, ``tr H = E[z^T H z]`` for Rademacher ``z`` (Hutchinson
  1990; PyHessian, Yao et al. 2020); standard error = sample std / sqrt(n).
  Stops only on ``target_stderr`` (never on the sign or the change of the mean).
* **Spectral density**: stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao
  2019; PyHessian ``density``): per run, Ritz values theta_i and weights
  tau_i = (first component of the i-th eigenvector of T)^2 from ``n_iter``
  Lanczos steps started at a normalized Rademacher vector; density(x) =
  mean over runs of sum_i tau_i N(x; theta_i, sigma^2), sigma^2 = 1e-5 *
  max(1, lambda_max - lambda_min) by default as in PyHessian.
* Preconditioned sharpness and thresholds: :mod:`dynascope.diagnostics.stability`
  (re-exported here).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..core.guard import preserved_state
from ._batch import Forward, LossFn
from .hvp import HessianOperator, Mode, Params, _make_operator
from .lanczos import EigenResult, _check_common, _eigen_on_operator, _lanczos, _progress
from .stability import adam_preconditioner, preconditioned_sharpness, stability_threshold

__all__ = [
    "EigenResult",
    "TraceResult",
    "SpectrumResult",
    "LayerSharpnessResult",
    "HessianOperator",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_spectrum",
    "layer_sharpness",
    "preconditioned_sharpness",
    "adam_preconditioner",
    "stability_threshold",
]


@dataclass
class TraceResult:
    """Hutchinson estimate of tr(H): ``trace`` = mean of z^T H z, ``stderr`` =
    sample std (ddof=1) / sqrt(n_samples); ``samples`` are the z^T H z values."""

    trace: float
    stderr: float
    n_samples: int
    n_hvp: int
    samples: np.ndarray


@dataclass
class SpectrumResult:
    """SLQ spectral density: ``density`` on ``grid`` (integrates to about 1);
    ``nodes``/``weights`` are the Ritz values and quadrature weights per run
    (shape n_runs x n_iter), from which the density is broadened."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma_squared: float
    n_hvp: int
    n_params: int


@dataclass
class LayerSharpnessResult:
    """Top eigenvalue of each diagonal block H_ll (one block per ``group``)."""

    names: list[str]
    eigenvalues: np.ndarray
    converged: np.ndarray
    n_params: np.ndarray
    n_hvp: int


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    tol: float = 1e-4,
    which: Literal["largest", "smallest", "magnitude"] = "largest",
    *,
    params: Params = None,
    forward: Forward | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    method: Literal["lanczos", "eigsh"] = "lanczos",
    atol: float = 0.0,
    cache_graph: bool | None = None,
    progress: bool | None = None,
) -> EigenResult:
    """Top-``k`` eigenvalues of the Hessian of the mean loss over ``batch``.

    Lanczos with full reorthogonalization; stops when each wanted Ritz pair has
    ``||H y - lambda y|| <= max(tol * |lambda|, atol)``, else warns after
    ``max_iter`` (default max(100, 20k)) products. ``which``: "largest"
    (algebraic, descending), "smallest" (algebraic, ascending) or "magnitude".
    ``dtype=torch.float64`` evaluates the model in float64 (no copy of the
    module; parameters are cast into the functional call). ``mode``: "eval"
    (default), "train" or "current". Eigenvectors, when asked, come as one
    ``{parameter name: tensor}`` dict per eigenvalue.
    """
    _check_common(k, tol, which)
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph)
        try:
            return _eigen_on_operator(
                op.matvec, op, k=k, tol=tol, atol=atol, which=which, max_iter=max_iter, seed=seed, method=method,
                return_eigenvectors=return_eigenvectors, progress=progress,
            )
        finally:
            op.release()


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    n_samples: int = 100,
    seed: int = 0,
    target_stderr: float | None = None,
    *,
    min_samples: int = 10,
    params: Params = None,
    forward: Forward | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    cache_graph: bool | None = None,
    progress: bool | None = None,
) -> TraceResult:
    """Hutchinson estimate tr(H) ~ mean_i z_i^T H z_i, z_i Rademacher (seeded).

    Draws at most ``n_samples`` vectors; with ``target_stderr`` it stops as soon
    as at least ``min_samples`` were drawn and the standard error (std with
    ddof=1 over sqrt(n)) is <= target_stderr. It never stops on the sign or the
    relative change of the running mean.
    """
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (a standard error needs two), got {n_samples!r}")
    if target_stderr is not None and not target_stderr > 0:
        raise ValueError(f"target_stderr must be positive or None, got {target_stderr!r}")
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph)
        gen = torch.Generator(device=op.device).manual_seed(int(seed))
        samples: list[float] = []
        bar = None
        if _progress(progress):
            from tqdm.auto import tqdm

            bar = tqdm(total=n_samples, desc="Hutchinson", file=sys.stderr, leave=False)
        try:
            for i in range(n_samples):
                z = torch.randint(0, 2, (op.n,), generator=gen, device=op.device).to(op.dtype) * 2 - 1
                samples.append(float(torch.dot(op.matvec(z).to(torch.float64), z.to(torch.float64))))
                if bar is not None:
                    bar.update(1)
                if target_stderr is not None and i + 1 >= max(2, min_samples):
                    if float(np.std(samples, ddof=1)) / math.sqrt(len(samples)) <= target_stderr:
                        break
        finally:
            op.release()
            if bar is not None:
                bar.close()
    arr = np.asarray(samples)
    return TraceResult(
        trace=float(arr.mean()),
        stderr=float(arr.std(ddof=1) / math.sqrt(len(arr))),
        n_samples=len(arr),
        n_hvp=op.n_hvp,
        samples=arr,
    )


def _gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma2: float) -> np.ndarray:
    dens = np.zeros_like(grid)
    norm = 1.0 / math.sqrt(2 * math.pi * sigma2)
    for th, tau in zip(nodes, weights):
        for t, w in zip(th, tau):
            if w > 0:
                dens += w * norm * np.exp(-((grid - t) ** 2) / (2 * sigma2))
    return dens / len(nodes)


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    n_runs: int = 1,
    n_iter: int = 90,
    seed: int = 0,
    *,
    n_grid: int = 10000,
    sigma_squared: float | None = None,
    params: Params = None,
    forward: Forward | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    cache_graph: bool | None = None,
    progress: bool | None = None,
) -> SpectrumResult:
    """Eigenvalue spectral density by stochastic Lanczos quadrature (Ghorbani et
    al. 2019; PyHessian), Gaussian-broadened with variance ``sigma_squared``
    (default 1e-5 * max(1, range of the Ritz values), as PyHessian). The grid
    extends 6 sigma beyond the extreme Ritz values so the density integrates to
    about 1."""
    if not isinstance(n_runs, (int, np.integer)) or n_runs < 1:
        raise ValueError(f"n_runs must be a positive integer, got {n_runs!r}")
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 2:
        raise ValueError(f"n_iter must be an integer >= 2, got {n_iter!r}")
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph)
        gen = torch.Generator(device=op.device).manual_seed(int(seed))
        m = min(n_iter, op.n)
        nodes = np.zeros((n_runs, m))
        weights = np.zeros((n_runs, m))
        try:
            for r in range(n_runs):
                z = torch.randint(0, 2, (op.n,), generator=gen, device=op.device).to(torch.float64) * 2 - 1
                res = _lanczos(op.matvec, op.n, op.device, k=1, which="largest", tol=1e-12, atol=0.0, max_iter=m,
                               seed=seed + r, progress=_progress(progress), start=z, stop=False)
                mm = len(res["theta"])
                nodes[r, :mm] = res["theta"]
                weights[r, :mm] = res["S"][0, :] ** 2
        finally:
            op.release()
    lo, hi = float(nodes.min()), float(nodes.max())
    sigma2 = sigma_squared if sigma_squared is not None else 1e-5 * max(1.0, hi - lo)
    pad = 6 * math.sqrt(sigma2) + 0.01 * (hi - lo)
    grid = np.linspace(lo - pad, hi + pad, int(n_grid))
    density = _gaussian_density(nodes, weights, grid, sigma2)
    return SpectrumResult(grid=grid, density=density, nodes=nodes, weights=weights, sigma_squared=float(sigma2),
                          n_hvp=op.n_hvp, n_params=op.n)


def _groups(names: list[str], group: str) -> list[tuple[str, list[int]]]:
    if group == "parameter":
        return [(n, [i]) for i, n in enumerate(names)]
    if group != "module":
        raise ValueError(f"group must be 'module' or 'parameter', got {group!r}")
    out: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        out.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(i)
    return list(out.items())


def layer_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    group: Literal["module", "parameter"] = "module",
    tol: float = 1e-3,
    params: Params = None,
    forward: Forward | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    max_iter: int | None = None,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: bool | None = None,
) -> LayerSharpnessResult:
    """Block-diagonal sharpness: lambda_max(H_ll) of the diagonal block of each
    module's parameters (``group="module"``, weight and bias together) or of each
    parameter tensor. The blocks share one retained gradient graph."""
    _check_common(1, tol, "largest")
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph)
        names, vals, conv, sizes = [], [], [], []
        try:
            for gname, idx in _groups(op.names, group):
                sl = [np.arange(op.offsets[j], op.offsets[j + 1]) for j in idx]
                pos = torch.from_numpy(np.concatenate(sl)).to(op.device)
                nb = int(pos.numel())

                def embed(x: torch.Tensor, pos: torch.Tensor = pos) -> torch.Tensor:
                    full = torch.zeros(*x.shape[:-1], op.n, dtype=x.dtype, device=x.device)
                    full[..., pos] = x
                    return full

                def mv(x: torch.Tensor, pos: torch.Tensor = pos, idx: list[int] = idx) -> torch.Tensor:
                    return op.matvec(embed(x.to(op.dtype)), block=idx)[pos]

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    r = _eigen_on_operator(mv, op, k=1, tol=tol, atol=0.0, which="largest", max_iter=max_iter,
                                           seed=seed, method="lanczos", return_eigenvectors=False,
                                           progress=progress, n=nb)
                names.append(gname)
                vals.append(float(r.eigenvalues[0]))
                conv.append(bool(r.converged[0]))
                sizes.append(nb)
        finally:
            op.release()
    if not all(conv):
        bad = [n for n, c in zip(names, conv) if not c]
        warnings.warn(f"layer_sharpness: not converged to tol={tol:g} for {bad}", RuntimeWarning, stacklevel=2)
    return LayerSharpnessResult(names=names, eigenvalues=np.array(vals), converged=np.array(conv),
                                n_params=np.array(sizes), n_hvp=op.n_hvp)
