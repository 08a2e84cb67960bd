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
from collections.abc import Callable
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
    "TraceMethod",
    "operator_trace",
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


TraceMethod = Literal["auto", "exact", "hutch++", "hutchinson"]
TRACE_METHODS = ("auto", "exact", "hutch++", "hutchinson")


@dataclass
class TraceResult:
    """An estimate of tr(H) and the estimator that gave it (``method``).

    * ``"hutchinson"``: ``trace`` = mean of z^T H z over Rademacher z, ``stderr`` =
      sample std (ddof=1) / sqrt(n_samples); ``samples`` are the z^T H z values.
    * ``"hutch++"``: ``trace`` = ``deflated`` + mean of p^T H p, where ``deflated`` =
      tr(Q^T H Q) over an orthonormal basis Q (``rank`` columns) of H S for a
      Rademacher S, and p = (I - Q Q^T) g for Rademacher g; ``samples`` are the
      p^T H p values and ``stderr`` = their std (ddof=1) / sqrt(n_samples): the
      standard error given Q (tr(Q^T H Q) is exact for the Q drawn). ``n_pilot``:
      residual products spent choosing the rank (dropped from the estimate).
    * ``"exact"``: ``trace`` = sum of the Hessian's diagonal (one product with each
      unit vector); ``stderr`` = 0, no samples.

    ``target_reached``: False when a target (absolute or relative standard error)
    was set and the sample budget ran out first."""

    trace: float
    stderr: float
    n_samples: int
    n_hvp: int
    samples: np.ndarray
    method: str = "hutchinson"
    rank: int = 0
    deflated: float = 0.0
    target_reached: bool = True
    n_pilot: int = 0

    @property
    def rel_stderr(self) -> float:
        """``stderr / |trace|`` (inf for a zero trace with a nonzero standard error)."""
        if self.stderr == 0:
            return 0.0
        return self.stderr / abs(self.trace) if self.trace != 0 else math.inf


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


