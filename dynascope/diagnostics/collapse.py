"""Neural collapse of the last-layer features (Papyan, Han and Donoho 2020, "Prevalence of neural collapse during
the terminal phase of deep learning training", PNAS).

With features ``h_i`` (one row per example), labels ``y_i`` over ``C`` classes
present in the batch, class means ``mu_c``, the global mean ``mu_G`` (over all
examples) and ``N`` examples:

* ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i}) (h_i - mu_{y_i})^T`` (within-class covariance),
* ``Sigma_B = (1/C) sum_c (mu_c - mu_G) (mu_c - mu_G)^T`` (between-class covariance),
* ``NC1 = tr(Sigma_W Sigma_B^+) / C`` (their Fig. 6: within-class variability
  against between-class separation; tends to 0 as features collapse onto their
  class means);
* ``equinorm = std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G||`` (coefficient of
  variation of the centred class-mean norms, their Fig. 2; 0 when all norms are
  equal);
* ``equiangular = std over pairs c != c' of cos(mu_c - mu_G, mu_c' - mu_G)``
  (their Fig. 3; 0 when every pair meets at the same angle, which for a simplex
  equiangular tight frame is ``-1/(C-1)``);
* ``max_angle = mean over pairs of |cos + 1/(C-1)|`` (their Fig. 4,
  "approach to maximal-angle equiangularity").

Standard deviations are population ones (ddof = 0), as everywhere in
dynascope. The pseudo-inverse keeps the singular values of ``Sigma_B`` above
``max(D, C) * eps * sigma_max`` (``torch.linalg.pinv``'s default); ``Sigma_B``
has rank at most ``C - 1``. It is applied through the thin SVD of the ``D x C``
matrix of centred means, so a wide feature layer costs ``O(N D C)``, never a
``D x D`` matrix. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["neural_collapse", "CollapseResult"]


@dataclass(frozen=True)
class CollapseResult:
    """``nc1``, ``equinorm``, ``equiangular`` and ``max_angle`` of ``n`` examples in ``n_classes`` classes with
    ``dim``-dimensional features; ``class_norms`` are the centred class-mean norms (class order = sorted labels)."""

    nc1: float
    equinorm: float
    equiangular: float
    max_angle: float
    n: int
    n_classes: int
    dim: int
    class_norms: np.ndarray

    def rows(self) -> list[tuple[str, float]]:
        return [("collapse.nc1", self.nc1), ("collapse.equinorm", self.equinorm),
                ("collapse.equiangular", self.equiangular)]


def neural_collapse(features: torch.Tensor, labels: torch.Tensor) -> CollapseResult:
    """NC1, equinorm and equiangularity of ``features`` (``(N, D)``; more dims are flattened) with integer
    ``labels`` (``(N,)``). Needs at least 2 classes in the batch. See the module docstring for the formulas."""
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"neural_collapse: features and labels must be tensors, got {type(features).__name__} and "
                        f"{type(labels).__name__}")
    if features.ndim < 2:
        raise ValueError(f"neural_collapse: features must be (examples, dims), got shape {tuple(features.shape)}")
    h = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    y = labels.detach().reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"neural_collapse: {h.shape[0]} feature rows but {y.shape[0]} labels")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"neural_collapse: labels must be integer classes, got dtype {y.dtype}")
    if not torch.isfinite(h).all():
        raise ValueError("neural_collapse: features contain NaN or inf")
    y = y.to(h.device)
    classes, inv = torch.unique(y, return_inverse=True)
    n_cls = int(classes.numel())
    if n_cls < 2:
        raise ValueError(f"neural_collapse: needs examples of at least 2 classes, got {n_cls}")
    n, d = h.shape
    counts = torch.bincount(inv, minlength=n_cls).to(torch.float64)
    means = torch.zeros(n_cls, d, dtype=torch.float64, device=h.device).index_add_(0, inv, h) / counts[:, None]
    mu_g = h.mean(0)
    m = (means - mu_g).T  # D x C, centred class means
    within = h - means[inv]  # N x D
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    sig_b = s.square() / n_cls  # eigenvalues of Sigma_B on its range
    keep = sig_b > max(d, n_cls) * torch.finfo(torch.float64).eps * sig_b.max()
    if not keep.any():
        nc1 = float("inf")  # all class means coincide: no between-class separation
    else:
        proj = within @ u[:, keep]  # N x r
        # tr(Sigma_W Sigma_B^+) = sum_k (u_k^T Sigma_W u_k) / lambda_k
        nc1 = float((proj.square().sum(0) / n / sig_b[keep]).sum() / n_cls)
    norms = torch.linalg.vector_norm(m, dim=0)
    equinorm = float(norms.std(correction=0) / norms.mean()) if float(norms.mean()) > 0 else float("nan")
    unit = m / norms.clamp_min(torch.finfo(torch.float64).tiny)
    cos = unit.T @ unit
    off = cos[~torch.eye(n_cls, dtype=torch.bool, device=cos.device)]
    equiangular = float(off.std(correction=0))
    max_angle = float((off + 1.0 / (n_cls - 1)).abs().mean())
    return CollapseResult(nc1, equinorm, equiangular, max_angle, int(n), n_cls, int(d), norms.cpu().numpy())
