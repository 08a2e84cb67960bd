"""BatchNorm batch statistics against running statistics, live (default probe
``"batchnorm"``), and the scheduled train/eval loss gap (:class:`BNGap`).

The probe puts a forward PRE-hook on every BatchNorm module (``_BatchNorm``
subclasses: BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants) on recording
steps. For a call in train mode it reads the per-channel mean and variance
(ddof=0) of the module's input, the batch BatchNorm normalises, and copies
the running statistics before the forward updates them. At the end of the step
(formulas in :mod:`dynascope.diagnostics.batchnorm`):

* ``bn.mean_shift`` = mean_c |mu_B,c - running_mean_c| / sqrt(running_var_c + eps)
* ``bn.var_ratio``  = mean_c var_B,c / (running_var_c + eps)

Several train-mode calls of one module in a step (gradient accumulation,
a siamese forward): each call is compared with the running statistics it
found, and the row is the MEAN of the per-call values. Merging the calls'
batch statistics first (Chan et al.) would describe a batch no call
normalised with, against running statistics that moved between calls.

Not recorded: calls in eval mode (they normalise with the running statistics:
there is no batch statistic), and modules without running statistics
(``track_running_stats=False``); those are listed in the run metadata under
the coverage report (``bn.*@<module>`` rows) and in :attr:`BatchNormProbe.skipped`.
Under torch.distributed the rows are rank 0's: each rank's BatchNorm
normalises its own batch (for SyncBatchNorm, rank 0's share of the global
batch is an estimate of the global statistics).

Cost on a recording step: one per-channel mean/variance of each BatchNorm
input (as the activation probe computes it: one compiled kernel per input
layout once that pays, ``probes/_fused.py``, ``BatchNormProbe(fused=...)``;
before, on the CPU, shifted float32 sums: ``torch.var_mean`` is ~7x slower
there) and a copy of 2 x C running statistics per call; nothing on other steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.coverage import CoverageRow
from ..core.names import select_modules
from ..diagnostics._batch import Forward, LossFn, _is_pair
from ..diagnostics.batchnorm import channel_terms, train_eval_gap
from ._fused import FusedStatistics, resolve_mode
from .activations import shifted_var_mean
from .base import Collected, Probe
from .scheduled import Scheduled, ScheduledContext

__all__ = ["BatchNormProbe", "BNGap", "BN_METRICS"]

BN_METRICS = ("bn.mean_shift", "bn.var_ratio")

_HALF = (torch.float16, torch.bfloat16)
_SMALL_NUMEL = 2048  # up to here (and on accelerators) torch.var_mean, one kernel, is the cheapest


def _channel_var_mean(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (ddof=0) variance and mean of ``x`` over ``dims``.

    CPU inputs above a few thousand entries: sums of the data shifted by one
    sample per channel, var = E[(x-K)^2] - E[x-K]^2 (no cancellation while
    |mean| >> std; Welford's ``var_mean`` is several times slower on the CPU)."""
    if x.device.type != "cpu" or x.numel() <= _SMALL_NUMEL:
        return torch.var_mean(x, dim=dims, correction=0)
    return shifted_var_mean(x, dims)


