"""Optimizers and curvature: Adam's diagonal preconditioner, the preconditioned
sharpness, and the stability thresholds of SGD, heavy ball, Nesterov and Adam.

* **Preconditioned sharpness** (Cohen et al. 2022, "Adaptive gradient methods at
  the edge of stability"): lambda_1(P^-1/2 H P^-1/2) = lambda_1(P^-1 H) with
  Adam's P = (1 - beta1^t) (diag(sqrt(v_hat)) + eps), v_hat = v / (1 - beta2^t),
  over the coordinates with a second moment (v > 0): before a coordinate's
  first non-zero gradient Adam has no preconditioner for it (P = eps would
  scale its curvature by ~1e8), so it is left out; before the optimizer's first
  step there is no preconditioned sharpness at all.
* **Thresholds** (Cohen et al. 2021, 2022): GD 2/lr; heavy-ball momentum beta
  (2 + 2 beta)/lr; Nesterov (2 + 2 beta)/((1 + 2 beta) lr); Adam (2 + 2 beta1) /
  ((1 - beta1) lr) for the preconditioned sharpness.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.guard import preserved_state
from . import _dist
from ._batch import Forward, LossFn
from .hvp import Mode, _make_operator
from .lanczos import EigenResult, _check_common, _eigen_on_operator

__all__ = ["adam_preconditioner", "preconditioned_sharpness", "stability_threshold"]


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
            v_hat = _dist.full(st[key]) / (1 - beta2**t)  # FSDP2: the whole state, gathered
            P = v_hat.sqrt() + g["eps"]
            if bias_correction1:
                P = P * (1 - beta1**t)
            out[id(p)] = P
    if not out:
        raise ValueError("the optimizer holds no Adam state yet (call it after the first optimizer.step())")
    return out


def _has_second_moment(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """Per parameter with Adam state (keyed by ``id(param)``): where its second
    moment is non-zero, i.e. where Adam has a preconditioner."""
    out: dict[int, torch.Tensor] = {}
    for g in optimizer.param_groups:
        key = "max_exp_avg_sq" if g.get("amsgrad", False) else "exp_avg_sq"
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if key in st:
                out[id(p)] = _dist.full(st[key]) != 0
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
    Compare with ``stability_threshold(optimizer)`` = (2 + 2 beta1)/((1 - beta1) lr).

    Coordinates whose second moment is still zero (no non-zero gradient yet,
    e.g. embedding rows of tokens not seen in the first steps) have no
    preconditioner: Adam has not moved them and P = eps there is a placeholder
    that would scale their curvature by ~1/eps. They are left out (P^-1/2 = 0 on
    them); a ValueError says when no coordinate has a second moment yet."""
    _check_common(k, tol, "largest")
    model = _dist.unwrap(model)  # DDP: the module's own parameter names
    _dist.checkpoint()  # torch.distributed: every rank is here before the optimizer state is gathered
    P = adam_preconditioner(optimizer, bias_correction1)
    seen = _has_second_moment(optimizer)
    names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in P]
    if not names:
        raise ValueError("none of the model's trainable parameters is in the optimizer's state")
    lookup = dict(model.named_parameters())
    if not any(bool(seen[id(lookup[n])].any()) for n in names):
        raise ValueError("the optimizer has no second moment yet for any parameter (no non-zero gradient so far)")
    with preserved_state(model, params=False, grads=False):
        op = _make_operator(model, loss_fn, batch, names, forward, dtype, mode, seed, cache_graph)
        d = torch.cat([P[id(lookup[n])].reshape(-1) for n in op.names]).to(device=op.device, dtype=torch.float64)
        mask = torch.cat([seen[id(lookup[n])].reshape(-1) for n in op.names]).to(device=op.device)
        d = torch.where(mask, d.rsqrt(), torch.zeros_like(d))

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
