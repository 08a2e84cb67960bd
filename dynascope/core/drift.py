"""Early warning: a CUSUM drift detector on the sentinel's every-step norms.

A spike rule (:mod:`dynascope.core.robust`) fires when the loss has already jumped. Before an organic
explosion the loss, the gradient norms and the update norms of most modules creep upward for tens of
steps; a one-sided CUSUM (Page 1954) accumulates that evidence. Four signals, in log space:

* ``loss``: the loss;
* ``grad.global_norm``: the global gradient norm;
* ``grad.norm``: the median over modules of each module's z-score of its gradient norm;
* ``update.norm``: the same for the update norms ||w_{t+1} - w_t||.

For each series the reference is its own running median and robust SD (1.4826 x MAD) over the
previous ``window`` values; z = (log x_t - median) / max(robust SD, floor), clipped at ``clip``
(one outlier adds at most ``clip - k``: a single spike is the spike rule's business, not a drift). The
module signals take the median of the modules' z (a drift of most modules, not of one noisy layer).
The statistic S_t = max(0, S_{t-1} + z_t - k) of each signal warns when it exceeds ``h``; then every
statistic restarts at 0. The three norm signals accumulate only while the loss is not falling (the
median log loss of the last 10 steps is not below that of the 10 before): norms grow during warm-up
and early training while the loss drops, which is learning, not instability. The floors (5% for the
loss, 22% for the norms: Adam's update norms wander slowly by 2-3x in healthy runs) and k = 1, h = 10
were chosen on tiny GPT-2, MLP and Pre-LN runs, diverging and healthy (``benchmarks/
bench_early_warning.py`` prints the lead times and the false warnings; docs/forensics.md the numbers).
The norm signals warn at 1.5 h: SGD momentum smears one minibatch's gradient jump over ~10 steps of
update norms, which a CUSUM at h reads as a drift (three warnings in the demo's BatchNorm + weight
decay run at h, one at 1.5 h). A steady exponential growth is partly absorbed by the trailing
reference: the detector flags acceleration; four of six modules' update norms growing 20% a step warn
after 9-43 steps, 10% a step after 76-122 (``tests/test_drift.py``). Before the tiny GPT-2's
explosions every warning came from the loss.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .robust import MAD_TO_SD, nanmedian_last

__all__ = ["DriftDetector", "Drift", "drift_warnings", "describe", "SIGNALS"]

SIGNALS = ("loss", "grad.global_norm", "grad.norm", "update.norm")
DRIFT_WINDOW = 20  # previous values in each reference median / MAD
DRIFT_K = 1.0  # drift allowance per step, in robust SDs
DRIFT_H = 10.0  # decision threshold of the cumulative sum
DRIFT_CLIP = 4.0  # largest z one step adds
LOSS_FLOOR = math.log(1.05)  # smallest robust SD of log loss: a 5% move
NORM_FLOOR = math.log(1.22)  # smallest robust SD of a log norm: a 22% move
MIN_REFERENCE = 10  # values a reference needs before z is computed
NORM_H_FACTOR = 1.5  # the norm signals' threshold, in units of h
MAX_MODULES = 3  # modules named in a warning's detail


@dataclass
class Drift:
    """A warning: the signals whose statistic crossed ``threshold`` at ``step``."""
    step: int
    signals: list[str]
    statistic: float  # the largest statistic among them
    threshold: float
    modules: list[str] = field(default_factory=list)  # the modules that drifted most (module signals)


class DriftDetector:
    """Online upward CUSUM on the loss, the global gradient norm and the per-module norms.

    ``update(step, row)`` takes one step's values: ``[loss, global grad norm, m module grad norms,
    m module update norms]`` (NaN where missing; non-positive or non-finite values are left out) and
    returns a :class:`Drift` when the loss statistic crosses ``h`` or a norm signal's crosses
    NORM_H_FACTOR x ``h``. ``start``: no warning before
    this step (the first steps of training are a transient, not a drift)."""

    def __init__(self, modules: list[str], *, window: int = DRIFT_WINDOW, k: float = DRIFT_K, h: float = DRIFT_H,
                 clip: float = DRIFT_CLIP, start: int = DRIFT_WINDOW) -> None:
        if window < MIN_REFERENCE:
            raise ValueError(f"DriftDetector: window must be >= {MIN_REFERENCE}, got {window}")
        self.modules = list(modules)
        self.m = len(self.modules)
        self.window, self.k, self.h, self.clip, self.start = window, k, h, clip, start
        # the norm signals cross at NORM_H_FACTOR x h: momentum smears one minibatch's gradient jump over ~10
        # steps of update norms, which a CUSUM at h reads as a drift
        self._h = np.array([h] + [NORM_H_FACTOR * h] * (len(SIGNALS) - 1))
        width = 2 + 2 * self.m
        self._hist = np.full((window, width), np.nan)
        self._n = 0
        self._floor = np.array([LOSS_FLOOR] + [NORM_FLOOR] * (width - 1))
        self.statistic = np.zeros(len(SIGNALS))

    def update(self, step: int, row: np.ndarray) -> Drift | None:
        x = np.asarray(row, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(x > 0, np.log(x), np.nan)  # NaN for missing, non-finite and non-positive values
        x[~np.isfinite(x)] = np.nan
        fired = None
        if step >= self.start and self._n >= MIN_REFERENCE:
            hist = self._hist if self._n >= self.window else self._hist[:self._n]
            cols = hist.T  # (series, values)
            count = np.isfinite(cols).sum(axis=1)
            med = nanmedian_last(cols, count)
            scale = np.fmax(MAD_TO_SD * nanmedian_last(np.abs(cols - med[:, None]), count), self._floor)
            with np.errstate(invalid="ignore"):
                z = np.minimum((x - med) / scale, self.clip)
            z[count < MIN_REFERENCE] = np.nan
            m = self.m
            zz = np.stack([z[2:2 + m], z[2 + m:]]) if m else np.full((2, 1), np.nan)
            signal_z = np.concatenate([z[:2], nanmedian_last(zz, np.isfinite(zz).sum(axis=1))])
            signal_z = np.where(np.isfinite(signal_z), signal_z, 0.0)
            stat = np.maximum(0.0, self.statistic + signal_z - self.k)
            if self._loss_falling():  # norms that move while the loss still falls: learning, not instability
                stat[1:] = self.statistic[1:]
            self.statistic = stat
            over = np.nonzero(self.statistic > self._h)[0]
            if len(over):
                names = [SIGNALS[i] for i in over]
                mods: list[str] = []
                if m and ("grad.norm" in names or "update.norm" in names):
                    zm = np.fmax(np.nan_to_num(z[2:2 + m], nan=-np.inf), np.nan_to_num(z[2 + m:], nan=-np.inf))
                    mods = [self.modules[i] for i in np.argsort(-zm, kind="stable")[:MAX_MODULES]
                            if np.isfinite(zm[i])]
                fired = Drift(step, names, float(self.statistic[over].max()), float(self._h[over].min()), mods)
                self.statistic[:] = 0.0
        self._hist[self._n % self.window] = x
        self._n += 1
        return fired

    def _loss_falling(self) -> bool:
        """Whether the median log loss of the last window/2 steps is below that of the window/2 before
        (False without a full window of finite losses: no loss, no gate)."""
        if self._n < self.window:
            return False
        half = self.window // 2
        order = (self._n - 1 - np.arange(2 * half)) % self.window  # newest first
        loss = self._hist[order, 0].tolist()
        if not all(math.isfinite(v) for v in loss):
            return False
        return statistics.median(loss[:half]) < statistics.median(loss[half:])


def drift_warnings(values: np.ndarray, modules: list[str] | None = None, steps: np.ndarray | None = None,
                   **options: Any) -> list[Drift]:
    """Run :class:`DriftDetector` over a table of steps (rows ``[loss, global grad norm, module grad
    norms..., module update norms...]``) and return its warnings: the offline form, for recorded
    series and tests."""
    values = np.asarray(values, dtype=float)
    m = (values.shape[1] - 2) // 2
    names = list(modules) if modules is not None else [str(i) for i in range(m)]
    det = DriftDetector(names, **options)
    steps = np.arange(len(values)) if steps is None else np.asarray(steps)
    return [d for s, row in zip(steps, values) if (d := det.update(int(s), row)) is not None]


def describe(detail: Any) -> str:
    """A warning's detail (``{"signals": [...], "modules": [...]}``, as the sentinel marks it) as text:
    ``"loss and update.norm (modules that moved most: a, b)"``; ``""`` when there is none."""
    if not isinstance(detail, dict):
        return ""
    text = " and ".join(map(str, detail.get("signals", [])))
    mods = detail.get("modules") or []
    return text + (f" (modules that moved most: {', '.join(map(str, mods))})" if mods else "")
