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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import RunData

__all__ = ["layers", "steps", "query", "series", "at_steps", "layer_max", "non_finite_summary", "has", "metrics",
           "depth_modules", "noise_scale_points", "DepthProfile", "depth_profile", "first_last"]

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


def _pattern(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def depth_modules(run: RunData, metric: str) -> tuple[list[str], str]:
    """Modules along the main path, in depth order, and how they were chosen.

    1. meta ``blocks`` (the residual blocks the user marked), when recorded;
    2. else the recorded modules whose names, with every number replaced by
       ``#``, share the shallowest repeated pattern with at least 3 members
       (``h.#``, ``layers.#``, ``layer#.#`` for ResNet stages, ``#`` for an
       nn.Sequential), in model order;
    3. else the top-level modules (no ``.`` in the name).
    """
    recorded = layers(run, metric)
    rec = set(recorded)
    blocks = run.meta.get("blocks")
    if blocks:
        chosen = [b for b in blocks if b in rec]
        if chosen:
            return chosen, "depth = the residual blocks marked in the run (meta 'blocks')"
    groups: dict[str, list[str]] = {}
    for name in recorded:
        if name:
            groups.setdefault(_pattern(name), []).append(name)
    cands = [(p.count(".") , -len(v), p) for p, v in groups.items() if len(v) >= 3 and "#" in p]
    if cands:
        _, _, pat = min(cands)
        return groups[pat], (f"depth = recorded modules matching '{pat}' (# = any index): the shallowest "
                             "repeated module pattern with at least 3 members, in model order")
    top = [n for n in recorded if n and "." not in n]
    return top, "depth = top-level modules in model order (no repeated block pattern found)"


def noise_scale_points(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """Steps and tr(Sigma)/|G|^2 at every measurement, +inf where the |G|^2 estimate is <= 0 (noise dominates:
    B_simple beyond what the probe batch resolves) and tr(Sigma) > 0, NaN where both are <= 0."""
    s_g, g = series(run, "gns.grad_sq")
    s_t, t = series(run, "gns.trace_cov")
    df = pd.DataFrame({"g": pd.Series(g, index=s_g), "t": pd.Series(t, index=s_t)}).dropna()
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(df["g"] > 0, df["t"] / df["g"], np.where(df["t"] > 0, np.inf, np.nan))
    return df.index.to_numpy(dtype=np.int64), b.astype(float)


__all__ += ["artifact_steps", "artifact", "marks"]


def artifact_steps(run: RunData, name: str) -> list[int]:
    """Steps at which artifact ``name`` was saved, in order (empty when never, or when the run has no readable
    artifact index: an old or partial run)."""
    c = _cache(run)
    key = ("artifact_steps", name)
    if key not in c:
        try:
            c[key] = [int(s) for s in run.artifacts(name)["step"]]
        except Exception:  # noqa: BLE001 - no artifact index: nothing recorded
            c[key] = []
    return c[key]


def artifact(run: RunData, name: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of artifact ``name`` at ``step`` (default: the last one); not cached (arrays)."""
    return run.load_artifact(name, step)


def marks(run: RunData, key: str) -> pd.DataFrame:
    """The run's marks ``key`` as rows ``step, key, value`` by step (empty when none, or unreadable)."""
    c = _cache(run)
    ck = ("marks", key)
    if ck not in c:
        try:
            c[ck] = run.marks(key)
        except Exception:  # noqa: BLE001 - an old or partial run: no marks
            c[ck] = pd.DataFrame({"step": [], "key": [], "value": []})
    return c[ck]


@dataclass(frozen=True)
class DepthProfile:
    """A metric along the depth modules at chosen steps (the depth figures and rules): ``modules`` in
    depth order, how they were chosen, the chosen ``steps`` (sorted, possibly empty) and their values
    (``table``: steps x modules)."""

    modules: list[str]
    how: str
    steps: list[int]
    table: pd.DataFrame
    recorded: np.ndarray  # every step recorded for the first module (what ``pick`` chose from)

    def at(self, step: int) -> np.ndarray:
        """The profile at ``step``: one value per depth module."""
        return self.table.loc[step].to_numpy(dtype=float)


def depth_profile(run: RunData, metric: str, pick: Callable[[np.ndarray], Sequence[int]],
                  modules: tuple[list[str], str] | None = None) -> DepthProfile | None:
    """``metric`` along the depth modules (:func:`depth_modules`, or ``modules`` = (names, how)) at the
    steps ``pick`` chooses from those recorded for the first module; None when there is no depth module."""
    mods, how = depth_modules(run, metric) if modules is None else modules
    if not mods:
        return None
    recorded = steps(run, metric, mods[0])
    chosen = sorted({int(s) for s in pick(recorded)})
    return DepthProfile(list(mods), how, chosen, at_steps(run, metric, mods, chosen), recorded)


def first_last(st: np.ndarray) -> list[int]:
    """The first and the last recorded step (one when they are the same; none when nothing is recorded)."""
    return [int(st[0]), int(st[-1])] if len(st) else []
