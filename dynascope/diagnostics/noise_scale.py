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

Standard errors are over the micro-batches: each micro-batch's
``|g_i|^2`` in place of ``|G_small|^2`` gives one estimate of each quantity;
their mean is the estimate and ``std(ddof=1) / sqrt(k)`` its standard error
(the first-order delta method for the ratio). The ratio of two noisy
estimates is itself noisy: McCandlish et al. average ``|G|^2`` and
``tr(Sigma)`` over many steps before dividing, which is what the report does.
When the ``|G|^2`` estimate is not positive (noise dominates the batch) the
ratio is undefined and ``b_simple`` is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._guard import preserved_state
from ._batch import Forward, LossFn, as_pairs, batch_size, default_forward, trainable_named_parameters

__all__ = ["gradient_noise_scale", "NoiseScaleResult", "noise_scale_from_norms"]


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


def noise_scale_from_norms(micro_sq: np.ndarray | Iterable[float], big_sq: float, b_small: int) -> NoiseScaleResult:
    """The appendix-A estimators from the squared norms ``|g_i|^2`` of ``k`` micro-batch gradients (``b_small``
    examples each) and ``|g_B|^2`` of the gradient of all ``k * b_small`` examples."""
    n_i = np.asarray(list(micro_sq) if not isinstance(micro_sq, np.ndarray) else micro_sq, dtype=np.float64)
    k = n_i.size
    if k < 2:
        raise ValueError(f"the noise scale needs at least 2 micro-batches, got {k}")
    if isinstance(b_small, bool) or not isinstance(b_small, int) or b_small < 1:
        raise ValueError(f"b_small must be an integer >= 1, got {b_small!r}")
    b, big = float(b_small), float(k * b_small)
    # one estimate per micro-batch (|g_i|^2 in place of |G_small|^2); their mean is the estimator
    grad_sq_i = (big * big_sq - b * n_i) / (big - b)
    trace_i = (n_i - big_sq) / (1.0 / b - 1.0 / big)
    grad_sq, trace = float(grad_sq_i.mean()), float(trace_i.mean())
    se_g = float(grad_sq_i.std(ddof=1) / math.sqrt(k))
    se_t = float(trace_i.std(ddof=1) / math.sqrt(k))
    if grad_sq > 0:
        ratio = trace / grad_sq
        cov = float(np.cov(trace_i, grad_sq_i, ddof=1)[0, 1]) / k
        var = (se_t**2 - 2 * ratio * cov + ratio**2 * se_g**2) / grad_sq**2
        se_r = math.sqrt(max(var, 0.0))
    else:
        ratio = se_r = float("nan")
    return NoiseScaleResult(ratio, grad_sq, trace, se_r, se_g, se_t, int(b_small), int(k * b_small), k,
                            float(n_i.mean()), float(big_sq))


def _take(obj: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors sliced on dim 0, nested in mappings, tuples, lists)."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.ndim > 0 else obj
    if isinstance(obj, Mapping):
        return {k: _take(v, start, stop) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(v, start, stop) for v in obj)
    return obj


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
    micro-batch; the model, its gradients, buffers, modes and the RNG are
    restored.
    """
    if not callable(loss_fn):
        raise TypeError(f"gradient_noise_scale: loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
        raise ValueError(f"gradient_noise_scale: micro_batches must be an integer >= 2, got {micro_batches!r}")
    if mode not in ("eval", "train", "current"):
        raise ValueError(f"gradient_noise_scale: mode must be 'eval', 'train' or 'current', got {mode!r}")
    pairs = as_pairs(batch)
    if len(pairs) != 1:
        raise ValueError(f"gradient_noise_scale: give one (inputs, targets) batch to split into micro-batches, got "
                         f"{len(pairs)} pairs")
    inputs, targets = pairs[0]
    n = batch_size(inputs)
    b = n // micro_batches
    if b < 1:
        raise ValueError(f"gradient_noise_scale: a batch of {n} examples cannot be split into {micro_batches} "
                         "micro-batches")
    fwd = forward or default_forward
    named = trainable_named_parameters(model, params)
    ps = [p for _, p in named]
    with preserved_state(model, params=False):
        if mode != "current":
            model.train(mode == "train")
        total = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
        norms = []
        with torch.enable_grad():
            for i in range(micro_batches):
                x = _take(inputs, i * b, (i + 1) * b)
                y = _take(targets, i * b, (i + 1) * b)
                loss = loss_fn(fwd(model, x), y)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("gradient_noise_scale: loss_fn must return a scalar tensor (the mean loss)")
                grads = torch.autograd.grad(loss, ps, allow_unused=True)
                sq = torch.zeros((), dtype=torch.float64, device=loss.device)
                for t, g in zip(total, grads):
                    if g is None:
                        continue
                    g64 = g.detach().to(torch.float64)
                    t.add_(g64)
                    sq = sq + g64.square().sum().to(sq.device)
                norms.append(sq)
        big = sum((t.square().sum().cpu() for t in total), torch.zeros((), dtype=torch.float64)) / micro_batches**2
        micro = torch.stack([s.cpu() for s in norms]).numpy()
    return noise_scale_from_norms(micro, float(big), b)
