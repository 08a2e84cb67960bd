"""Eigenvalues of a symmetric operator given by its products: Lanczos with full
reorthogonalization (default) or ARPACK, with the residual stopping rule.

* **Eigenvalues**: Lanczos with full reorthogonalization (twice, classical
  Gram-Schmidt) of a float64 basis on the parameters' device, Ritz values from
  the tridiagonal matrix (``scipy.linalg.eigh_tridiagonal``). It stops when every
  wanted Ritz pair (theta, y) has residual ``||H y - theta y|| = |beta_m s_m|``
  <= ``tol * |theta|`` (Parlett, *The Symmetric Eigenvalue Problem*, 13.2).
  Measured against ARPACK (``method="eigsh"``, implicitly restarted Lanczos
  over a LinearOperator, same residual criterion): at matched accuracy
  Lanczos needed fewer HVPs (numbers in docs/curvature.md), so it is the
  default; ``method="eigsh"`` stays available.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch

from . import _dist
from .hvp import HessianOperator

__all__ = ["EigenResult", "SHARD_BASIS_BYTES"]

#: under torch.distributed a Lanczos basis whose whole size (its rows x n float64; it grows by doubling) would
#: exceed this is held sharded by coordinates from then on, each rank 1/world of it (per iteration two small
#: all_reduces and one all_gather of the vector more; below it every rank holds the whole basis and the
#: products are the only collectives)
SHARD_BASIS_BYTES = 64 * 2**20


@dataclass
class EigenResult:
    """Eigenvalues (descending for ``which="largest"``, ascending for "smallest",
    by decreasing magnitude for "magnitude"), with per-eigenvalue residual
    ``||H y - lambda y||`` and converged flag (residual <= tol * |lambda|)."""

    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    n_hvp: int
    n_iter: int
    tol: float
    which: str
    method: str
    eigenvectors: list[dict[str, torch.Tensor]] | None = None
    names: list[str] = field(default_factory=list)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))


def _progress(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "largest":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "smallest":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def _lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    device: torch.device,
    *,
    k: int,
    which: str,
    tol: float,
    atol: float,
    max_iter: int,
    seed: int,
    progress: bool,
    start: torch.Tensor | None = None,
    stop: bool = True,
    min_iter: int = 1,
) -> dict[str, Any]:
    """Lanczos with full (twice) reorthogonalization in float64.

    Returns alphas, betas, the basis Q (m x n; under torch.distributed, once the whole basis would exceed
    SHARD_BASIS_BYTES, this rank's columns ``space.lo:space.hi`` of it, ``space`` returned too), Ritz
    values/vectors of T and the residual estimates |beta_m s_mi| of the wanted pairs.

    The current vector ``q``, the previous one and the product ``w`` are whole on every rank (the products are
    reduced across ranks: the same on every rank); a sharded basis is reorthogonalized by its coefficients
    (partial dot products summed across ranks) and the vector rebuilt from the ranks' parts (one all_gather).
    In one process the arithmetic is the unsharded one, operation for operation.
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    m_max = min(int(max_iter), n)
    # the basis grows by doubling: a converging run stays far below max_iter; it is sharded (under
    # torch.distributed) from the growth that takes it above SHARD_BASIS_BYTES, on every rank at the same step
    rows = min(m_max, max(2 * k + 8, 16))
    space = _dist.Slice(n, shard=rows * n * 8 > SHARD_BASIS_BYTES)
    Q = torch.zeros(rows, space.hi - space.lo, dtype=torch.float64, device=device)

    def reorthogonalized(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``w`` minus its projection on the basis, twice (classical Gram-Schmidt)."""
        part = w[space.lo:space.hi] if space.sharded else w
        for _ in range(2):
            part = part - basis.T @ space.coeffs(basis, part)
        return space.full(part)

    if start is None:
        q = torch.randn(n, generator=gen, dtype=torch.float64, device=device)
    else:
        q = start.to(device=device, dtype=torch.float64).clone()
    q /= q.norm()
    q_prev = q  # the previous basis vector, whole (used from the second iteration on)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    result: dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=m_max, desc="Lanczos", file=sys.stderr, leave=False)
    try:
        for j in range(m_max):
            if j == Q.shape[0]:
                rows = min(m_max, 2 * Q.shape[0])
                if not space.sharded and rows * n * 8 > SHARD_BASIS_BYTES:
                    space = _dist.Slice(n)  # from now on this rank's columns only (one process: all of them)
                    Q = Q[:, space.lo:space.hi]
                grown = torch.zeros(rows, space.hi - space.lo, dtype=torch.float64, device=device)
                grown[:j] = Q
                Q = grown
            Q[j] = q[space.lo:space.hi]
            w = matvec(q).to(torch.float64)
            alpha = float(torch.dot(w, q))
            alphas.append(alpha)
            w = w - alpha * q
            if j > 0:
                w = w - betas[-1] * q_prev
            basis = Q[: j + 1]
            w = reorthogonalized(w, basis)
            beta = float(w.norm())
            scale = max(scale, abs(alpha) + beta + (betas[-1] if betas else 0.0))
            if bar is not None:
                bar.update(1)
            m = j + 1
            theta, S = scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas)) if m > 1 else (
                np.array(alphas), np.ones((1, 1)))
            idx = _select(theta, min(k, m), which)
            resid = np.abs(beta * S[-1, idx])
            breakdown = beta <= 1e-12 * max(scale, 1e-300)
            conv = resid <= np.maximum(tol * np.abs(theta[idx]), atol)
            result = dict(alphas=alphas, betas=list(betas), theta=theta, S=S, idx=idx, resid=resid, conv=conv, m=m)
            if m == n:
                result["conv"] = np.ones_like(conv, dtype=bool)
                result["resid"] = np.zeros_like(resid)
                break
            if stop and m >= min_iter and len(idx) >= k and bool(np.all(conv)):
                break
            q_prev = q
            if breakdown:
                # invariant subspace: continue with a fresh random direction
                w = reorthogonalized(torch.randn(n, generator=gen, dtype=torch.float64, device=device), basis)
                q = w / w.norm()
                betas.append(0.0)
            else:
                q = w / beta
                betas.append(beta)
    finally:
        if bar is not None:
            bar.close()
    result["Q"] = Q[: result["m"]]
    result["space"] = space
    return result


def _eigsh(matvec, n, device, *, k, which, tol, max_iter, seed) -> dict[str, Any]:
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def mv(x: np.ndarray) -> np.ndarray:
        y = matvec(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).ravel()).to(device))
        return y.to(torch.float64).cpu().numpy()

    if k >= n:
        raise ValueError(f"method='eigsh' needs k < n (k={k}, n={n}); use method='lanczos'")
    v0 = np.random.default_rng(seed).standard_normal(n)
    w = {"largest": "LA", "smallest": "SA", "magnitude": "LM"}[which]
    op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    try:
        vals, vecs = eigsh(op, k=k, which=w, tol=tol, v0=v0, maxiter=max_iter)
        ok = True
    except ArpackNoConvergence as err:
        vals, vecs, ok = err.eigenvalues, err.eigenvectors, False
    return dict(vals=np.asarray(vals), vecs=np.asarray(vecs), ok=ok)


def _check_common(k: int, tol: float, which: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol!r}")
    if which not in ("largest", "smallest", "magnitude"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")


def _eigen_on_operator(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    op: HessianOperator,
    *,
    k: int,
    tol: float,
    atol: float,
    which: str,
    max_iter: int | None,
    seed: int,
    method: str,
    return_eigenvectors: bool,
    progress: bool | None,
    n: int | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    warn_label: str = "hessian_eigenvalues",
) -> EigenResult:
    n = op.n if n is None else n
    k = min(int(k), n)
    max_iter = max_iter if max_iter is not None else max(100, 20 * k)
    start = op.n_hvp
    if method == "lanczos":
        # a Krylov space of a few vectors can hold a converged Ritz pair of the
        # second eigenvalue before the first one shows up: never stop before
        # max(2k + 4, 12) products (ARPACK uses at least 20 vectors)
        r = _lanczos(matvec, n, op.device, k=k, which=which, tol=tol, atol=atol, max_iter=max_iter, seed=seed,
                     progress=_progress(progress), min_iter=min(n, max(2 * k + 4, 12)))
        idx = r["idx"]
        vals = r["theta"][idx]
        resid = r["resid"]
        conv = r["conv"]
        m = r["m"]
        vecs = None
        if return_eigenvectors:
            S = torch.from_numpy(r["S"][:, idx]).to(r["Q"])
            vecs = (r["Q"].T @ S).T  # k x n (a sharded basis: k x its columns, then each vector rebuilt)
            if r["space"].sharded:
                vecs = torch.stack([r["space"].full(v) for v in vecs])
    elif method == "eigsh":
        r = _eigsh(matvec, n, op.device, k=k, which=which, tol=tol, max_iter=max_iter, seed=seed)
        vals = r["vals"]
        order = _select(vals, len(vals), which)
        vals = vals[order]
        V = torch.from_numpy(r["vecs"][:, order].T.copy()).to(op.device)
        # ARPACK's own test is the same residual criterion; report it exactly
        # only when asked for vectors (it costs k products).
        resid = np.full(len(vals), np.nan)
        conv = np.full(len(vals), r["ok"])
        m = op.n_hvp - start
        vecs = V if return_eigenvectors else None
    else:
        raise ValueError(f"method must be 'lanczos' or 'eigsh', got {method!r}")
    result = EigenResult(
        eigenvalues=np.asarray(vals, dtype=np.float64),
        residuals=np.asarray(resid, dtype=np.float64),
        converged=np.asarray(conv, dtype=bool),
        n_hvp=op.n_hvp - start,
        n_iter=int(m),
        tol=tol,
        which=which,
        method=method,
        names=list(op.names),
    )
    if vecs is not None:
        full = embed(vecs) if embed is not None else vecs
        result.eigenvectors = [
            {name: t.detach().clone() for name, t in zip(op.names, op.split(v.to(op.dtype)))} for v in full
        ]
    if not result.all_converged:
        bad = [i + 1 for i, c in enumerate(result.converged) if not c]
        warnings.warn(
            f"{warn_label}: eigenvalue(s) {bad} not converged to tol={tol:g} after {result.n_hvp} Hessian-vector "
            f"products (residuals {np.array2string(result.residuals, precision=3)}); raise max_iter "
            f"(now {max_iter}) or tol",
            RuntimeWarning,
            stacklevel=3,
        )
    return result
