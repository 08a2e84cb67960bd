"""Data-free checks of weights: what a checkpoint says without any input.

* :func:`weight_norms` -- Frobenius norm ``||W||_F`` of every tensor.
* :func:`singular_values` -- of a weight viewed as a matrix ``W.flatten(1)``
  (one row per output unit; conv kernels ``(out, in, kh, kw)`` become
  ``(out, in*kh*kw)``).
* :func:`stable_rank` -- WeightWatcher's ``||W||_F^2 / sigma_max^2`` (= sum of the
  eigenvalues of ``W^T W`` over the largest). Not the plasticity ``srank``.
* :func:`power_law_alpha` -- WeightWatcher-style exponent ``alpha`` of the tail
  of the empirical spectral density of ``W^T W`` (eigenvalues ``sigma_i^2``):
  continuous power-law maximum-likelihood fit ``alpha = 1 + n / sum_i
  log(lambda_i / xmin)`` over the ``n`` eigenvalues ``>= xmin``, with ``xmin``
  chosen to minimise the Kolmogorov-Smirnov distance between the empirical
  and the fitted tail CDF (Clauset, Shalizi and Newman 2009; what the
  ``powerlaw`` package's ``Fit`` does and WeightWatcher calls). Martin and
  Mahoney read ``alpha`` in [2, 6] as well trained, ``< 2`` as over-fit /
  over-trained, ``> 8`` as a poor fit (random-like layer).
* :func:`angular_change` -- ``arccos(<a, b> / (||a|| ||b||))`` per tensor between
  two state dicts (and ``""`` for all tensors flattened together).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "weight_norms",
    "singular_values",
    "stable_rank",
    "power_law_alpha",
    "PowerLawFit",
    "weight_spectra",
    "WeightSpectrum",
    "angular_change",
    "state_dict_of",
]


def state_dict_of(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors of a model's ``state_dict`` or of a mapping, by name."""
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected an nn.Module or a state dict, got {type(obj).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _parameter_names(obj: nn.Module | Mapping[str, torch.Tensor]) -> set[str] | None:
    if isinstance(obj, nn.Module):
        return {n for n, _ in obj.named_parameters()}
    return None


def weight_norms(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of every floating tensor (parameters only when given a model)."""
    names = _parameter_names(obj)
    return {
        k: float(torch.linalg.vector_norm(v.detach().to(torch.float64)))
        for k, v in state_dict_of(obj).items()
        if names is None or k in names
    }


def singular_values(w: torch.Tensor) -> np.ndarray:
    """Singular values (float64, descending) of ``w.flatten(1)``.

    ``sqrt`` of the eigenvalues of the smaller Gram matrix (``W^T W`` or
    ``W W^T``, float64): the eigenvalues of ``W^T W`` are what the spectral
    statistics need, and ``eigvalsh`` of the Gram matrix is several times faster
    than an SVD. Absolute error of an eigenvalue ~1e-16 * sigma_max^2.
    """
    if w.ndim < 2:
        raise ValueError(f"singular values need a tensor with ndim >= 2, got shape {tuple(w.shape)}")
    m = w.detach().to(torch.float64).flatten(1)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0).cpu().numpy()


def stable_rank(w: torch.Tensor | np.ndarray) -> float:
    """``||W||_F^2 / sigma_max^2`` (WeightWatcher's stable rank); from a weight
    tensor or from its singular values (a 1-D array). NaN for a zero matrix."""
    sv = np.asarray(w, dtype=np.float64) if isinstance(w, np.ndarray) and w.ndim == 1 else singular_values(w)
    if sv.size == 0 or sv.max() <= 0:
        return math.nan
    return float(np.sum(sv**2) / np.max(sv) ** 2)


@dataclass
class PowerLawFit:
    """Tail fit ``p(x) ~ x^-alpha`` for ``x >= xmin``."""

    alpha: float
    xmin: float
    ks: float        # KS distance of the chosen fit
    n_tail: int      # eigenvalues in the tail
    n: int           # eigenvalues in all


def power_law_alpha(eigenvalues: np.ndarray | torch.Tensor, min_tail: int = 5, min_evals: int = 10,
                    xmax: float | None = None) -> PowerLawFit:
    """Fit ``alpha`` to the tail of a spectrum (continuous power-law MLE, ``xmin`` by KS).

    For every candidate ``xmin`` (each distinct eigenvalue leaving at least
    ``min_tail`` values in the tail) ``alpha = 1 + n / sum log(x_i / xmin)`` and
    ``D = max |F_emp(x) - (1 - (x / xmin)^(1 - alpha))|`` over the tail; the fit
    with the smallest ``D`` wins (Clauset et al. 2009). Eigenvalues ``<= 0`` are
    dropped; fewer than ``min_evals`` positive values give ``alpha = NaN``.
    """
    x = np.asarray(eigenvalues.detach().cpu().numpy() if isinstance(eigenvalues, torch.Tensor) else eigenvalues,
                   dtype=np.float64).ravel()
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    if xmax is not None:
        x = x[x <= xmax]
    n_all = int(x.size)
    nan = PowerLawFit(math.nan, math.nan, math.nan, 0, n_all)
    if n_all < max(min_evals, min_tail):
        return nan
    logx = np.log(x)
    # suffix sums of log x: S[i] = sum_{j >= i} log x_j
    suffix = np.cumsum(logx[::-1])[::-1]
    best = nan
    # candidates: first index of each distinct value, leaving >= min_tail points
    starts = np.flatnonzero(np.r_[True, np.diff(x) > 0])
    starts = starts[n_all - starts >= min_tail]
    for i in starts:
        n = n_all - i
        denom = suffix[i] - n * logx[i]
        if denom <= 0:
            continue
        alpha = 1.0 + n / denom
        tail = x[i:]
        model_cdf = 1.0 - (tail / x[i]) ** (1.0 - alpha)
        emp_hi = np.arange(1, n + 1) / n
        emp_lo = np.arange(0, n) / n
        d = float(max(np.max(np.abs(emp_hi - model_cdf)), np.max(np.abs(emp_lo - model_cdf))))
        if not best.ks <= d:  # also true while best.ks is NaN
            best = PowerLawFit(float(alpha), float(x[i]), d, int(n), n_all)
    return best


@dataclass
class WeightSpectrum:
    """Spectral summary of one weight matrix."""

    singular_values: np.ndarray
    stable_rank: float
    alpha: float
    xmin: float
    ks: float
    n_tail: int
    shape: tuple[int, ...]


def weight_spectra(obj: nn.Module | Mapping[str, torch.Tensor], min_evals: int = 10) -> dict[str, WeightSpectrum]:
    """Singular values, stable rank and power-law alpha of every weight with
    ``ndim >= 2`` (parameters only, when given a model)."""
    names = _parameter_names(obj)
    out: dict[str, WeightSpectrum] = {}
    for k, v in state_dict_of(obj).items():
        if v.ndim < 2 or (names is not None and k not in names):
            continue
        sv = singular_values(v)
        fit = power_law_alpha(sv**2, min_evals=min_evals)
        out[k] = WeightSpectrum(sv, stable_rank(sv), fit.alpha, fit.xmin, fit.ks, fit.n_tail, tuple(v.shape))
    return out


def angular_change(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor]
                   ) -> dict[str, float]:
    """Angle in radians between matching tensors of two state dicts.

    ``theta = arccos(<a, b> / (||a|| ||b||))`` per tensor (flattened, float64;
    computed as ``2 atan2(||u - v||, ||u + v||)`` on the unit vectors, exact for tiny angles),
    plus ``""`` for all common tensors concatenated. NaN where a tensor is all
    zero. Tensors present in only one of the two, or with different shapes, are
    left out.
    """
    sa, sb = state_dict_of(a), state_dict_of(b)
    names = _parameter_names(a) or _parameter_names(b)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, va in sa.items():
        vb = sb.get(k)
        if vb is None or vb.shape != va.shape or (names is not None and k not in names):
            continue
        pairs[k] = (va.detach().to(torch.float64).ravel().cpu(), vb.detach().to(torch.float64).ravel().cpu())
    out = {k: _angle(x, y, float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y)))
           for k, (x, y) in pairs.items()}
    if pairs:
        na = math.sqrt(sum(float(x @ x) for x, _ in pairs.values()))
        nb = math.sqrt(sum(float(y @ y) for _, y in pairs.values()))
        if na > 0 and nb > 0:
            diff = math.sqrt(sum(float(torch.sum((x / na - y / nb) ** 2)) for x, y in pairs.values()))
            summ = math.sqrt(sum(float(torch.sum((x / na + y / nb) ** 2)) for x, y in pairs.values()))
            out[""] = 2.0 * math.atan2(diff, summ)
        else:
            out[""] = math.nan
    return out


def _angle(x: torch.Tensor, y: torch.Tensor, nx: float, ny: float) -> float:
    """``2 atan2(||u - v||, ||u + v||)`` with ``u = x/||x||, v = y/||y||``: the
    angle, accurate also when it is tiny (unlike ``arccos`` of the cosine)."""
    if nx <= 0 or ny <= 0:
        return math.nan
    u, v = x / nx, y / ny
    return float(2.0 * math.atan2(float(torch.linalg.vector_norm(u - v)), float(torch.linalg.vector_norm(u + v))))
