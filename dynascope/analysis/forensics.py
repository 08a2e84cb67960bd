"""Spike forensics: which module moved first before a loss spike or a NaN.

Reading side only: it works on what a run directory holds, so it works on
runs recorded today (``every=1`` gives per-step resolution) and on the
full-resolution windows an always-on sentinel writes around an event.

Events
    :func:`detect_events` finds robust loss spikes (the rule of the
    ``loss_spikes`` finding, :func:`dynascope.analysis.findings.spike_threshold`:
    above 2x the running median of the previous 20 recorded losses, 6 robust SDs
    above it, and a rise of at least 10% of the starting loss) and non-finite
    losses, and the same (without the rise floor) on ``grad.global_norm``.
    Stored events are scalar rows (architecture invariant 6): metric
    ``event.<kind>``, layer ``""``, value = the value that fired (NaN/inf for a
    non-finite one), and ``event.<kind>.threshold`` = the level it crossed (NaN
    when none applies). :func:`event_rows` writes that format;
    ``RunData.events()`` reads it, or detects events from the recorded loss when
    the run stored none.

Forensics
    :func:`forensics` ranks candidate causes: for each module and each of
    ``update.norm``, ``update.relative``, ``grad.norm`` and ``act.absmax`` (and each
    param group's ``optim.lr``), the recorded steps within ``LOOKBACK`` recorded
    steps before the event (the event step included) at which the value left its
    RECENT band (the median +- ``BAND_MADS`` x 1.4826 x MAD of the previous
    ``BAND_WINDOW`` = 5 recorded values, in log space, and at least ``MIN_RATIO`` =
    5 times away from the median: a warmup or a slow drift moves the band with
    it, minibatch noise stays inside), and by how much. Ranked: a change of a
    hyperparameter first (the learning rate is set, not caused), then values that
    became non-finite (earliest first; at one step, the activations in forward
    order: the first module whose output is NaN produced it), then rises by size
    (largest first), then drops. docs/forensics.md explains how to read the table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..core.robust import MAD_TO_SD, MIN_PERIODS, rolling_band
from ..store import RunData, as_run

__all__ = ["BAND_WINDOW", "BAND_MADS", "MIN_RATIO", "LOOKBACK", "FORENSIC_METRICS", "HYPERPARAMETERS", "EVENT_PREFIX",
           "EVENT_MERGE", "MAD_TO_SD", "fold_ratio", "rolling_band", "detect_events", "run_events", "event_rows",
           "forensics", "module_of"]

BAND_WINDOW = 5         # recent recorded values in a module's band (a warmup or a slow drift moves it along)
BAND_MADS = 6.0         # band half-width in robust SDs (1.4826 x MAD)
MIN_RATIO = 5.0         # ... and at least this factor from the recent median (minibatch noise moves 2-3x)
LOOKBACK = 20           # recorded steps before the event that are searched (the event step included)
EVENT_MERGE = 5         # detected events of one kind within this many recorded steps form one episode
FORENSIC_METRICS = ("optim.lr", "update.norm", "update.relative", "grad.norm", "act.absmax")
HYPERPARAMETERS = ("optim.",)  # metrics that are set, not caused: a change of them ranks first
EVENT_PREFIX = "event."
THRESHOLD_SUFFIX = ".threshold"

_EVENT_COLUMNS = ["step", "kind", "value", "threshold"]
_FORENSIC_COLUMNS = ["module", "metric", "first_step", "ratio", "direction", "z", "value", "median", "lead",
                     "layer"]


def _series(values: Any, steps: Any = None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(values, pd.Series):
        s = np.asarray(values.index, dtype=np.int64) if steps is None else np.asarray(steps, dtype=np.int64)
        v = values.to_numpy(dtype=float)
    else:
        v = np.asarray(values, dtype=float)
        s = np.arange(len(v), dtype=np.int64) if steps is None else np.asarray(steps, dtype=np.int64)
    if v.ndim != 1 or len(s) != len(v):
        raise ValueError(f"expected one value per step, got {len(v)} values and {len(s)} steps")
    return s, v


def _episodes(idx: np.ndarray, merge: int) -> np.ndarray:
    """First index of each group of indices whose gaps are at most ``merge``."""
    if len(idx) == 0:
        return idx
    keep = np.r_[True, np.diff(idx) > merge]
    return idx[keep]


def _detect(s: np.ndarray, v: np.ndarray, prefix: str, min_rise: float, merge: int) -> list[dict[str, Any]]:
    from ..core.robust import series_spike_threshold as spike_threshold

    out: list[dict[str, Any]] = []
    bad = np.flatnonzero(~np.isfinite(v))
    for i in _episodes(bad, 1):  # the first of each stretch of non-finite values
        out.append({"step": int(s[i]), "kind": f"{prefix}_nonfinite", "value": float(v[i]), "threshold": math.nan})
    thr = spike_threshold(v, min_rise)
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(np.isfinite(v) & (v > thr))
    for i in _episodes(hit, merge):
        out.append({"step": int(s[i]), "kind": f"{prefix}_spike", "value": float(v[i]), "threshold": float(thr[i])})
    return out


def detect_events(loss: pd.Series | Sequence[float] | np.ndarray, steps: Sequence[int] | None = None, *,
                  grad_norm: pd.Series | None = None, merge: int = EVENT_MERGE) -> pd.DataFrame:
    """Events in a recorded loss series (and optionally ``grad.global_norm``): columns step, kind, value, threshold.

    ``loss``: a Series indexed by step, or values with ``steps`` (default 0, 1, ...). Kinds:
    ``loss_spike`` (the ``loss_spikes`` finding's rule, rise floor included: the value and the threshold it
    crossed), ``loss_nonfinite`` (the first step of each stretch of NaN/inf; threshold NaN), and with
    ``grad_norm`` also ``grad_spike`` / ``grad_nonfinite``. Spikes of one kind within ``merge`` recorded
    steps of the previous one are one episode, reported at its first step. Sorted by step.
    """
    from ..core.robust import SPIKE_MIN_RISE

    s, v = _series(loss, steps)
    rows = _detect(s, v, "loss", SPIKE_MIN_RISE, merge)
    if grad_norm is not None:
        gs, gv = _series(grad_norm)
        rows += _detect(gs, gv, "grad", 0.0, merge)
    df = pd.DataFrame(rows, columns=_EVENT_COLUMNS)
    df = df.astype({"step": np.int64, "value": float, "threshold": float})
    return df.sort_values(["step", "kind"], kind="stable").reset_index(drop=True)


def event_rows(events: pd.DataFrame) -> list[tuple[int, str, str, float]]:
    """The ``(step, metric, layer, value)`` scalar rows that store ``events`` (columns step, kind, value,
    threshold): ``event.<kind>`` = value and ``event.<kind>.threshold`` = threshold, layer ``""``."""
    rows: list[tuple[int, str, str, float]] = []
    for r in events.itertuples(index=False):
        kind = str(r.kind)
        if not kind or "." in kind:
            raise ValueError(f"event kind must be a non-empty name without dots, got {kind!r}")
        rows.append((int(r.step), EVENT_PREFIX + kind, "", float(r.value)))
        rows.append((int(r.step), EVENT_PREFIX + kind + THRESHOLD_SUFFIX, "", float(r.threshold)))
    return rows


def _no_events() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                         (("step", np.int64), ("kind", object), ("value", float), ("threshold", float))})


def run_events(run: str | os.PathLike[str] | RunData, *, detect: bool | None = None) -> pd.DataFrame:
    """Events of a run: columns step, kind, value, threshold, source, detail (a warning's drifting signals
    and modules, None for other events).

    The stored ``event.<kind>`` rows (source ``"recorded"``) when the run has any or was recorded with
    the sentinel (which judged every step: no stored event means it saw none), and ``detect`` is not
    True; otherwise :func:`detect_events` on the recorded ``loss`` and ``grad.global_norm`` (source
    ``"detected"``). ``detect=False`` never detects.
    """
    from ..store import query

    run = as_run(run)
    kinds = [m for m in query.metrics(run) if m.startswith(EVENT_PREFIX) and not m.endswith(THRESHOLD_SUFFIX)]
    watched = bool(run.meta.get("sentinel"))  # a live sentinel judged every step: no event means none
    if (kinds or watched) and not detect:
        parts = []
        for m in kinds:
            s, v = query.series(run, m, "")
            ts, tv = query.series(run, m + THRESHOLD_SUFFIX, "")
            thr = pd.Series(tv, index=ts).reindex(s).to_numpy(dtype=float) if len(ts) else np.full(len(s), np.nan)
            parts.append(pd.DataFrame({"step": s, "kind": m[len(EVENT_PREFIX):], "value": v, "threshold": thr}))
        df = pd.concat(parts, ignore_index=True) if parts else _no_events()
        df["source"] = pd.Series(["recorded"] * len(df), dtype=object)
    elif detect is False or not query.has(run, "loss"):
        df = _no_events()
        df["source"] = pd.Series(dtype=object)
    else:
        s, v = query.series(run, "loss", "")
        grad = None
        if query.has(run, "grad.global_norm"):
            gs, gv = query.series(run, "grad.global_norm", "")
            grad = pd.Series(gv, index=gs)
        df = detect_events(v, s, grad_norm=grad)
        df["source"] = "detected"
    detail = {}
    if len(df):  # an event's detail, when it has one, is the mark event.<kind> at its step
        marks = run.marks()
        detail = {(int(st), str(key)[len(EVENT_PREFIX):]): val for st, key, val in
                  zip(marks["step"], marks["key"], marks["value"]) if str(key).startswith(EVENT_PREFIX)}
    df["detail"] = [detail.get((int(s), str(k))) for s, k in zip(df["step"], df["kind"])]
    return df.sort_values(["step", "kind"], kind="stable").reset_index(drop=True)


def module_of(layer: str, parameters: Sequence[str] = ()) -> str:
    """The module that owns ``layer``: a parameter name (listed in ``parameters``, or ending in ``.weight`` /
    ``.bias`` when no list is given) loses its last component; a module name is returned as is."""
    if (layer in parameters or (not parameters and layer.rsplit(".", 1)[-1] in ("weight", "bias"))) \
            and "." in layer:
        return layer.rsplit(".", 1)[0]
    return layer


def _departures(y: np.ndarray, nonfinite: np.ndarray, search: int, window: int, k: float,
                min_ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the last ``search`` rows of ``y`` (log values, NaN where missing; one column per series):
    out-of-band mask, deviation from the trailing median, robust SD and the median. ``nonfinite`` marks
    stored NaN/inf values: after a finite past they have left every band."""
    med, mad = rolling_band(y, window)
    sd = MAD_TO_SD * mad
    dev = y - med
    half = np.fmax(k * sd, math.log(min_ratio))
    with np.errstate(invalid="ignore"):
        out = ((np.abs(dev) > half) | nonfinite) & np.isfinite(med)
    return out[-search:], dev[-search:], sd[-search:], med[-search:]


