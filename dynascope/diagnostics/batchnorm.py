"""BatchNorm: the statistics of the batch a BatchNorm layer normalises against
its running statistics, and the train/eval loss gap they cause.

For a BatchNorm module in train mode with per-channel batch mean ``mu_B,c``
and variance ``var_B,c`` (ddof=0: the variance BatchNorm normalises with) of
its INPUT, and its running statistics ``running_mean_c``, ``running_var_c``
BEFORE this forward pass updates them:

* ``bn.mean_shift`` = mean_c |mu_B,c - running_mean_c| / sqrt(running_var_c + eps)
  (the batch-mean offset in units of the running standard deviation: what an
  eval-mode forward of the same batch would see as a shift);
* ``bn.var_ratio``  = mean_c var_B,c / (running_var_c + eps)
  (1 when the running variance matches the batch; far from 1 after a
  distribution shift or with very small batches).

These explain train/eval gaps and small-batch or shifted-data failures
(Ioffe 2017, Batch Renormalization; Yao et al. 2021, PowerNorm / Shen et al.
2020; test-time BN adaptation, Schneider et al. 2020 and Nado et al. 2020).

:func:`train_eval_gap`: loss of a fixed batch in eval mode (running
statistics) minus its loss with the BatchNorm modules using batch statistics
(every other module in eval mode, so dropout does not blur the comparison);
the model, its running statistics and the RNG are restored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.guard import preserved_state
from . import _dist
from ._batch import Forward, LossFn, as_pairs, batch_size, default_forward, model_device_dtype, move_to

__all__ = ["BNGapResult", "bn_modules", "batch_vs_running", "channel_terms", "train_eval_gap"]


def bn_modules(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, module)`` of every BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm, lazy
    variants), tracking running statistics or not, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def channel_terms(mu: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                  eps: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel terms of the two metrics: ``|mu - rm| / sqrt(rv + eps)`` and ``var / (rv + eps)``.

    Broadcasts; the live probe calls it on the concatenated channels of every module."""
    denom = running_var + eps
    return (mu - running_mean).abs() * denom.rsqrt(), var / denom


def batch_vs_running(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     eps: float = 1e-5) -> tuple[float, float]:
    """``(bn.mean_shift, bn.var_ratio)`` of one BatchNorm input ``x`` (channels on dim 1,
    as BatchNorm expects: (N, C), (N, C, L), (N, C, H, W), ...) against running statistics."""
    if x.ndim < 2:
        raise ValueError(f"a BatchNorm input has shape (N, C, ...), got shape {tuple(x.shape)}")
    dims = tuple(d for d in range(x.ndim) if d != 1)
    var, mu = torch.var_mean(x.detach(), dim=dims, correction=0)
    shift, ratio = channel_terms(mu, var, running_mean.to(mu.dtype), running_var.to(mu.dtype), eps)
    return float(shift.mean()), float(ratio.mean())


@dataclass
class BNGapResult:
    """``eval_loss`` (running statistics), ``train_loss`` (BatchNorm on batch statistics,
    everything else in eval mode) and ``gap = eval_loss - train_loss``."""

    eval_loss: float
    train_loss: float
    gap: float
    n_modules: int

    def rows(self) -> list[tuple[str, float, str]]:
        return [("bn.train_eval_gap", self.gap, ""), ("bn.eval_loss", self.eval_loss, ""),
                ("bn.train_loss", self.train_loss, "")]


def _mean_loss(model: nn.Module, loss_fn: LossFn, pairs: list[tuple[Any, Any]], forward: Forward) -> float:
    """The mean loss over the pairs' samples; under torch.distributed over every rank's (one all_reduce of the
    summed losses and the sample count, after a checkpoint)."""

    def local() -> torch.Tensor:
        acc = torch.zeros(2, dtype=torch.float64)
        for x, y in pairs:
            value = loss_fn(forward(model, x), y)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar tensor (the mean loss of the pair), got {shape}")
            acc[0] += float(value.detach().double()) * batch_size(x)
            acc[1] += batch_size(x)
        return acc

    total = _dist.reduce_sum(local)
    return float(total[0] / total[1])


@_dist.on_gathered  # FSDP2: the whole parameters, plain, for the call
def train_eval_gap(model: nn.Module, loss_fn: LossFn, batch: Any, *, forward: Forward | None = None,
                   modules: Iterable[nn.Module] | None = None) -> BNGapResult:
    """Loss of ``batch`` in eval mode minus its loss with BatchNorm using batch statistics.

    ``batch``: an ``(inputs, targets)`` pair or an iterable of pairs (mean loss over all
    samples; in the batch-statistics pass each pair is normalised with its own statistics).
    Only the BatchNorm modules that track running statistics switch to train mode; all
    other modules stay in eval mode (no dropout). No gradient is computed. Parameters,
    buffers (the running statistics the train-mode pass updates), modes and the RNG are
    restored on return, also when ``loss_fn`` raises.

    Under torch.distributed (DDP, FSDP2) each rank passes its shard of the batch: both losses are the means
    over every rank's samples; in the batch-statistics pass each rank's shard is normalised with its own
    statistics, as DDP trains without ``SyncBatchNorm`` (with ``SyncBatchNorm``, with the global batch's).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    model = _dist.unwrap(model)  # DDP: the module itself
    bns = list(modules) if modules is not None else [m for _, m in bn_modules(model)]
    bns = [m for m in bns if m.track_running_stats and m.running_mean is not None]
    if not bns:
        raise ValueError("the model has no BatchNorm module with running statistics (track_running_stats=True): "
                         "there is no train/eval gap to measure")
    device, _ = model_device_dtype(model)
    pairs = [(move_to(x, device), move_to(y, device)) for x, y in as_pairs(batch)]
    fwd = forward or default_forward
    with preserved_state(model, params=False, grads=False), torch.no_grad():
        model.eval()
        eval_loss = _mean_loss(model, loss_fn, pairs, fwd)
        for m in bns:
            m.train()
        train_loss = _mean_loss(model, loss_fn, pairs, fwd)
    return BNGapResult(eval_loss, train_loss, eval_loss - train_loss, len(bns))
