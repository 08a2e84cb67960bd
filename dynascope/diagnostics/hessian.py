"""Curvature of the loss: Hessian eigenvalues, trace, spectral density, per-layer
and preconditioned sharpness, and the optimizers' stability thresholds.

The operator is the Hessian of the MEAN loss over the batch (each
``(inputs, targets)`` pair weighted by its size), with respect to the trainable
parameters (or a subset, ``params=``), evaluated in a stated mode (``mode="eval"``
by default, so BatchNorm uses its running statistics and dropout is off: the
operator is deterministic).

How it is computed
------------------
* **Hessian-vector products** (HVPs): the model is called through
  ``torch.func.functional_call`` with detached leaf copies of its parameters
  (cast to ``dtype`` when asked, e.g. float64 for reference checks) and cloned
  buffers, so the caller's parameters, ``.grad`` and buffers are never part of a
  graph and BatchNorm running statistics cannot change. The gradient
  ``g = grad(L, theta, create_graph=True)`` is built once per batch pair and
  kept; each product is then ``H v = grad(g, theta, grad_outputs=v,
  retain_graph=True)`` (double backward over the retained graph). Choice by
  measurement (``benchmarks/bench_hessian.py --hvp``: 94,986-parameter CNN with
  BatchNorm, batch 256, CPU, 2 threads, medians of 10 products, implementations
  interleaved; docs/curvature.md has the table): retained-graph double backward
  130 ms per product on a quiet machine and 1433 ms on a loaded one; recomputing
  forward + gradient each time 123 / 1947 ms; torch.func forward-over-reverse
  ``jvp(grad(f))`` 151 / 2682 ms; ``is_grads_batched`` (8 vectors) 142 / 1745 ms;
  ``torch.func.linearize`` 62 / 1858 ms after a 3.5 / 7.8 s trace. Linearize
  won per product on the quiet run but only pays back its trace after ~50
  products (a top-k call needs 10-40) and lost under load; recomputing tied on
  the quiet run and lost by 1.36x under load. Retained double backward has no
  set-up cost and supports every module autograd does, so it is the default.
  With several batch pairs (``cache_graph=None`` keeps graphs only for one
  pair, to bound memory) each product recomputes forward and gradient per pair.
* **Eigenvalues**: Lanczos with full reorthogonalization (twice, classical
  Gram-Schmidt) of a float64 basis on the parameters' device, Ritz values from
  the tridiagonal matrix (``scipy.linalg.eigh_tridiagonal``). It stops when every
  wanted Ritz pair (theta, y) has residual ``||H y - theta y|| = |beta_m s_m|``
  <= ``tol * |theta|`` (Parlett, *The Symmetric Eigenvalue Problem*, 13.2).
  Measured against ARPACK (``method="eigsh"``, implicitly restarted Lanczos
  over a LinearOperator, same residual criterion): at matched accuracy
  Lanczos needed fewer HVPs (numbers in docs/curvature.md), so it is the
  default; ``method="eigsh"`` stays available.
* **Trace**: Hutchinson, ``tr H = E[z^T H z]`` for Rademacher ``z`` (Hutchinson
  1990; PyHessian, Yao et al. 2020); standard error = sample std / sqrt(n).
  Stops only on ``target_stderr`` (never on the sign or the change of the mean).
* **Spectral density**: stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao
  2019; PyHessian ``density``): per run, Ritz values theta_i and weights
  tau_i = (first component of the i-th eigenvector of T)^2 from ``n_iter``
  Lanczos steps started at a normalized Rademacher vector; density(x) =
  mean over runs of sum_i tau_i N(x; theta_i, sigma^2), sigma^2 = 1e-5 *
  max(1, lambda_max - lambda_min) by default as in PyHessian.
* **Preconditioned sharpness** (Cohen et al. 2022, "Adaptive gradient methods at
  the edge of stability"): lambda_1(P^-1/2 H P^-1/2) = lambda_1(P^-1 H) with
  Adam's P = (1 - beta1^t) (diag(sqrt(v_hat)) + eps), v_hat = v / (1 - beta2^t).
* **Thresholds** (Cohen et al. 2021, 2022): GD 2/lr; heavy-ball momentum beta
  (2 + 2 beta)/lr; Nesterov (2 + 2 beta)/((1 + 2 beta) lr); Adam (2 + 2 beta1) /
  ((1 - beta1) lr) for the preconditioned sharpness.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

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

Params = Iterable[str] | nn.Module | None
Mode = Literal["eval", "train", "current"]


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# the operator
# ---------------------------------------------------------------------------
class _Call(nn.Module):
    """Wrapper so ``functional_call`` also works with a custom ``forward=``."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self._fwd = forward

    def forward(self, inputs: Any) -> Any:  # noqa: D401
        return self._fwd(self.model, inputs)