def fold_ratio(d: float) -> float:
    """exp(|d|) for a log-space deviation; inf instead of an OverflowError (a zero among positive values)."""
    return math.exp(abs(d)) if abs(d) < 700 else math.inf


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(np.clip(x, 1e-300, None))
    return np.where(np.isfinite(x), y, np.nan)


def _forward_order(layers: Sequence[str]) -> dict[str, int]:
    """When each module's output is complete in a forward pass, as a rank: modules are listed in model
    order (a parent before its children), and a parent's output comes after all of its children's."""
    pos = {lay: i for i, lay in enumerate(layers)}
    done = {}
    for lay in layers:
        kids = [pos[k] for k in layers if k.startswith(lay + ".")] if lay else list(pos.values())
        done[lay] = (max(kids, default=pos[lay]), -lay.count("."))
    return {lay: r for r, lay in enumerate(sorted(layers, key=lambda n: done[n]))}


def forensics(run: str | os.PathLike[str] | RunData, step: int, *, metrics: Sequence[str] = FORENSIC_METRICS,
              window: int = BAND_WINDOW, lookback: int = LOOKBACK, k: float = BAND_MADS,
              min_ratio: float = MIN_RATIO) -> pd.DataFrame:
    """Candidate causes of the event at ``step``: modules (and param groups) ranked by how far they left
    their recent band before it.

    Columns: ``module`` (a parameter's row is reported under its module; a param group's name for
    ``optim.lr``), ``metric``, ``first_step`` (a recorded step within ``lookback`` recorded steps up to
    ``step`` where the value left its band: |log x - median| > max(k x 1.4826 x MAD, log(min_ratio))
    over the ``window`` previous recorded values, or became non-finite; which one: below),
    ``ratio`` (x / median at that step, folded to >= 1; inf when non-finite), ``direction`` (up / down /
    non-finite), ``z`` (robust SDs from the median), ``value``, ``median``, ``lead`` (steps between
    ``first_step`` and the step at which the loss left its own band, positive = before the loss moved),
    ``layer`` (the recorded layer). One row per module and metric: the first step it went non-finite, else
    its first rise within 2x of its largest, else (it never rose) its first drop within 2x of its largest;
    what stayed in its band is left out. Order: hyperparameters that moved (``optim.lr``: set by the user
    or a scheduler, so a cause, not an effect); rises before anything went non-finite (what broke it),
    largest first; non-finite values (earliest first; at one step activations before gradients and
    updates, in forward order: the first module whose output went non-finite made it); the other rises,
    largest first (ties: earlier, then deeper module: a parent that holds only the culprit moves with
    it); drops (a spike's cause moves up: a minibatch dip of one layer's gradient is not it).
    ``df.attrs`` holds ``event_step`` and ``loss_step``.
    """
    from ..store import query

    run = as_run(run)
    step = int(step)
    if window < MIN_PERIODS or lookback < 0:
        raise ValueError(f"window must be >= {MIN_PERIODS} and lookback >= 0, got {window} and {lookback}")
    if min_ratio < 1:
        raise ValueError(f"min_ratio must be >= 1, got {min_ratio}")
    params = list(run.meta.get("parameters") or [])
    loss_step = step
    if query.has(run, "loss"):
        s, v = query.series(run, "loss", "")
        keep = s <= step
        s, v = s[keep][-(window + lookback + 1):], v[keep][-(window + lookback + 1):]
        if len(s):
            search = min(lookback + 1, len(s))
            out, dev, _, _ = _departures(_log(v), ~np.isfinite(v), search, window, k, min_ratio)
            with np.errstate(invalid="ignore"):
                up = out & ((dev > 0) | ~np.isfinite(v[-search:]))
            if up.any():
                loss_step = int(s[-search:][np.argmax(up)])
    rows: list[dict[str, Any]] = []
    for metric in metrics:
        if not query.has(run, metric):
            continue
        lays = [lay for lay in query.layers(run, metric) if lay != ""]
        if not lays:
            continue
        st = query.steps(run, metric, lays[0])
        pts = [int(p) for p in st[st <= step][-(window + lookback + 1):]]
        if not pts:
            continue
        q = query.query(run, metric, lays, pts)
        pos = {p: i for i, p in enumerate(pts)}
        col = {lay: j for j, lay in enumerate(lays)}
        x = np.full((len(pts), len(lays)), np.nan)
        ii = np.array([pos[int(t)] for t in q["step"]], dtype=np.int64)
        jj = np.array([col[lay] for lay in q["layer"]], dtype=np.int64)
        x[ii, jj] = q["value"].to_numpy(dtype=float)
        nonfinite = np.zeros_like(x, dtype=bool)
        nonfinite[ii, jj] = ~np.isfinite(q["value"].to_numpy(dtype=float))  # stored NaN/inf, not missing
        search = min(lookback + 1, len(pts))
        out, dev, sd, med = _departures(_log(x), nonfinite, search, window, k, min_ratio)
        s_search, xs = pts[-search:], x[-search:]
        order = _forward_order(lays) if metric.startswith("act.") else {}
        for j, lay in enumerate(lays):
            hit = np.flatnonzero(out[:, j])
            if len(hit) == 0:
                continue
            bad = hit[~np.isfinite(xs[hit, j])]
            with np.errstate(invalid="ignore"):
                rise = hit[dev[hit, j] > 0]
            if len(bad):  # the first step it went non-finite
                i = int(bad[0])
            else:  # its first rise within 2x of its largest; the same for drops when it never rose
                pick = rise if len(rise) else hit
                size = np.abs(dev[pick, j])
                i = int(pick[np.flatnonzero(size >= size.max() - math.log(2.0))[0]])
            fin = bool(np.isfinite(xs[i, j]))
            d = float(dev[i, j]) if fin else math.inf
            direction = "non-finite" if not fin else ("up" if d > 0 else "down")
            rows.append({"module": module_of(lay, params), "metric": metric, "first_step": s_search[i],
                         "ratio": fold_ratio(d) if fin else math.inf, "direction": direction,
                         "z": abs(d) / sd[i, j] if fin and sd[i, j] > 0 else math.inf,
                         "value": float(xs[i, j]), "median": math.exp(float(med[i, j])),
                         "lead": loss_step - s_search[i], "layer": lay,
                         "_forward": order.get(lay, len(order)) if metric.startswith("act.") else math.inf})
    df = pd.DataFrame(rows, columns=[*_FORENSIC_COLUMNS, "_forward"])
    if len(df):
        hyper = df["metric"].map(lambda m: m.startswith(HYPERPARAMETERS)) & (df["direction"] != "down")
        broke = df.loc[df["direction"] == "non-finite", "first_step"]
        before = (df["direction"] == "up") & (df["first_step"] < (broke.min() if len(broke) else -1))
        # 0: a hyperparameter moved; 1: rises before anything went non-finite (what broke it); 2: non-finite;
        # 3: other rises; 4: drops
        df["_class"] = np.select([hyper, before, df["direction"] == "non-finite", df["direction"] == "up"],
                                 [0, 1, 2, 3], 4)
        df["_depth"] = [m.count(".") + 1 if m else 0 for m in df["module"]]
        # non-finite values by time, then forward order; everything else by size
        df["_time"] = np.where(df["_class"] == 2, df["first_step"], 0)
        df["_neg"] = np.where(df["_class"] == 2, 0.0, -df["ratio"])
        df = df.sort_values(["_class", "_time", "_forward", "_neg", "first_step", "_depth"],
                            ascending=[True, True, True, True, True, False], kind="stable")
        df = df.drop_duplicates(["module", "metric"]).drop(columns=["_class", "_depth", "_time", "_neg"])
        df = df.reset_index(drop=True)
    df = df.drop(columns=["_forward"])
    df = df.astype({"first_step": np.int64, "lead": np.int64}) if len(df) else df
    df.attrs.update(event_step=step, loss_step=loss_step)
    return df

