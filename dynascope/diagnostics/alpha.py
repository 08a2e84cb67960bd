"""Cockpit's normalised step length alpha: is the update overshooting the minimum along its direction?

Between a start point w_n and an end point w_{n+1} = w_n + d (one optimizer step), with t = ||d||, both points
observe the loss along the line through d on their own minibatch: the loss f, the variance of the per-example
losses var_f, the directional derivative df = (1/B) sum_i <g_i, d> / t and the variance var_df of the
per-example projections <g_i, d> / t (g_i the gradient of example i's loss; variances with ddof=1). A quadratic
q(x) = mu0 + mu1 x + mu2 x^2 is fitted to the four observations (f(0), f(t), f'(0), f'(t)) by maximum likelihood
with the variances as noise (a zero variance is replaced by 1e-10), and

    alpha = 2 t / alpha_bar - 1,   alpha_bar = -mu1 / mu2   (the step to "the other side" of the parabola)

so alpha = 0: the step went to the minimum along d; alpha = 1: to the other side at the same height; alpha < 0:
short of the minimum; alpha > 1: overshooting. A concave fit (mu2 < 0) gives -1 (still going downhill), as
does a failed fit at t = 0; another failed fit gives NaN.

Source: Cockpit 1.0.2, ``cockpit/quantities/alpha.py`` (``_fit_quadratic``, ``_get_alpha``, the projections
of ``_project_end``: per-example gradients projected on the update, ``np.var(..., ddof=1)``); Schneider,
Dangel & Hennig 2021, "Cockpit: A Practical Debugging Tool for the Training of Deep Neural Networks".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from . import _dist
from ._batch import Forward, LossFn, default_forward

__all__ = ["LineObservation", "line_observation", "fit_quadratic", "alpha_from_fit", "normalized_step_length"]

#: Cockpit's stand-in for a zero variance (and the fit's regulariser)
VAR_FLOOR = 1e-10


@dataclass(frozen=True)
class LineObservation:
    """One point's observations along the update direction: loss ``f`` (mean over the batch), the variance of
    the per-example losses ``var_f``, the directional derivative ``df`` and the variance of the per-example
    directional derivatives ``var_df`` (ddof=1), on ``batch_size`` examples."""

    f: float
    var_f: float
    df: float
    var_df: float
    batch_size: int


def line_observation(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
                     weights: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], *,
                     forward: Forward | None = None, chunk: int = 32) -> LineObservation:
    """Observations at ``weights`` (a value per parameter name; the model's own for the others) along
    ``direction`` (the update d per parameter name: the projections are <g_i, d> / ||d||), per-example
    gradients from ``torch.func`` (``vmap`` of the gradient of one example's loss, ``chunk`` examples at a
    time). ``loss_fn(outputs, targets)`` is the mean loss; the model is evaluated in its current mode and is
    not changed. Under torch.distributed each rank passes its shard of the batch and the per-example losses
    and projections of every rank are gathered: the observation is the concatenated batch's."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("the normalised step length needs (inputs, targets) tensors (examples along dim 0), got "
                        f"({type(inputs).__name__}, {type(targets).__name__})")
    fwd = forward or default_forward
    names = list(direction)
    t = math.sqrt(sum(float(direction[n].double().square().sum()) for n in names))
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in weights}
    frozen.update({n: b for n, b in model.named_buffers()})
    extra = {n: weights[n].detach() for n in weights if n not in direction}
    trained = {n: weights[n].detach() for n in names}
    d = {n: direction[n].detach() for n in names}

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = fwd(lambda *a, **k: functional_call(model, {**frozen, **extra, **p}, a, k), x.unsqueeze(0))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad_and_value(one), in_dims=(None, 0, 0))
    losses, projections = [], []
    n = int(inputs.shape[0])
    for a in range(0, n, chunk):
        grads, loss = per_example(trained, inputs[a:a + chunk], targets[a:a + chunk])
        dots = sum((grads[k].double().reshape(grads[k].shape[0], -1) @ d[k].double().reshape(-1)) for k in names)
        losses.append(loss.detach().double())
        projections.append(dots / t if t > 0 else dots * math.nan)
    ls, pr = torch.cat(losses), torch.cat(projections)
    if _dist.active():  # each rank observed its shard: every rank's per-example values, in rank order
        (rows,) = _dist.gather_rows(torch.stack([ls, pr], 1))
        ls, pr, n = rows[:, 0], rows[:, 1], int(rows.shape[0])
    return LineObservation(float(ls.mean()), _var(ls), float(pr.mean()), _var(pr), n)


def _var(v: torch.Tensor) -> float:
    return float(v.var(correction=1)) if v.numel() > 1 else math.nan


def fit_quadratic(t: float, fs: tuple[float, float], dfs: tuple[float, float], var_fs: tuple[float, float],
                  var_dfs: tuple[float, float]) -> np.ndarray | None:
    """(mu0, mu1, mu2) of q(x) = mu0 + mu1 x + mu2 x^2 from f(0), f(t), q'(0), q'(t) with those noise variances
    (maximum likelihood: Cockpit's ``_fit_quadratic``); None when the normal equations are singular."""
    phi = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]]).T
    variances = [VAR_FLOOR if v == 0 else v for v in (*var_fs, *var_dfs)]
    try:
        lam_inv = np.linalg.inv(np.diag(variances))
        return np.linalg.inv(phi @ lam_inv @ phi.T) @ phi @ lam_inv @ np.array([*fs, *dfs], dtype=np.float64)
    except np.linalg.LinAlgError:
        return None


def alpha_from_fit(mu: np.ndarray | None, t: float) -> float:
    """Cockpit's ``_get_alpha``: 2 t / alpha_bar - 1 with alpha_bar = -mu1 / mu2; -1 for a concave fit (or a
    failed fit at t = 0), NaN for another failed fit."""
    if mu is None:
        return -1.0 if t == 0.0 else math.nan
    if mu[2] < 0:
        return -1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_bar = -mu[1] / mu[2]
        return float(2.0 * t / alpha_bar - 1.0)


def normalized_step_length(start: LineObservation, end: LineObservation, t: float) -> float:
    """alpha of one step of length ``t`` from its start and end observations (module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = fit_quadratic(t, (start.f, end.f), (start.df, end.df), (start.var_f, end.var_f),
                           (start.var_df, end.var_df))
    return alpha_from_fit(mu, t)
