"""Gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training").

With the loss a mean over examples, ``G`` the true gradient and ``Sigma`` the
covariance of per-example gradients, the gradient of a batch of ``b`` examples
satisfies ``E |g_b|^2 = |G|^2 + tr(Sigma) / b``. The *simple noise scale*
``B_simple = tr(Sigma) / |G|^2`` predicts the critical batch size: well below
it, doubling the batch halves the number of steps; well above it, a larger
batch buys almost nothing.

The paper's appendix A estimates both from gradient norms at two batch sizes,
``B_small`` and ``B_big``, without per-example gradients. Here the batch of
``B_big = k * b`` examples is split into ``k`` micro-batches of ``b = B_small``
examples; each gives the gradient ``g_i`` of its mean loss (one backward pass
each), and the full-batch gradient is their mean ``g_B = mean_i g_i`` (exact
for a mean loss, no extra backward pass). With ``|G_small|^2 = mean_i |g_i|^2``
and ``|G_big|^2 = |g_B|^2``, the unbiased estimators are

* ``|G|^2   = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)``,
* ``tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)``,
* ``B_simple = tr(Sigma) / |G|^2``.

Standard errors are over the micro-batches, by the delete-one jackknife:
leaving micro-batch ``i`` out gives estimates from ``k - 1`` micro-batches
(``|G_big|^2`` of the remaining ones is ``|k g_B - g_i|^2 / (k - 1)^2``, which
needs ``<g_i, g_B>``: the micro-batch gradients are kept, or recomputed with
the same random state when keeping them would take more than
``KEEP_BYTES``), and ``se^2 = (k - 1) / k * sum_i (theta_(i) - mean theta)^2``.
The standard error of ``B_simple`` is the first-order delta method with the
jackknife covariance of ``tr(Sigma)`` and ``|G|^2``. (The spread of the
per-micro-batch ``|g_i|^2`` alone would miss the noise of ``|G_big|^2``,
which dominates the ``|G|^2`` estimate.) The ratio of two noisy
estimates is itself noisy and heavy-tailed: McCandlish et al. average
``|G|^2`` and ``tr(Sigma)`` over many steps before dividing; over a whole run
both change by orders of magnitude, so the report takes the running median of
the per-step ratios instead (docs/diagnostics.md).
When the ``|G|^2`` estimate is not positive (noise dominates the batch) the
ratio is undefined and ``b_simple`` is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..core.checks import check_mode, set_mode
from ..core.guard import preserved_state, rng_state, set_rng_state
from . import _dist
from ._batch import Forward, LossFn, as_pairs, batch_size, default_forward, take_examples, trainable_named_parameters

__all__ = ["gradient_noise_scale", "NoiseScaleResult", "noise_scale_from_norms", "KEEP_BYTES"]

KEEP_BYTES = 256 * 2**20  # keep the micro-batch gradients below this; above, recompute them once


@dataclass(frozen=True)
class NoiseScaleResult:
    """Estimates of ``|G|^2`` (``grad_sq``), ``tr(Sigma)`` (``trace_cov``) and ``B_simple`` (``b_simple``), their
    standard errors over the micro-batches, and the inputs: ``b_small`` (micro-batch size), ``b_big`` (examples
    used, ``micro_batches * b_small``), ``small_sq`` (mean ``|g_i|^2``) and ``big_sq`` (``|g_B|^2``)."""

    b_simple: float
    grad_sq: float
    trace_cov: float
    b_simple_stderr: float
    grad_sq_stderr: float
    trace_cov_stderr: float
    b_small: int
    b_big: int
    micro_batches: int
    small_sq: float
    big_sq: float


def _estimates(small: np.ndarray | float, big: np.ndarray | float, b: float, big_b: float
               ) -> tuple[np.ndarray, np.ndarray]:
    grad_sq = (big_b * np.asarray(big) - b * np.asarray(small)) / (big_b - b)
    trace = (np.asarray(small) - np.asarray(big)) / (1.0 / b - 1.0 / big_b)
    return grad_sq, trace


def noise_scale_from_norms(micro_sq: np.ndarray | Iterable[float], big_sq: float, b_small: int,
                           dots: np.ndarray | Iterable[float]) -> NoiseScaleResult:
    """The appendix-A estimators from ``k`` micro-batch gradients ``g_i`` of ``b_small`` examples each and their
    mean ``g_B`` (the gradient of all ``k * b_small`` examples): ``micro_sq`` = ``|g_i|^2``, ``big_sq`` =
    ``|g_B|^2`` and ``dots`` = ``<g_i, g_B>`` (for the jackknife standard errors)."""
    n_i = np.asarray(list(micro_sq) if not isinstance(micro_sq, np.ndarray) else micro_sq, dtype=np.float64)
    d_i = np.asarray(list(dots) if not isinstance(dots, np.ndarray) else dots, dtype=np.float64)
    k = n_i.size
    if k < 2:
        raise ValueError(f"the noise scale needs at least 2 micro-batches, got {k}")
    if d_i.shape != n_i.shape:
        raise ValueError(f"dots must have one value per micro-batch ({k}), got {d_i.size}")
    if isinstance(b_small, bool) or not isinstance(b_small, int) or b_small < 1:
        raise ValueError(f"b_small must be an integer >= 1, got {b_small!r}")
    b = float(b_small)
    grad_sq, trace = (float(v) for v in _estimates(n_i.mean(), big_sq, b, k * b))
    if k >= 3:
        # delete-one jackknife: the estimates from the other k - 1 micro-batches
        small_j = (n_i.sum() - n_i) / (k - 1)
        big_j = (k * k * big_sq - 2 * k * d_i + n_i) / (k - 1) ** 2
        g_j, t_j = _estimates(small_j, big_j, b, (k - 1) * b)
        scale = (k - 1) / k
        var_g = scale * float(np.sum((g_j - g_j.mean()) ** 2))
        var_t = scale * float(np.sum((t_j - t_j.mean()) ** 2))
        cov = scale * float(np.sum((g_j - g_j.mean()) * (t_j - t_j.mean())))
    else:  # one micro-batch left out leaves a single one: no two batch sizes to compare
        var_g = var_t = cov = float("nan")
    if grad_sq > 0:
        ratio = trace / grad_sq
        var_r = (var_t - 2 * ratio * cov + ratio**2 * var_g) / grad_sq**2
        se_r = math.sqrt(max(var_r, 0.0)) if math.isfinite(var_r) else float("nan")
    else:
        ratio = se_r = float("nan")
    return NoiseScaleResult(ratio, grad_sq, trace, se_r, math.sqrt(var_g), math.sqrt(var_t), int(b_small),
                            int(k * b_small), k, float(n_i.mean()), float(big_sq))


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    micro_batches: int = 8,
    *,
    params: Any = None,
    forward: Forward | None = None,
    mode: Literal["eval", "train", "current"] = "eval",
) -> NoiseScaleResult:
    """McCandlish et al.'s ``B_simple`` on one ``(inputs, targets)`` batch split into ``micro_batches`` parts.

    ``loss_fn(outputs, targets)`` must be the MEAN loss over its examples (the
    estimators assume it). The micro-batch size is ``len(batch) // micro_batches``;
    the remaining examples are left out (``result.b_big`` says how many were
    used). ``params``: the parameters whose gradient counts (default: every
    trainable one; names, name prefixes or a submodule). ``mode``: "eval"
    (default; BatchNorm uses its running statistics, so every example's loss
    is a function of that example alone, as the estimators assume, and dropout
    is off), "train" (the training-mode gradient: BatchNorm statistics then
    differ between micro-batch and batch) or "current". One backward pass per
    micro-batch (two when ``micro_batches`` gradients take more than
    ``KEEP_BYTES``); the standard errors need ``micro_batches >= 3`` (NaN
    otherwise). The model, its gradients, buffers, modes and the RNG are
    restored.

    Under torch.distributed (DDP) each rank passes its shard of the batch: the
    micro-batch size is ``N // micro_batches`` of the global count ``N``, each
    rank cuts its shard into micro-batches of that size (its remainder left
    out), the full-batch gradient is the mean over every rank's micro-batches
    (one all_reduce of the summed gradients) and the per-micro-batch norms and
    inner products are gathered: one process on the global batch whenever every
    shard is a multiple of the micro-batch size. Under FSDP2 the sharded
    parameters are gathered for the call (one unsharded copy per rank while it
    runs), then the same.
    """
    if not callable(loss_fn):
        raise TypeError(f"gradient_noise_scale: loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
        raise ValueError(f"gradient_noise_scale: micro_batches must be an integer >= 2, got {micro_batches!r}")
    check_mode(mode, "gradient_noise_scale")
    pairs = as_pairs(batch)
    if len(pairs) != 1:
        raise ValueError(f"gradient_noise_scale: give one (inputs, targets) batch to split into micro-batches, got "
                         f"{len(pairs)} pairs")
    inputs, targets = pairs[0]
    n = batch_size(inputs)
    distributed = _dist.active()
    model = _dist.unwrap(model)  # DDP, torch.compile: autograd.grad through the module itself
    if distributed:
        n_all = int(_dist.sum_number(n))
    else:
        n_all = n
    b = n_all // micro_batches
    if b < 1:
        raise ValueError(f"gradient_noise_scale: a batch of {n_all} examples cannot be split into {micro_batches} "
                         "micro-batches")
    k = n // b  # this rank's micro-batches (all of them in one process)
    with _dist.gathered(model):  # FSDP2: the whole parameters, plain, for the duration (diagnostics/_dist.py)
        return _noise_scale(model, loss_fn, inputs, targets, b, k, params, forward or default_forward, mode,
                            distributed)


def _noise_scale(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, b: int, k: int, params: Any,
                 fwd: Forward, mode: str, distributed: bool) -> NoiseScaleResult:
    """gradient_noise_scale's work on this rank's ``k`` micro-batches of ``b`` examples."""
    named = trainable_named_parameters(model, params)
    ps = [p for _, p in named]
    keep = k * sum(p.numel() * p.element_size() for p in ps) <= KEEP_BYTES

    def micro_grads(i: int) -> list[torch.Tensor | None]:
        x = take_examples(inputs, i * b, (i + 1) * b)
        y = take_examples(targets, i * b, (i + 1) * b)
        loss = loss_fn(fwd(model, x), y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("gradient_noise_scale: loss_fn must return a scalar tensor (the mean loss)")
        return [None if g is None else g.detach() for g in torch.autograd.grad(loss, ps, allow_unused=True)]

    with preserved_state(model, params=False), torch.enable_grad():
        set_mode(model, mode)
        total = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
        norms, kept, rngs = [], [], []
        for i in range(k):
            rngs.append(rng_state())
            grads = micro_grads(i)
            norms.append(_sq_norm(grads))
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g.to(torch.float64))
            if keep:
                kept.append(grads)
        k_all = k
        if distributed:  # the mean over every rank's micro-batches: one all_reduce of the summed gradients
            flat = _dist.reduce_sum(lambda: torch.cat([t.reshape(-1) for t in total]))
            total = [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in total]), total)]
            k_all = int(_dist.sum_number(k))
        mean = [t / k_all for t in total]
        dots = []
        for i in range(k):
            if keep:
                grads = kept[i]
            else:  # recompute with the same random state (dropout) rather than hold k gradients
                set_rng_state(rngs[i])
                grads = micro_grads(i)
            dots.append(_dot(grads, mean))
        del kept
        big = _sq_norm(mean)
        stacked = torch.stack([torch.stack(norms), torch.stack(dots)]) if k else torch.zeros(2, 0, dtype=torch.float64)
        (rows,) = _dist.gather_rows(stacked.T.contiguous())  # torch.distributed: every rank's, in rank order
        host = rows.T.cpu().numpy()
    return noise_scale_from_norms(host[0], float(big), b, host[1])


def _sq_norm(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    parts = [t.to(torch.float64).square().sum() for t in tensors if t is not None]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


def _dot(a: list[torch.Tensor | None], b: list[torch.Tensor]) -> torch.Tensor:
    parts = [(x.to(torch.float64) * y).sum() for x, y in zip(a, b) if x is not None]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