class BatchNormProbe(Probe):
    """Forward pre-hooks on the BatchNorm modules, attached only on recording steps. ``fused``: as
    :class:`dynascope.probes.activations.ActivationProbe`'s (default ``DYNASCOPE_FUSED``, else ``"auto"``)."""

    name = "batchnorm"

    def __init__(self, fused: str | None = None) -> None:
        self.fused = FusedStatistics(resolve_mode(fused))  # the per-channel moments of each input: one kernel
        self._handles: list[Any] = []
        # module index -> list of (mu, var, stacked running stats) of this step's train-mode calls
        self._calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._layout: dict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.modules: list[tuple[str, nn.modules.batchnorm._BatchNorm]] = []
        self.skipped: dict[str, str] = {}

    def setup(self, session: Any) -> None:
        super().setup(session)
        flt = getattr(session, "module_filter", None)
        found = [(n, m) for n, m in select_modules(session.model, flt)
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.modules = [(n, m) for n, m in found if m.track_running_stats and m.running_mean is not None]
        self.skipped = {n: "no running statistics (track_running_stats=False)" for n, m in found
                        if not (m.track_running_stats and m.running_mean is not None)}

    def coverage(self) -> list[CoverageRow]:
        rows = [CoverageRow("metric", f"bn.*@{n}", True, "", self.name) for n, _ in self.modules]
        return rows + [CoverageRow("metric", f"bn.*@{n}", False, why, self.name) for n, why in self.skipped.items()]

    def arm(self) -> None:
        if self._handles:
            return
        for i, (_, module) in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._make_hook(i)))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, index: int):  # noqa: ANN202
        calls = self._calls
        fused = self.fused

        def hook(mod: nn.Module, inputs: Any) -> None:
            if not mod.training or not inputs:
                return
            x = inputs[0]
            if type(x) is not torch.Tensor or x.ndim < 2 or x.numel() == 0 or not x.is_floating_point():
                return
            x = x.detach()
            dims = (0, *range(2, x.ndim))
            var, mu = fused.statistics(fused.kernel(x, 1), x, 1,  # one compiled read of the input (_fused)
                                       lambda: _channel_var_mean(x.float() if x.dtype in _HALF else x, dims))[:2]
            # copied now: the forward that follows updates the running statistics in place
            running = torch.stack([mod.running_mean.detach(), mod.running_var.detach()])  # type: ignore[list-item]
            calls.setdefault(index, []).append((mu, var, running))

        return hook

    def _weights(self, layout: tuple[tuple[int, int], ...], counts: dict[int, int], positions: dict[int, int],
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel output position, weight 1/(C * calls) and eps, cached per call layout."""
        cached = self._layout.get(layout)
        if cached is None or cached[0].device != device:
            seg, weight, eps = [], [], []
            for module_index, channels in layout:
                seg += [positions[module_index]] * channels
                weight += [1.0 / (channels * counts[module_index])] * channels
                eps += [float(self.modules[module_index][1].eps)] * channels
            cached = (torch.tensor(seg, device=device), torch.tensor(weight, dtype=dtype, device=device),
                      torch.tensor(eps, dtype=dtype, device=device))
            if len(self._layout) > 8:
                self._layout.clear()
            self._layout[layout] = cached
        return cached

    def collect(self, step: int) -> Collected | None:
        if not self._calls:
            return None
        order = sorted(self._calls)  # model order
        positions = {m: k for k, m in enumerate(order)}
        counts = {m: len(self._calls[m]) for m in order}
        entries = [(m, c) for m in order for c in self._calls[m]]
        layout = tuple((m, c[0].numel()) for m, c in entries)
        device = entries[0][1][0].device
        acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        seg, weight, eps = self._weights(layout, counts, positions, device, acc)
        with torch.no_grad():
            mu = torch.cat([c[0].reshape(-1) for _, c in entries]).to(acc)
            var = torch.cat([c[1].reshape(-1) for _, c in entries]).to(acc).clamp_min_(0)
            running = torch.cat([c[2].reshape(2, -1) for _, c in entries], dim=1).to(acc)
            shift, ratio = channel_terms(mu, var, running[0], running[1], eps)
            sums = torch.zeros(len(order), 2, dtype=acc, device=device)
            sums.index_add_(0, seg, torch.stack([shift, ratio], dim=1) * weight[:, None])
            values = sums.reshape(-1).float()
        keys = [(metric, self.modules[m][0]) for m in order for metric in BN_METRICS]
        self._calls.clear()  # in place: the armed hooks hold this dict
        return Collected(keys, values)

    def close(self) -> None:
        self.disarm()
        self._calls.clear()


class BNGap(Scheduled):
    """``bn.train_eval_gap`` (with ``bn.eval_loss`` and ``bn.train_loss``) on a fixed batch
    every ``every`` steps (and/or ``at`` steps): the loss in eval mode minus the loss with
    the BatchNorm modules normalising with the batch's own statistics (all other modules
    in eval mode). Runs under the session's state guard, and restores the running
    statistics and the RNG itself too (:func:`dynascope.diagnostics.batchnorm.train_eval_gap`).
    """

    name = "bn_gap"

    def __init__(self, every: int | None = None, batch: Any = None, loss_fn: LossFn | None = None, *,
                 at: Sequence[int] | str | None = None, forward: Forward | None = None) -> None:
        super().__init__(every=every, at=at)
        if batch is None:
            raise ValueError("BNGap: batch= is required (a fixed (inputs, targets) batch)")
        if not _is_pair(batch) and isinstance(batch, torch.Tensor):
            raise TypeError("BNGap: batch must be an (inputs, targets) pair or a list of pairs, got a bare tensor")
        if loss_fn is None or not callable(loss_fn):
            raise TypeError(f"BNGap: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.batch = batch
        self.loss_fn = loss_fn
        self.forward = forward

    def run(self, ctx: ScheduledContext) -> None:
        res = train_eval_gap(ctx.model, self.loss_fn, self.batch, forward=self.forward)
        for metric, value, layer in res.rows():
            ctx.log(metric, value, layer)
