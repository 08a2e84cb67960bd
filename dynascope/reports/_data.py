"""Selective reads of a run's scalars for reports.

``RunData.scalars`` loads a whole metric; a long run (10,000 steps x 100
layers) has a million rows per metric, and a report needs only a few layers
at every step, or every layer at a few steps. These helpers query the
SQLite index ``(metric, layer, step)`` directly with seeks, so a report reads
a small fraction of the run. Non-finite values come back as NaN (NULL in
SQLite) or +-inf.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..store import DB_NAME, RunData

__all__ = ["layers", "steps", "query", "series", "at_steps", "layer_max", "non_finite_summary", "has", "metrics"]

_CACHE_ATTR = "_dynascope_report_cache"


def _cache(run: RunData) -> dict[Any, Any]:
    c = getattr(run, _CACHE_ATTR, None)
    if c is None:
        c = {}
        setattr(run, _CACHE_ATTR, c)
    return c


def _connect(run: RunData) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{run.path / DB_NAME}?mode=ro", uri=True, timeout=30)


def _rows(run: RunData, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    con = _connect(run)
    try:
        return con.execute(sql, tuple(params)).fetchall()
    finally:
        con.close()


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def metrics(run: RunData) -> list[str]:
    """Recorded metric names, read once per report (the run may still grow)."""
    c = _cache(run)
    if "metrics" not in c:
        c["metrics"] = run.metrics()
    return c["metrics"]


def has(run: RunData, metric: str) -> bool:
    return metric in metrics(run)


def layers(run: RunData, metric: str) -> list[str]:
    """Layers of ``metric`` in model order (meta ``modules`` then ``parameters``), others after."""
    c = _cache(run)
    key = ("layers", metric)
    if key not in c:
        found: list[str] = []
        if has(run, metric):
            con = _connect(run)
            try:
                row = con.execute("SELECT MIN(layer) FROM scalars WHERE metric = ?", (metric,)).fetchone()
                while row and row[0] is not None:
                    found.append(row[0])
                    row = con.execute(
                        "SELECT MIN(layer) FROM scalars WHERE metric = ? AND layer > ?", (metric, row[0])
                    ).fetchone()
            finally:
                con.close()
        names = list(run.meta.get("modules") or []) + list(run.meta.get("parameters") or [])
        order = {n: i for i, n in enumerate(names)}
        c[key] = sorted(found, key=lambda n: (order.get(n, len(order)), _natural_key(n)))
    return c[key]


def steps(run: RunData, metric: str, layer: str | None = None) -> np.ndarray:
    """Sorted steps at which ``metric`` was recorded (for ``layer``, default its first layer)."""
    c = _cache(run)
    key = ("steps", metric, layer)
    if key not in c:
        lays = layers(run, metric)
        if not lays:
            c[key] = np.zeros(0, dtype=np.int64)
        else:
            lay = layer if layer is not None else lays[0]
            rows = _rows(run, "SELECT DISTINCT step FROM scalars WHERE metric = ? AND layer = ? ORDER BY step",
                         (metric, lay))
            c[key] = np.array([r[0] for r in rows], dtype=np.int64)
    return c[key]


def query(run: RunData, metric: str, layers_: Sequence[str] | None = None,
          steps_: Sequence[int] | None = None) -> pd.DataFrame:
    """Rows ``step, layer, value`` of ``metric``, optionally only these layers / steps."""
    sql = "SELECT step, layer, value FROM scalars WHERE metric = ?"
    params: list[Any] = [metric]
    if layers_ is not None:
        layers_ = list(layers_)
        if not layers_:
            return pd.DataFrame({"step": [], "layer": [], "value": []})
        sql += f" AND layer IN ({','.join('?' * len(layers_))})"
        params += layers_
    if steps_ is not None:
        steps_ = [int(s) for s in steps_]
        if not steps_:
            return pd.DataFrame({"step": [], "layer": [], "value": []})
        sql += f" AND step IN ({','.join('?' * len(steps_))})"
        params += steps_
    rows = _rows(run, sql + " ORDER BY layer, step", params)
    df = pd.DataFrame(rows, columns=["step", "layer", "value"])
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    return df


def series(run: RunData, metric: str, layer: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric and layer; the last value wins for repeated steps."""
    c = _cache(run)
    key = ("series", metric, layer)
    if key not in c:
        rows = _rows(run, "SELECT step, value FROM scalars WHERE metric = ? AND layer = ? ORDER BY step",
                     (metric, layer))
        if not rows:
            c[key] = (np.zeros(0, dtype=np.int64), np.zeros(0))
        else:
            s = np.array([r[0] for r in rows], dtype=np.int64)
            v = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=float)
            keep = np.r_[s[1:] != s[:-1], True]
            c[key] = (s[keep], v[keep])
    return c[key]


def at_steps(run: RunData, metric: str, layers_: Sequence[str], steps_: Sequence[int]) -> pd.DataFrame:
    """step x layer table of ``metric`` at the given steps, columns in the given layer order."""
    df = query(run, metric, layers_, steps_)
    if df.empty:
        return pd.DataFrame(index=pd.Index(list(steps_), name="step"), columns=list(layers_), dtype=float)
    table = df.pivot_table(index="step", columns="layer", values="value", aggfunc="last", dropna=False)
    return table.reindex(index=list(steps_), columns=list(layers_))


def layer_max(run: RunData, metric: str, layers_: Sequence[str] | None = None) -> dict[str, float]:
    """Largest finite-or-inf value of ``metric`` per layer over all steps (NaN rows ignored)."""
    c = _cache(run)
    key = ("max", metric, None if layers_ is None else tuple(layers_))
    if key not in c:
        sql = "SELECT layer, MAX(value) FROM scalars WHERE metric = ?"
        params: list[Any] = [metric]
        if layers_ is not None:
            sql += f" AND layer IN ({','.join('?' * len(layers_))})"
            params += list(layers_)
        c[key] = {lay: (np.nan if v is None else float(v)) for lay, v in _rows(run, sql + " GROUP BY layer", params)}
    return c[key]


def non_finite_summary(run: RunData) -> pd.DataFrame:
    """Per metric and layer: count and first step of NaN / +-inf values (one scan of the table)."""
    c = _cache(run)
    if "nonfinite" not in c:
        # runs written by this version keep a partial index of exactly these rows (store.py), so the
        # query reads only the non-finite rows; older runs fall back to one scan of the table
        indexed = bool(_rows(run, "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'scalars_nonfinite'"))
        rows = _rows(
            run,
            "SELECT metric, layer, COUNT(*), MIN(step), SUM(value IS NULL), SUM(value > 1e308 OR value < -1e308) "
            f"FROM scalars {'INDEXED BY scalars_nonfinite ' if indexed else ''}"
            "WHERE value IS NULL OR value > 1e308 OR value < -1e308 GROUP BY metric, layer",
        )
        c["nonfinite"] = pd.DataFrame(rows, columns=["metric", "layer", "count", "first_step", "n_nan", "n_inf"])
    return c["nonfinite"]
