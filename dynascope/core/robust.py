"""Robust running statistics shared by the live sentinel, the recorded-series events, the forensics
and the report's findings: one rolling median/MAD, one spike rule (series and online forms).

A spike is a value above max(SPIKE_FACTOR x the median of the previous SPIKE_WINDOW values,
that median + SPIKE_MADS x 1.4826 x MAD), and for a loss by at least SPIKE_MIN_RISE x the loss at the
start (minibatch noise near zero loss is not a spike)."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["MAD_TO_SD", "rolling_band", "nanmedian_last", "series_spike_threshold", "spike_threshold", "SPIKE_WINDOW",
           "SPIKE_FACTOR", "SPIKE_MADS", "SPIKE_MIN_RISE", "SENTINEL_MIN_RISE", "GRAD_SPIKE_FACTOR", "GRAD_MIN_RISE",
           "JUMP_FACTOR", "JUMP_MIN_HISTORY",
           "MIN_HISTORY", "MIN_PERIODS"]

SPIKE_WINDOW = 20  # previous values in the running median and MAD
SPIKE_FACTOR = 2.0  # a spike is above this factor x the running median ...
MAD_TO_SD = 1.4826  # the MAD of a normal distribution x 1.4826 = its SD
SPIKE_MADS = 6.0  # ... by more than this many robust SDs (1.4826 x MAD) ...
SPIKE_MIN_RISE = 0.1  # ... and by at least this fraction of the loss at the start
SENTINEL_MIN_RISE = 0.25  # the live sentinel's floor: minibatch losses near zero jump by 10% of the start
GRAD_SPIKE_FACTOR = 10.0  # minibatch gradient norms move 2-2.5x from step to step, early training 5x within 20 steps
JUMP_FACTOR = 10.0  # a module's gradient or update norm above 10x the median of its recent values: a jump
JUMP_MIN_HISTORY = 10  # ... judged once this many of its values precede it
GRAD_MIN_RISE = 1.0  # the sentinel's gradient-spike floor: a rise of at least the starting gradient norm
MIN_HISTORY = 5  # finite previous values a threshold needs
MIN_PERIODS = 5  # finite values a running band needs


def nanmedian_last(win: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median over the last axis ignoring NaN (``count`` finite values per row): sort (NaN last) and take the
    middle one or two; 10-50x faster than np.nanmedian, which goes through masked arrays."""
    srt = np.sort(win, axis=-1)
    n = win.shape[-1]
    if n and bool((count == n).all()):  # no NaN anywhere (the usual case): plain slices
        return 0.5 * (srt[..., (n - 1) // 2] + srt[..., n // 2])
    lo = np.clip((count - 1) // 2, 0, None)[..., None]
    hi = np.clip(count // 2, 0, None)[..., None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = 0.5 * (np.take_along_axis(srt, lo, axis=-1) + np.take_along_axis(srt, hi, axis=-1))[..., 0]
    med[count == 0] = np.nan
    return med


def rolling_band(y: np.ndarray, window: int, *, center: bool = False,
                 min_periods: int = MIN_PERIODS) -> tuple[np.ndarray, np.ndarray]:
    """Rolling median and MAD along axis 0 of ``y`` (1-D, or 2-D with one column per series).

    ``center=False``: the window of index i is the ``window`` values before i (i excluded), so a value is
    judged against its past. ``center=True``: ``window`` values centred on i (i included). Non-finite
    values are left out; fewer than ``min_periods`` finite values give NaN. The MAD is the exact
    median of |x - median| within each window.
    """
    y = np.asarray(y, dtype=float)
    one_d = y.ndim == 1
    y2 = y[:, None] if one_d else y
    n = y2.shape[0]
    y2 = np.where(np.isfinite(y2), y2, np.nan)
    if center:
        before = window // 2
        pad = np.full((before, y2.shape[1]), np.nan)
        padded = np.concatenate([pad, y2, np.full((window - 1 - before, y2.shape[1]), np.nan)])
    else:
        padded = np.concatenate([np.full((window, y2.shape[1]), np.nan), y2])
    win = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)[:n]  # (n, cols, window)
    count = np.isfinite(win).sum(axis=-1)
    med = nanmedian_last(win, count)
    mad = nanmedian_last(np.abs(win - med[..., None]), count)
    few = count < min_periods
    med[few] = np.nan
    mad[few] = np.nan
    return (med[:, 0], mad[:, 0]) if one_d else (med, mad)


def series_spike_threshold(values: np.ndarray, min_rise: float = 0.0) -> np.ndarray:
    """Per index, the level above which a value is a spike (NaN where undefined): the largest of
    SPIKE_FACTOR x the median of the previous SPIKE_WINDOW recorded values, that median + SPIKE_MADS x
    1.4826 x MAD (at least 5 previous values), and that median + ``min_rise`` x the median of the first
    SPIKE_WINDOW values (an absolute floor: a minibatch loss near zero doubles by noise alone). Non-finite
    values are not part of the window. One implementation for the findings and the events of
    :func:`dynascope.analysis.forensics.detect_events`."""
    v = np.where(np.isfinite(values), values, np.nan).astype(float)
    med, mad = rolling_band(v, SPIKE_WINDOW, min_periods=MIN_HISTORY)  # exact median and MAD of the previous values
    thr = np.fmax(SPIKE_FACTOR * med, med + SPIKE_MADS * MAD_TO_SD * mad)
    if min_rise > 0 and np.isfinite(v).any():
        start = float(np.nanmedian(v[:SPIKE_WINDOW])) if np.isfinite(v[:SPIKE_WINDOW]).any() else float("nan")
        if np.isfinite(start):
            thr = np.fmax(thr, med + min_rise * abs(start))
    with np.errstate(invalid="ignore"):
        thr[~(med > 0)] = np.nan
    return thr


def spike_threshold(previous: Sequence[float] | np.ndarray, start: float = math.nan, min_rise: float = 0.0,
                    min_history: int = MIN_HISTORY, factor: float = SPIKE_FACTOR) -> float:
    """The level above which the next value is a spike, from the previous values (the finite ones
    among the last SPIKE_WINDOW): max(``factor`` x median, median + SPIKE_MADS x 1.4826 x MAD,
    median + ``min_rise`` x |start|); NaN with fewer than ``min_history`` values or a median <= 0. The
    rule of the report's loss-spike finding, applied online (the sentinel's ``start`` is the median of
    the first 3 finite values of the series; the report's, of the first SPIKE_WINDOW)."""
    v = [x for x in list(previous)[-SPIKE_WINDOW:] if math.isfinite(x)]  # <= 20 floats: plain Python is 10x
    if len(v) < min_history:                                             # faster than numpy here (every step)
        return math.nan
    med = statistics.median(v)
    if not med > 0:
        return math.nan
    mad = statistics.median([abs(x - med) for x in v])
    thr = max(factor * med, med + SPIKE_MADS * MAD_TO_SD * mad)
    if min_rise > 0 and math.isfinite(start):
        thr = max(thr, med + min_rise * abs(start))
    return thr