def _rademacher(n: int, m: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(0, 2, (n, m), generator=gen, device=device).to(dtype) * 2 - 1


def _columns(matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def matmat(X: torch.Tensor) -> torch.Tensor:
        return torch.stack([matvec(X[:, j]) for j in range(X.shape[1])], dim=1)

    return matmat


def operator_trace(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    method: Literal["exact", "hutch++", "hutchinson"] = "hutch++",
    n_samples: int = 100,
    seed: int = 0,
    target_stderr: float | None = None,
    target_rel_stderr: float | None = None,
    min_samples: int = 10,
    rank: int | None = None,
    max_rank: int | None = None,
    matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: bool | None = None,
) -> TraceResult:
    """tr(A) of a symmetric operator given by its products (``matvec``: flat length-``n`` tensors in
    ``dtype`` on ``device``; ``matmat`` optional, for the columns of an ``n x m`` matrix at once).

    ``"exact"``: sum over unit vectors of e_i^T A e_i (n products). ``"hutchinson"``: Rademacher
    z^T A z, at most ``n_samples``. ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): Q = an
    orthonormal basis of A S for a Rademacher ``n x rank`` S (``rank`` products), tr(Q^T A Q)
    exactly (``rank`` more), plus Hutchinson on the deflated residual (I - QQ^T) A (I - QQ^T) with
    at most ``n_samples`` vectors. With ``rank=None`` and a target the rank adapts: it starts at 20
    and doubles (up to ``max_rank``, default min(256, 2**26 / n)) while ``min_samples`` pilot
    residual vectors say the residual would need more than twice the deflation's products; the
    pilot vectors are then dropped and the residual drawn afresh. The stochastic estimators stop
    once at least ``min_samples`` were drawn and the standard error is <= ``target_stderr`` or
    <= ``target_rel_stderr * |trace|`` (whichever is larger); with neither they draw
    ``n_samples``. A target missed within the budget gives ``target_reached=False`` and one
    RuntimeWarning.
    """
    if method not in ("exact", "hutch++", "hutchinson"):
        raise ValueError(f"method must be 'exact', 'hutch++' or 'hutchinson', got {method!r}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (a standard error needs two), got {n_samples!r}")
    for label, v in (("target_stderr", target_stderr), ("target_rel_stderr", target_rel_stderr)):
        if v is not None and not v > 0:
            raise ValueError(f"{label} must be positive or None, got {v!r}")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    device = torch.device(device)
    mm = matmat or _columns(matvec)
    n_hvp = 0
    if method == "exact":
        total = 0.0
        step = 32
        for a in range(0, n, step):
            b = min(n, a + step)
            E = torch.zeros(n, b - a, device=device, dtype=dtype)
            E[torch.arange(a, b, device=device), torch.arange(b - a, device=device)] = 1
            HE = mm(E).to(torch.float64)
            total += float(HE[torch.arange(a, b, device=device), torch.arange(b - a, device=device)].sum())
            n_hvp += b - a
        return TraceResult(trace=total, stderr=0.0, n_samples=0, n_hvp=n_hvp, samples=np.zeros(0), method="exact")

    gen = torch.Generator(device=device).manual_seed(int(seed))
    want = target_stderr is not None or target_rel_stderr is not None
    deflated = 0.0
    Q: torch.Tensor | None = None
    samples: list[float] = []

    def stderr_now() -> float:
        return float(np.std(samples, ddof=1)) / math.sqrt(len(samples))

    def tolerance() -> float:
        return max(target_stderr or 0.0, (target_rel_stderr or 0.0) * abs(deflated + float(np.mean(samples))))

    def good_enough() -> bool:
        return len(samples) >= max(2, min_samples) and stderr_now() <= tolerance()

    def residual(m: int) -> None:  # m more samples p^T A p, p = (I - QQ^T) g
        assert Q is not None
        G = _rademacher(n, m, gen, device, torch.float64)
        P = G - Q @ (Q.T @ G)
        AP = mm(P.to(dtype)).to(torch.float64)
        samples.extend((P * AP).sum(0).tolist())

    if method == "hutch++":
        # rank given: that many deflation directions. rank=None: start at 20 and double while the residual
        # would need more than 2x the deflation's products to reach the target (Hutch++'s balance: as many
        # products for the deflation as for the residual), up to max_rank; each round's residual samples
        # only decide the rank and are dropped (the estimate uses fresh draws given the final Q)
        adaptive = rank is None and want
        cap = min(n, int(max_rank) if max_rank is not None else max(20, min(256, 2**26 // max(n, 1))))
        new_cols = min(n, 20 if rank is None else int(rank))
        Q = torch.zeros(n, 0, device=device, dtype=torch.float64)
        while True:
            S = _rademacher(n, new_cols, gen, device, dtype)
            Y = mm(S).to(torch.float64)
            n_hvp += new_cols
            for _ in range(2):  # block Gram-Schmidt against the directions kept so far, twice
                Y = Y - Q @ (Q.T @ Y)
            Qa = torch.linalg.qr(Y)[0]  # orthonormal even where A S is rank-deficient
            AQa = mm(Qa.to(dtype)).to(torch.float64)
            n_hvp += new_cols
            deflated += float((Qa * AQa).sum())
            Q = torch.cat([Q, Qa], dim=1)
            k = Q.shape[1]
            if k >= n:  # Q spans the space: tr(Q^T A Q) is tr(A)
                return TraceResult(trace=deflated, stderr=0.0, n_samples=0, n_hvp=n_hvp, samples=np.zeros(0),
                                   method="hutch++", rank=k, deflated=deflated)
            if not adaptive or k >= cap:
                break
            residual(max(2, min_samples))
            n_hvp += len(samples)
            tol = tolerance()
            needed = (stderr_now() ** 2 * len(samples) / tol**2) if tol > 0 else math.inf
            samples.clear()
            if needed <= 2 * k:
                break
            new_cols = min(k, cap - k)
    k = 0 if Q is None else int(Q.shape[1])
    n_pilot = n_hvp - 2 * k  # residual samples spent choosing the rank
    bar = None
    if _progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_samples, desc=method, file=sys.stderr, leave=False)
    try:
        if Q is None:  # Hutchinson: one vector at a time, the draws of dynascope <= 0.2 (same samples)
            for _ in range(n_samples):
                z = torch.randint(0, 2, (n,), generator=gen, device=device).to(dtype) * 2 - 1
                samples.append(float(torch.dot(matvec(z).to(torch.float64), z.to(torch.float64))))
                if bar is not None:
                    bar.update(1)
                if want and good_enough():
                    break
        else:  # Hutch++'s residual: a batch of min_samples vectors, then batches of 5
            while len(samples) < n_samples:
                m = min(n_samples - len(samples), max(2, min_samples) if not samples else 5)
                residual(m)
                if bar is not None:
                    bar.update(m)
                if want and good_enough():
                    break
    finally:
        if bar is not None:
            bar.close()
    arr = np.asarray(samples)
    n_hvp += len(arr)
    trace = deflated + float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr)))
    reached = not want or good_enough()
    if not reached:
        goal = " / ".join(f"{lab} {v:g}" for lab, v in (("stderr", target_stderr), ("relative stderr",
                          target_rel_stderr)) if v is not None)
        warnings.warn(f"trace ({method}): target {goal} not reached within n_samples={n_samples} (standard error "
                      f"{stderr:.3g}, relative {stderr / abs(trace) if trace else math.inf:.3g}); raise n_samples",
                      RuntimeWarning, stacklevel=3)
    return TraceResult(trace=trace, stderr=stderr, n_samples=len(arr), n_hvp=n_hvp, samples=arr, method=method,
                       rank=k, deflated=deflated, target_reached=reached, n_pilot=n_pilot if Q is not None else 0)


def resolve_trace_method(method: str, n_params: int, exact_max_params: int) -> str:
    """``"auto"`` -> "exact" when ``n_params <= exact_max_params``, else "hutch++"; other names as given."""
    if method not in TRACE_METHODS:
        raise ValueError(f"trace method must be one of {', '.join(TRACE_METHODS)}, got {method!r}")
    if method != "auto":
        return method
    return "exact" if n_params <= exact_max_params else "hutch++"


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    n_samples: int = 100,
    seed: int = 0,
    target_stderr: float | None = None,
    *,
    method: TraceMethod = "auto",
    target_rel_stderr: float | None = None,
    rank: int | None = None,
    max_rank: int | None = None,
    exact_max_params: int = 2048,
    min_samples: int = 10,
    params: Params = None,
    forward: Forward | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    cache_graph: bool | None = None,
    progress: bool | None = None,
) -> TraceResult:
    """tr(H) of the Hessian of the mean loss over ``batch``, by the estimator ``method``.

    ``"auto"`` (default): ``"exact"`` when the selected parameters number at most
    ``exact_max_params``, else ``"hutch++"``. ``"exact"``: the sum of the Hessian's diagonal
    from one product per unit vector (batched). ``"hutch++"`` (Meyer et al. 2021): ``rank``
    products to find the dominant range Q (``rank=None``: from 20, doubled while the residual
    would cost more than the deflation, up to ``max_rank``; see :func:`operator_trace`),
    ``rank`` more for tr(Q^T H Q), then
    Hutchinson on the deflated residual until the standard error is <= ``target_rel_stderr``
    (default 0.02 for Hutch++) times |trace| or ``target_stderr``, within ``n_samples`` residual
    vectors. ``"hutchinson"``: tr H ~ mean_i z_i^T H z_i, z_i Rademacher (seeded), at most
    ``n_samples`` vectors, stopping once at least ``min_samples`` were drawn and a given target
    is met (never on the sign or the relative change of the running mean): the draws and results
    of dynascope <= 0.2's ``hessian_trace`` for the same arguments.
    ``result.method`` names the estimator used.
    """
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (a standard error needs two), got {n_samples!r}")
    if target_stderr is not None and not target_stderr > 0:
        raise ValueError(f"target_stderr must be positive or None, got {target_stderr!r}")
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRACE_METHODS)}, got {method!r}")
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph)
        chosen = resolve_trace_method(method, op.n, exact_max_params)
        rel = target_rel_stderr
        if rel is None and chosen == "hutch++":
            rel = 0.02
        try:
            res = operator_trace(op.matvec, op.n, method=chosen, n_samples=n_samples, seed=seed,  # type: ignore[arg-type]
                                 target_stderr=target_stderr, target_rel_stderr=rel, min_samples=min_samples,
                                 rank=rank, max_rank=max_rank, matmat=op.matmat, device=op.device, dtype=op.dtype,
                                 progress=progress)
        finally:
            op.release()
    res.n_hvp = op.n_hvp
    return res


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
