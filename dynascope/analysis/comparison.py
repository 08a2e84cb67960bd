"""Comparison with a known-good run: where a run's metrics leave the band the baseline had at the same steps.

For every metric and layer that both runs recorded (``event.*``, ``diagnostic.*`` and the constant or
binary ``grad.weight_cos_threshold`` / ``scale_invariant`` left out), at the steps both recorded:

* transform: log for a series whose finite values are all > 0 in BOTH runs (norms, variances, ratios,
  angles, losses), the values themselves otherwise: signed metrics, those whose values take both signs
  or the known-signed :data:`SIGNED` (``act.mean``, ``grad.weight_cos``, ...) even where one run happens
  to stay positive. A signed metric has no ratio (NaN): its deviation is told by its difference;
* baseline centre c_t: the median of the baseline over ``COMPARE_WINDOW`` recorded steps centred on t;
* band half-width h_t = max(``COMPARE_MADS`` x 1.4826 x MAD of the baseline's step-to-step differences over
  the same window, a floor): the baseline's own step-to-step spread. For white noise around a trend the
  MAD of the differences x 1.4826 is sqrt(2) x the noise SD, the spread of the difference between two
  independent runs, so the band holds a second run with the same dynamics. Floor: log(``COMPARE_MIN_RATIO``)
  in log space; (``COMPARE_MIN_RATIO`` - 1) x the window's median |baseline| for signed metrics;
* band: [min of min(b_s, c_s) - h_t, max of max(b_s, c_s) + h_t] over s within ``COMPARE_SHIFT``
  recorded steps of t: it always holds the baseline's own value, and a run a few steps ahead of or
  behind the baseline on the same trajectory (another data order) stays inside;
* a deviation: the run outside the band for ``COMPARE_PERSIST`` consecutive common steps (a single
  minibatch outlier is not one), or non-finite where the baseline is finite (at once).

docs/forensics.md explains how to read the table.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..core.robust import MAD_TO_SD
from ..store import RunData, as_run
from .forensics import fold_ratio, rolling_band

__all__ = ["compare", "band", "deviation_text", "SIGNED", "COMPARE_WINDOW", "COMPARE_MADS", "COMPARE_MIN_RATIO",
           "COMPARE_PERSIST", "COMPARE_SHIFT", "SKIPPED"]

COMPARE_WINDOW = 11       # recorded steps, centred
COMPARE_MADS = 4.0        # band half-width in robust SDs of the step-to-step differences
COMPARE_MIN_RATIO = 1.5   # deviations smaller than this factor are not reported
COMPARE_PERSIST = 3       # consecutive common steps out of the band
COMPARE_SHIFT = 5         # recorded steps a run may lead or lag the baseline
SKIPPED = ("event.", "diagnostic.", "grad.weight_cos_threshold", "scale_invariant")
# signed by definition: never compared as a ratio, even where a run's values happen to stay positive
SIGNED = ("act.mean", "grad.weight_cos", "bn.train_eval_gap")

_COLUMNS = ["metric", "layer", "first_step", "ratio", "direction", "z", "n_steps", "peak_ratio", "value",
            "baseline_value", "band_low", "band_high"]


def _skipped(metric: str) -> bool:
    return any(metric == s or (s.endswith(".") and metric.startswith(s)) for s in SKIPPED)


def _first_persistent(out: np.ndarray, nonfinite: np.ndarray, persist: int) -> np.ndarray:
    """Per column, the first row index that starts ``persist`` consecutive out-of-band rows (or is a
    non-finite deviation); -1 when none."""
    n, m = out.shape
    if n >= persist:
        pad = np.concatenate([out, np.zeros((persist - 1, m), dtype=bool)])
        runs = np.lib.stride_tricks.sliding_window_view(pad, persist, axis=0)[:n].all(axis=-1)
    else:
        runs = np.zeros_like(out)
    hit = runs | nonfinite
    first = np.where(hit.any(axis=0), hit.argmax(axis=0), -1)
    return first


def _bands(run: RunData, base: RunData, metric: str, window: int, k: float, min_ratio: float,
           shift: int, only: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The band arrays of ``metric`` at the common steps (rows) and layers (columns)."""
    a_rows = _rows(run, metric)
    a, b = _pivot(run, metric, a_rows), _pivot(base, metric, _rows(base, metric))
    layers = [c for c in b.columns if c in a.columns and (only is None or c in only)]
    steps = a.index.intersection(b.index)
    if not layers or len(steps) == 0:
        return None
    b = b[layers]
    bx = b.to_numpy(dtype=float)
    a_all = a[layers].to_numpy(dtype=float)  # every step of the run: a sign change anywhere makes it signed

    def _positive(col: np.ndarray) -> bool:
        fin = col[np.isfinite(col)]
        return bool(fin.size) and bool(np.all(fin > 0))

    positive = np.array([metric not in SIGNED and _positive(bx[:, j]) and
                         (not np.isfinite(a_all[:, j]).any() or _positive(a_all[:, j]))
                         for j in range(len(layers))], dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        by = np.where(positive, np.log(np.where(bx > 0, bx, np.nan)), bx)
    by = np.where(np.isfinite(bx), by, np.nan)
    centre, _ = rolling_band(by, window, center=True, min_periods=3)
    diffs = np.diff(by, axis=0, prepend=np.nan)
    _, mad_d = rolling_band(diffs, window, center=True, min_periods=3)
    absmed, _ = rolling_band(np.abs(by), window, center=True, min_periods=3)
    floor = np.where(positive, math.log(min_ratio), (min_ratio - 1) * absmed)
    sd = MAD_TO_SD * mad_d
    half = np.fmax(k * sd, floor)
    # the band holds the baseline's own values and centre within +-shift recorded steps: a run a few steps
    # ahead of or behind the baseline on the same trajectory is not a deviation
    lo = _rolling(np.fmin(by, centre), shift, np.nanmin) - half
    hi = _rolling(np.fmax(by, centre), shift, np.nanmax) + half
    pos = b.index.get_indexer(steps)
    by, centre, half, sd, bx, lo, hi = by[pos], centre[pos], half[pos], sd[pos], bx[pos], lo[pos], hi[pos]
    ax = a.loc[steps, layers].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ay = np.where(positive, np.log(np.clip(ax, 1e-300, None)), ax)
    valid = np.isfinite(lo) & np.isfinite(hi)
    fin = np.isfinite(ax)
    with np.errstate(invalid="ignore"):
        out = valid & fin & ((ay < lo) | (ay > hi))
    # a value the run did not record is NaN in the pivot too: only a stored non-finite value counts
    stored = _stored_nonfinite(a_rows, layers, steps)
    nonfinite = valid & stored
    out |= nonfinite
    return {"steps": steps, "layers": layers, "positive": positive, "ax": ax, "ay": ay, "bx": bx,
            "centre": centre, "sd": sd, "lo": lo, "hi": hi, "out": out, "nonfinite": nonfinite}


def _metric_deviations(run: RunData, base: RunData, metric: str, window: int, k: float, min_ratio: float,
                       persist: int, shift: int) -> list[dict] | None:
    bands = _bands(run, base, metric, window, k, min_ratio, shift)
    if bands is None:
        return None
    steps, layers, positive, ax, ay, bx = (bands[n] for n in ("steps", "layers", "positive", "ax", "ay", "bx"))
    centre, sd, lo, hi, out, nonfinite = (bands[n] for n in ("centre", "sd", "lo", "hi", "out", "nonfinite"))
    first = _first_persistent(out, nonfinite, persist)
    rows = []
    for j, lay in enumerate(layers):
        i = int(first[j])
        if i < 0:
            continue
        if nonfinite[i, j]:
            ratio, direction, z = math.inf, "non-finite", math.inf
        else:
            d = ay[i, j] - centre[i, j]
            direction = "up" if d > 0 else "down"
            z = abs(d) / sd[i, j] if sd[i, j] > 0 else math.inf  # robust SDs of the differences
            ratio = fold_ratio(d) if positive[j] else math.nan
        after = out[i:, j]
        dev_after = np.abs(ay[i:, j] - centre[i:, j])
        with np.errstate(over="ignore"):
            peak = math.inf if nonfinite[i:, j].any() else float(np.exp(np.nanmax(np.where(after, dev_after, 0.0))))
        rows.append({"metric": metric, "layer": lay, "first_step": int(steps[i]), "ratio": ratio,
                     "direction": direction, "z": z, "n_steps": int(after.sum()),
                     "peak_ratio": peak if positive[j] else math.nan, "value": float(ax[i, j]),
                     "baseline_value": float(bx[i, j]),
                     "band_low": float(np.exp(lo[i, j]) if positive[j] else lo[i, j]),
                     "band_high": float(np.exp(hi[i, j]) if positive[j] else hi[i, j])})
    return rows


def _rolling(y: np.ndarray, shift: int, fn) -> np.ndarray:
    """``fn`` (nanmin / nanmax) over rows i - shift .. i + shift of each column."""
    if shift <= 0:
        return y
    pad = np.full((shift, y.shape[1]), np.nan)
    win = np.lib.stride_tricks.sliding_window_view(np.concatenate([pad, y, pad]), 2 * shift + 1, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        return fn(win, axis=-1)


def _rows(run: RunData, metric: str) -> pd.DataFrame:
    """Rows ``step, layer, value`` of one metric (one indexed SQLite read; the last row wins for a repeated step)."""
    from ..store import query

    df = query.query(run, metric)
    return df.drop_duplicates(["step", "layer"], keep="last")


def _pivot(run: RunData, metric: str, rows: pd.DataFrame) -> pd.DataFrame:
    """step x layer table, columns in model order (RunData.pivot without pivot_table's cost)."""
    from ..store import query

    table = rows.pivot(index="step", columns="layer", values="value").sort_index()
    order = [c for c in query.layers(run, metric) if c in table.columns]
    return table[order + [c for c in table.columns if c not in set(order)]]


def _stored_nonfinite(rows: pd.DataFrame, layers: Sequence[str], steps: pd.Index) -> np.ndarray:
    """True where the run stored a NaN / inf (a step the run did not record is NaN in the table too)."""
    df = rows
    bad = df[~np.isfinite(df["value"].to_numpy(dtype=float))]
    mask = np.zeros((len(steps), len(layers)), dtype=bool)
    if bad.empty:
        return mask
    si = {int(s): i for i, s in enumerate(steps)}
    li = {lay: j for j, lay in enumerate(layers)}
    for st, lay in zip(bad["step"], bad["layer"]):
        if int(st) in si and lay in li:
            mask[si[int(st)], li[lay]] = True
    return mask


def compare(run: str | os.PathLike[str] | RunData, baseline: str | os.PathLike[str] | RunData, *,
            metrics: Sequence[str] | None = None, window: int = COMPARE_WINDOW, k: float = COMPARE_MADS,
            min_ratio: float = COMPARE_MIN_RATIO, persist: int = COMPARE_PERSIST,
            shift: int = COMPARE_SHIFT) -> pd.DataFrame:
    """Deviations of ``run`` from the band of ``baseline`` (each a run directory or a RunData).

    Columns: ``metric``, ``layer``, ``first_step`` (the first common step of the first stretch of
    ``persist`` out-of-band steps), ``ratio`` (run / baseline centre at that step, folded to >= 1; NaN for
    signed metrics, inf for non-finite), ``direction`` (up / down / non-finite), ``z`` (distance from the
    centre in robust SDs of the baseline's step-to-step differences), ``n_steps`` (out-of-band common
    steps from ``first_step`` on), ``peak_ratio``, ``value``, ``baseline_value``, ``band_low``,
    ``band_high``. Ordered by first step, then by ratio (largest first; signed metrics by z after).
    ``metrics``: only these (default: every metric both runs recorded, minus :data:`SKIPPED`).
    Raises ValueError when the runs share no metric and step.
    """
    run, base = as_run(run), as_run(baseline)
    if window < 3 or persist < 1 or min_ratio < 1 or k <= 0:
        raise ValueError(f"need window >= 3, persist >= 1, min_ratio >= 1 and k > 0; got {window}, {persist}, "
                         f"{min_ratio}, {k}")
    common = sorted(set(run.metrics()) & set(base.metrics()))
    if metrics is not None:
        unknown = [m for m in metrics if m not in common]
        if unknown:
            raise ValueError(f"metric(s) {unknown} not recorded in both runs; common: {common}")
        common = list(metrics)
    else:
        common = [m for m in common if not _skipped(m)]
    rows: list[dict] = []
    compared = False
    for m in common:
        found = _metric_deviations(run, base, m, window, k, min_ratio, persist, shift)
        if found is not None:  # None: no common layer and step
            compared = True
            rows += found
    if not compared:
        raise ValueError(f"runs {run.name!r} and {base.name!r} share no recorded metric at a common step")
    df = pd.DataFrame(rows, columns=_COLUMNS)
    if len(df):
        score = np.where(np.isnan(df["ratio"]), -np.inf, np.log(df["ratio"].clip(lower=1.0)))
        df = df.assign(_s=-score, _z=-df["z"]).sort_values(["first_step", "_s", "_z", "metric", "layer"],
                                                           kind="stable")
        df = df.drop(columns=["_s", "_z"]).reset_index(drop=True)
    df.attrs.update(run=run.name, baseline=base.name)
    return df


def band(run: str | os.PathLike[str] | RunData, baseline: str | os.PathLike[str] | RunData, metric: str,
         layer: str, *, window: int = COMPARE_WINDOW, k: float = COMPARE_MADS, min_ratio: float = COMPARE_MIN_RATIO,
         shift: int = COMPARE_SHIFT) -> pd.DataFrame:
    """The band :func:`compare` tests ``run`` against, for one metric and layer: columns step, value (the
    run), baseline, low, high, out (outside the band at that step), at the steps both recorded."""
    run, base = as_run(run), as_run(baseline)
    bands = _bands(run, base, metric, window, k, min_ratio, shift, only=[layer])
    if bands is None:
        raise ValueError(f"{metric!r} at layer {layer!r} is not recorded at a common step of both runs")
    pos = bool(bands["positive"][0])
    lo, hi = bands["lo"][:, 0], bands["hi"][:, 0]
    return pd.DataFrame({"step": np.asarray(bands["steps"], dtype=np.int64), "value": bands["ax"][:, 0],
                         "baseline": bands["bx"][:, 0], "low": np.exp(lo) if pos else lo,
                         "high": np.exp(hi) if pos else hi, "out": bands["out"][:, 0]})


def _num(x: float) -> str:
    return f"{x:.3g}"


def deviation_text(row: Any) -> str:
    """One deviation (a row of :func:`compare`) in words, with its own first step: ``lr 1.53x down from step
    211``; a signed metric (no ratio) by its difference: ``act.mean down by 0.4 (-0.3 vs baseline 0.1) from
    step 40``; ``loss non-finite from step 90``."""
    metric, step = str(row["metric"]), int(row["first_step"])
    ratio = float(row["ratio"])
    if row["direction"] == "non-finite":
        return f"{metric} non-finite from step {step}"
    if math.isfinite(ratio):
        return f"{metric} {_num(ratio)}x {row['direction']} from step {step}"
    v, b = float(row["value"]), float(row["baseline_value"])
    return f"{metric} {row['direction']} by {_num(abs(v - b))} ({_num(v)} vs baseline {_num(b)}) from step {step}"
