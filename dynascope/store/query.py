"""Selective reads of a run's scalars for reports, cached per report.

``RunData.scalars`` loads a whole metric; a long run (10,000 steps x 100
layers) has a million rows per metric, and a report needs only a few layers
at every step, or every layer at a few steps. These helpers ask
:class:`~dynascope.store.RunData` for just those rows (seeks in the store's
``(series, step)`` key, or the ``(metric, layer, step)`` index of a format-1
run) and cache the answers for one report. Non-finite values come back as NaN
(NULL in SQLite) or +-inf.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import RunData

__all__ = ["layers", "steps", "query", "series", "at_steps", "layer_max", "non_finite_summary", "has", "metrics"]

_CACHE_ATTR = "_dynascope_report_cache"


def _cache(run: RunData) -> dict[Any, Any]:
    c = getattr(run, _CACHE_ATTR, None)
    if c is None:
        c = {}
        setattr(run, _CACHE_ATTR, c)
    return c


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
        found = run.layer_names(metric) if has(run, metric) else []
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
            c[key] = run.steps(metric, layer if layer is not None else lays[0])
    return c[key]


def query(run: RunData, metric: str, layers_: Sequence[str] | None = None,
          steps_: Sequence[int] | None = None) -> pd.DataFrame:
    """Rows ``step, layer, value`` of ``metric``, optionally only these layers / steps."""
    return run.query(metric, layers_, steps_)


def series(run: RunData, metric: str, layer: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric and layer; the last value wins for repeated steps."""
    c = _cache(run)
    key = ("series", metric, layer)
    if key not in c:
        c[key] = run.series(metric, layer)
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
        c[key] = run.layer_max(metric, layers_)
    return c[key]


def non_finite_summary(run: RunData) -> pd.DataFrame:
    """Per metric and layer: count and first step of NaN / +-inf values (reads only those rows)."""
    c = _cache(run)
    if "nonfinite" not in c:
        c["nonfinite"] = run.non_finite()
    return c["nonfinite"]
