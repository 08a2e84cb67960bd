"""Calibration of a classifier: expected / maximum calibration error, NLL and the reliability diagram.

Guo, Pleiss, Sun and Weinberger (2017), "On Calibration of Modern Neural
Networks", Section 2: with ``conf_i`` the largest softmax probability of
example ``i`` and ``pred_i`` its argmax, sort the examples into ``B``
equal-width confidence bins ``I_b = (b/B, (b+1)/B]``, ``b = 0..B-1`` (``B = 15``
in the paper), and in each non-empty bin compare the accuracy
``acc(I_b) = mean_{i in I_b} [pred_i == y_i]`` with the mean confidence
``conf(I_b)``:

* ``ECE = sum_b |I_b| / n * |acc(I_b) - conf(I_b)|`` (the L1 calibration error,
  torchmetrics' ``MulticlassCalibrationError(norm="l1")``);
* ``MCE = max over non-empty bins of |acc(I_b) - conf(I_b)|`` (``norm="max"``);
* ``NLL = mean_i -log softmax(z_i)[y_i]`` (``F.cross_entropy``);
* ``accuracy`` and ``confidence``: the means of ``[pred_i == y_i]`` and ``conf_i``.

Over-confidence, Guo et al.'s Fig. 3: during training the NLL starts to rise
while the accuracy still holds or improves; the ECE grows with it.

Everything is computed in float64. torchmetrics bins with ``[b/B, (b+1)/B)``
and puts a confidence of exactly 1.0 into an extra bin; here such examples
belong to the last bin, as in Guo et al. The two agree wherever no confidence
sits exactly on a bin edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checks import positive_int

__all__ = ["calibration", "CalibrationResult", "CalibrationBins"]


@dataclass(frozen=True)
class CalibrationBins:
    """The reliability diagram: ``n_bins`` equal-width confidence bins.

    ``edges`` (``n_bins + 1``), and per bin ``accuracy`` and ``confidence``
    (NaN for an empty bin) and ``count`` (examples in the bin).
    """

    edges: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    count: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"edges": self.edges, "accuracy": self.accuracy, "confidence": self.confidence, "count": self.count}


@dataclass(frozen=True)
class CalibrationResult:
    """``ece``, ``mce``, ``nll``, ``accuracy``, ``confidence`` (mean max probability) of ``n`` examples, and the
    per-bin ``bins``. Non-finite logits give NaN for every value (a diverged model is recorded as such)."""

    ece: float
    mce: float
    nll: float
    accuracy: float
    confidence: float
    n: int
    bins: CalibrationBins

    def rows(self) -> list[tuple[str, float]]:
        """``(metric, value)`` rows as the scheduled recorder writes them."""
        return [("calibration.ece", self.ece), ("calibration.mce", self.mce), ("calibration.nll", self.nll),
                ("calibration.accuracy", self.accuracy), ("calibration.confidence", self.confidence)]


def calibration(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> CalibrationResult:
    """Calibration of ``logits`` (``(n, classes)``, pre-softmax) against integer ``targets`` (``(n,)``).

    Returns ECE, MCE, NLL, accuracy, mean confidence and the reliability bins
    (see the module docstring for the formulas; Guo et al. 2017).
    """
    positive_int("n_bins", n_bins, owner="calibration")
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"calibration: logits and targets must be tensors, got {type(logits).__name__} and "
                        f"{type(targets).__name__}")
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"calibration: logits must have shape (examples, classes >= 2), got {tuple(logits.shape)}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"calibration: targets must have shape ({logits.shape[0]},) to match the logits, got "
                         f"{tuple(targets.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"calibration: targets must be integer class indices, got dtype {targets.dtype}")
    n = int(logits.shape[0])
    if n == 0:
        raise ValueError("calibration: no examples (logits have 0 rows)")
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
        raise ValueError(f"calibration: targets must lie in [0, {logits.shape[1] - 1}], got values from "
                         f"{int(targets.min())} to {int(targets.max())}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    z = logits.detach().to(torch.float64)
    y = targets.detach().to(device=z.device, dtype=torch.long)
    if not torch.isfinite(z).all():
        nan = float("nan")
        empty = np.full(n_bins, np.nan)
        return CalibrationResult(nan, nan, nan, nan, nan, n,
                                 CalibrationBins(edges, empty, empty.copy(), np.zeros(n_bins, dtype=np.int64)))
    nll = float(F.cross_entropy(z, y))
    conf_t, pred = torch.softmax(z, dim=1).max(dim=1)
    conf = conf_t.cpu().numpy()
    correct = (pred == y).cpu().numpy().astype(np.float64)
    # bin b holds (b/B, (b+1)/B]: right-closed, so a confidence of exactly 1 is in the last bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_b = np.bincount(idx, weights=correct, minlength=n_bins) / count
        conf_b = np.bincount(idx, weights=conf, minlength=n_bins) / count
    gap = np.abs(acc_b - conf_b)
    nonempty = count > 0
    ece = float(np.sum(gap[nonempty] * count[nonempty]) / n)
    mce = float(gap[nonempty].max())
    return CalibrationResult(ece, mce, nll, float(correct.mean()), float(conf.mean()), n,
                             CalibrationBins(edges, acc_b, conf_b, count.astype(np.int64)))