def _progress(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


class HessianOperator:
    """Hessian of the size-weighted mean loss as a linear operator on flat vectors.

    Build it inside :func:`preserved_state` (the public functions do): it sets the
    model's mode. ``matvec(x)`` takes and returns flat tensors of length ``n`` in
    ``self.dtype`` on ``self.device``; ``n_hvp`` counts products.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: Params = None,
        forward: Forward | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        seed: int = 0,
        cache_graph: bool | None = None,
    ) -> None:
        if mode not in ("eval", "train", "current"):
            raise ValueError(f"mode must be 'eval', 'train' or 'current', got {mode!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.pairs = as_pairs(batch)
        sizes = [batch_size(x) for x, _ in self.pairs]
        total = float(sum(sizes))
        if total <= 0:
            raise ValueError(f"batch holds no samples (sizes {sizes})")
        self.weights = [s / total for s in sizes]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to differentiate")
        chosen = trainable_named_parameters(model, params)
        self.device, model_dtype = model_device_dtype(model)
        self.dtype = dtype or model_dtype
        self._cast = self.dtype if self.dtype != model_dtype else None
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {self.dtype}")
        self.names = [n for n, _ in chosen]
        self.shapes = [p.shape for _, p in chosen]
        self.numels = [p.numel() for _, p in chosen]
        self.offsets = np.concatenate([[0], np.cumsum(self.numels)]).astype(int)
        self.n = int(self.offsets[-1])
        self.n_hvp = 0
        self.seed = seed
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        self._wrapper = _Call(model, forward or default_forward)
        chosen_ids = {id(p) for _, p in chosen}
        # leaves: detached copies the graph attaches to (never the caller's tensors)
        self.leaves = [p.detach().to(self.dtype).requires_grad_(True) for _, p in chosen]
        leaf_of = {id(p): leaf for (_, p), leaf in zip(chosen, self.leaves)}
        self._tensors: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            t = leaf_of[id(p)] if id(p) in chosen_ids else p.detach()
            if id(p) not in chosen_ids and p.is_floating_point():
                t = t.to(self.dtype)
            self._tensors["model." + name] = t
        self._buffer_src = [(name, b) for name, b in model.named_buffers()]
        self.cache_graph = (len(self.pairs) == 1) if cache_graph is None else bool(cache_graph)
        self._graphs: list[tuple[list[torch.Tensor], list[int]]] | None = None
        if self.cache_graph:
            self._graphs = [self._gradient(i) for i in range(len(self.pairs))]

    # -- building blocks ------------------------------------------------------
    def _buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, b in self._buffer_src:
            c = b.detach().clone()
            if c.is_floating_point():
                c = c.to(self.dtype)
            out["model." + name] = c
        return out

    def _loss(self, i: int) -> torch.Tensor:
        inputs, targets = self.pairs[i]
        inputs = move_to(inputs, self.device, self._cast)
        targets = move_to(targets, self.device, self._cast)
        tensors = dict(self._tensors)
        tensors.update(self._buffers())
        torch.manual_seed(self.seed + i)  # dropout in train mode: same mask every product
        # fused attention kernels (flash / memory-efficient) have no double backward
        with sdpa_kernel(SDPBackend.MATH):
            out = functional_call(self._wrapper, tensors, (inputs,))
        loss = self.loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or loss.ndim > 1:
            raise ValueError(
                f"loss_fn must return a scalar (the mean loss of the pair), got a tensor of shape {tuple(loss.shape)}"
            )
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend differentiably on the selected parameters (the forward ran under "
                "torch.no_grad, detached its outputs, or uses none of them)"
            )
        return loss.reshape(())

    def _gradient(self, i: int) -> tuple[list[torch.Tensor], list[int]]:
        """Weighted gradient of pair i with its graph; returns the grads that
        depend on the parameters and their indices (others contribute 0)."""
        loss = self._loss(i) * self.weights[i]
        grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError("the loss does not depend on any of the selected parameters")
        keep = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return [grads[j] for j in keep], keep

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[self.offsets[j] : self.offsets[j + 1]].view(self.shapes[j]) for j in range(len(self.shapes))]

    def flatten(self, parts: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                (torch.zeros(n, device=self.device, dtype=self.dtype) if t is None else t.reshape(-1))
                for t, n in zip(parts, self.numels)
            ]
        )

    def matvec(self, x: torch.Tensor, block: list[int] | None = None) -> torch.Tensor:
        """H x for a flat x (length n). With ``block`` (indices of parameter
        tensors), the product with the diagonal block H_BB: x is read and the
        result written only on those tensors (zeros elsewhere)."""
        x = x.to(device=self.device, dtype=self.dtype)
        xs = self.split(x)
        acc: list[torch.Tensor | None] = [None] * len(self.leaves)
        wanted = set(range(len(self.leaves)) if block is None else block)
        for i in range(len(self.pairs)):
            if self._graphs is not None:
                grads, keep = self._graphs[i]
                retain = True
            else:
                grads, keep = self._gradient(i)
                retain = False
            sel = [(g, j) for g, j in zip(grads, keep) if j in wanted]
            if not sel:
                continue
            inputs = [self.leaves[j] for j in sorted(wanted)]
            hv = torch.autograd.grad(
                [g for g, _ in sel],
                inputs,
                grad_outputs=[xs[j] for _, j in sel],
                retain_graph=retain,
                allow_unused=True,
            )
            for j, h in zip(sorted(wanted), hv):
                if h is None:
                    continue
                acc[j] = h.detach() if acc[j] is None else acc[j] + h.detach()
        self.n_hvp += 1
        return self.flatten(acc)

    def release(self) -> None:
        self._graphs = None


def _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph) -> HessianOperator:
    return HessianOperator(
        model, loss_fn, batch, params=params, forward=forward, dtype=dtype, mode=mode, seed=seed,
        cache_graph=cache_graph,
    )


# ---------------------------------------------------------------------------
# Lanczos
# ---------------------------------------------------------------------------
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

    Returns alphas, betas, the basis Q (m x n), Ritz values/vectors of T and
    the residual estimates |beta_m s_mi| of the wanted pairs.
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    m_max = min(int(max_iter), n)
    # the basis grows by doubling: a converging run stays far below max_iter
    Q = torch.zeros(min(m_max, max(2 * k + 8, 16)), n, dtype=torch.float64, device=device)
    if start is None:
        q = torch.randn(n, generator=gen, dtype=torch.float64, device=device)
    else:
        q = start.to(device=device, dtype=torch.float64).clone()
    q /= q.norm()
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
                grown = torch.zeros(min(m_max, 2 * Q.shape[0]), n, dtype=torch.float64, device=device)
                grown[:j] = Q
                Q = grown
            Q[j] = q
            w = matvec(q).to(torch.float64)
            alpha = float(torch.dot(w, q))
            alphas.append(alpha)
            w = w - alpha * q
            if j > 0:
                w = w - betas[-1] * Q[j - 1]
            basis = Q[: j + 1]
            for _ in range(2):
                w = w - basis.T @ (basis @ w)
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
            if breakdown:
                # invariant subspace: continue with a fresh random direction
                w = torch.randn(n, generator=gen, dtype=torch.float64, device=device)
                for _ in range(2):
                    w = w - basis.T @ (basis @ w)
                q = w / w.norm()
                betas.append(0.0)
            else:
                q = w / beta
                betas.append(beta)
    finally:
        if bar is not None:
            bar.close()
    result["Q"] = Q[: result["m"]]
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


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------
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
            vecs = (r["Q"].T @ S).T  # k x n
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


# ---------------------------------------------------------------------------
# optimizers: preconditioner and thresholds
# ---------------------------------------------------------------------------
def _adam_like(optimizer: torch.optim.Optimizer) -> bool:
    return all("betas" in g and "eps" in g for g in optimizer.param_groups) and isinstance(
        optimizer, (torch.optim.Adam, torch.optim.AdamW)
    )


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, bias_correction1: bool = True
) -> dict[int, torch.Tensor]:
    """Adam's diagonal preconditioner per parameter (keyed by ``id(param)``):
    P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps) (Cohen et al. 2022), so that
    Adam's step is lr * P^-1 m. ``bias_correction1=False`` drops the (1 - beta1^t)
    factor (init2winit's convention; the two agree once beta1^t ~ 0). Uses
    ``max_exp_avg_sq`` under amsgrad."""
    if not _adam_like(optimizer):
        raise TypeError(f"preconditioned sharpness needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    out: dict[int, torch.Tensor] = {}
    for g in optimizer.param_groups:
        beta1, beta2 = g["betas"]
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            key = "max_exp_avg_sq" if g.get("amsgrad", False) else "exp_avg_sq"
            if key not in st or "step" not in st:
                continue
            t = float(st["step"])
            if t < 1:
                continue
            v_hat = st[key].detach() / (1 - beta2**t)
            P = v_hat.sqrt() + g["eps"]
            if bias_correction1:
                P = P * (1 - beta1**t)
            out[id(p)] = P
    if not out:
        raise ValueError("the optimizer holds no Adam state yet (call it after the first optimizer.step())")
    return out


def preconditioned_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    k: int = 1,
    tol: float = 1e-4,
    *,
    bias_correction1: bool = True,
    forward: Forward | None = None,
    dtype: torch.dtype | None = None,
    mode: Mode = "eval",
    max_iter: int | None = None,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: bool | None = None,
) -> EigenResult:
    """Top eigenvalues of P^-1/2 H P^-1/2 (same spectrum as P^-1 H) with Adam's
    preconditioner P from the optimizer's state (:func:`adam_preconditioner`),
    over the model's trainable parameters that the optimizer has state for.
    Compare with ``stability_threshold(optimizer)`` = (2 + 2 beta1)/((1 - beta1) lr)."""
    _check_common(k, tol, "largest")
    P = adam_preconditioner(optimizer, bias_correction1)
    names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in P]
    if not names:
        raise ValueError("none of the model's trainable parameters is in the optimizer's state")
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, names, forward, dtype, mode, seed, cache_graph)
        lookup = dict(model.named_parameters())
        d = torch.cat([P[id(lookup[n])].reshape(-1) for n in op.names]).to(device=op.device, dtype=torch.float64)
        d = d.rsqrt()

        def mv(x: torch.Tensor) -> torch.Tensor:
            return op.matvec((d * x).to(op.dtype)).to(torch.float64) * d

        try:
            return _eigen_on_operator(mv, op, k=k, tol=tol, atol=0.0, which="largest", max_iter=max_iter, seed=seed,
                                      method="lanczos", return_eigenvectors=False, progress=progress,
                                      warn_label="preconditioned_sharpness")
        finally:
            op.release()


def stability_threshold(optimizer: torch.optim.Optimizer) -> float:
    """Largest stable sharpness for the optimizer's current hyper-parameters
    (first param group; a quadratic with curvature above it diverges):

    * SGD: 2 / lr; heavy-ball momentum beta (dampening d): (2 + 2 beta) / (lr (1 - d));
      Nesterov: (2 + 2 beta) / ((1 + 2 beta) lr) (Cohen et al. 2021, appendix).
    * Adam / AdamW: (2 + 2 beta1) / ((1 - beta1) lr), the threshold of the
      preconditioned sharpness (Cohen et al. 2022; 38/lr for beta1 = 0.9).
    """
    groups = optimizer.param_groups
    g = groups[0]
    lr = float(g["lr"])
    if not lr > 0:
        raise ValueError(f"the optimizer's learning rate must be positive, got {lr!r}")
    if len({float(h["lr"]) for h in groups}) > 1:
        warnings.warn("stability_threshold: param groups have different learning rates; using the first group's",
                      RuntimeWarning, stacklevel=2)
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(g.get("momentum", 0.0) or 0.0)
        damp = float(g.get("dampening", 0.0) or 0.0)
        if beta == 0:
            return 2.0 / lr
        if g.get("nesterov", False):
            return (2 + 2 * beta) / ((1 + 2 * beta) * lr)
        return (2 + 2 * beta) / (lr * (1 - damp))
    if _adam_like(optimizer):
        beta1 = float(g["betas"][0])
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    raise TypeError(
        f"no stability threshold known for {type(optimizer).__name__}; supported: SGD (with or without momentum), "
        "Adam, AdamW"
    )
