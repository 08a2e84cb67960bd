"""The report's forensics and comparison sections: tables and small-multiples figures.

* Forensics (opens the report): for each event of each run (at most ``MAX_EVENTS`` per run, loss events
  first), the ranked table of :func:`dynascope.analysis.forensics.forensics` and a figure of the loss and the top
  modules' norms around the event, each panel with its running band (median +- k robust SDs of the
  previous values, the band the table tests) and the event and first-departure steps marked.
* Comparison (with a baseline): the first deviations of :func:`dynascope.compare` and a figure of the run
  against the baseline's band for the top deviating layers.

Figures are rendered by the caller (``render``), so this module does not depend on the HTML writer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis.forensics import (
    BAND_MADS,
    BAND_WINDOW,
    EVENT_MERGE,
    LOOKBACK,
    MIN_RATIO,
    forensics,
    rolling_band,
    run_events,
)
from ..core.drift import describe
from ..core.robust import MAD_TO_SD
from ..store import RunData, query
from .figures._helpers import CAPTION_ATTR, few_xticks, finish, log_axis, new_figure, plot_series, set_caption, text

__all__ = ["forensics_items", "comparison_items", "forensics_figure", "comparison_figure", "MAX_EVENTS",
           "TOP_ROWS", "TOP_PANELS", "COMPARISON_FIGURE"]

MAX_EVENTS = 3      # events per run shown in the report
TOP_ROWS = 10       # rows of each table
TOP_PANELS = 4      # modules / deviations drawn
COMPARISON_FIGURE = "baseline_deviations"
_RUN_COLOR = "#1f77b4"
_BASE_COLOR = "#7f7f7f"
_EVENT_COLOR = "#cf222e"

Render = Callable[[Figure], Any]


def _g(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.3g}"
    return str(x)


def _window_series(run: RunData, metric: str, layer: str, lo: int, hi: int, window: int
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Steps and values in [lo, hi], preceded by up to ``window`` earlier recorded values (for the band);
    the third value is how many leading values are only there for the band."""
    s, v = query.series(run, metric, layer)
    if len(s) == 0:
        return s, v, 0
    a, b = int(np.searchsorted(s, lo, side="left")), int(np.searchsorted(s, hi, side="right"))
    start = max(a - window, 0)
    return s[start:b], v[start:b], a - start


def _band_panel(ax, s: np.ndarray, v: np.ndarray, skip: int, step: int, color: str, label: str,
                window: int) -> None:
    """The series on a log axis with its trailing band exp(median +- k robust SDs), as forensics tests it,
    drawn up to the event ``step``; the first ``skip`` values only feed the band."""
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(np.isfinite(v) & (v > 0), np.log(np.clip(v, 1e-300, None)), np.nan)
    med, mad = rolling_band(y, window)
    half = np.fmax(BAND_MADS * MAD_TO_SD * mad, math.log(MIN_RATIO))
    s, v, med, half = s[skip:], v[skip:], med[skip:], half[skip:]
    ok = np.isfinite(med) & (s <= step)
    if ok.any():
        ax.fill_between(s[ok], np.exp(med[ok] - half[ok]), np.exp(med[ok] + half[ok]), color=color, alpha=0.12,
                        linewidth=0)
    plot_series(ax, s, v, color=color, label=label, log=True, linewidth=1.3)


def forensics_figure(run: RunData, event: pd.Series, table: pd.DataFrame, *, panels: int = TOP_PANELS,
                     window: int = BAND_WINDOW, lookback: int = LOOKBACK) -> Figure | None:
    """Small multiples: the loss, then the first ``panels`` modules of ``table`` (each with the metrics it
    departed in), around the event; the running band shaded, the event step (red) and the module's first
    departure (dotted) marked."""
    step = int(event["step"])
    every = max(int(run.meta.get("every") or 1), 1)
    lo, hi = step - (lookback + window // 2) * every, step + max(lookback // 2, 5) * every
    mods = list(dict.fromkeys(table["module"]))[:panels]
    n = 1 + len(mods)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = new_figure(10, 2.5 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    s, v, skip = _window_series(run, "loss", "", lo, hi, window)
    if len(s):
        _band_panel(axes[0], s, v, skip, step, "#000000", "loss", window)
        # a short run: the axis spans the steps it has, not the look-back it lacks (the event stays inside)
        lo, hi = max(lo, min(int(s.min()), step)), min(hi, max(int(s.max()), step))
    axes[0].set_title("loss", fontsize=9)
    for ax, mod in zip(axes[1:], mods):
        sub = table[table["module"] == mod]
        for c, (_, row) in zip(colors, sub.iterrows()):
            s, v, skip = _window_series(run, str(row["metric"]), str(row["layer"]), lo, hi, window)
            if len(s):
                _band_panel(ax, s, v, skip, step, c, f"{row['metric']} ({_g(row['ratio'])}x {row['direction']})",
                            window)
            ax.axvline(int(row["first_step"]), color=c, linestyle=":", linewidth=1.2)
        ax.set_title(text(f"#{mods.index(mod) + 1} {mod}"), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    for ax in axes[:n]:
        ax.axvline(step, color=_EVENT_COLOR, linestyle="--", linewidth=1.0)
        ax.set_xlim(lo, hi)
        if ax.get_yscale() != "log" and ax.has_data():
            log_axis(ax)
        few_xticks(ax)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    finish(fig, rows, cols, legend=False, top=0.3, hgap=0.7)
    set_caption(fig, f"Run {run.name}: {event['kind']} at step {step} (red dashed line). Panels: the loss and "
                f"the top-ranked modules, in the table's order; shaded: the recent band "
                f"exp(median +- {BAND_MADS:g} robust SDs of log value, at least {MIN_RATIO:g}x) over the "
                f"previous {window} recorded values; dotted: the step each metric is reported at.")
    return fig


def _priority(kind: str) -> int:
    """Which event of an episode heads its forensics: a loss event, then a spike or non-finite gradient, then
    a module jump, then an early warning."""
    if kind.startswith("loss"):
        return 0
    if kind.startswith("grad_spike") or kind.endswith("nonfinite"):
        return 1
    return 2 if kind.endswith("_jump") else 3


def _events_to_show(events: pd.DataFrame, max_events: int) -> pd.DataFrame:
    if events.empty:
        return events
    ev = events.sort_values("step", kind="stable").reset_index(drop=True)
    steps = ev["step"].to_numpy()
    # events within EVENT_MERGE steps of the previous one are one episode: their forensics repeat
    episode = np.r_[0, np.cumsum(np.diff(steps) > EVENT_MERGE)]
    ev = ev.assign(_episode=episode, _prio=[_priority(str(k)) for k in ev["kind"]])
    heads = ev.sort_values(["_episode", "_prio", "step"], kind="stable").drop_duplicates("_episode")
    chosen = heads.sort_values(["_prio", "step"], kind="stable").head(max_events)
    return chosen.drop(columns=["_episode", "_prio"])  # loss events first (by step), then the others


def forensics_items(runs: Sequence[RunData], render: Render, *, max_events: int = MAX_EVENTS,
                    top: int = TOP_ROWS) -> list[dict[str, Any]]:
    """One entry per shown event: run, event fields, the table rows (strings), the rendered figure, and
    a note on the events left out."""
    items: list[dict[str, Any]] = []
    for ri, run in enumerate(runs):
        try:
            events = run_events(run)
        except Exception as exc:  # noqa: BLE001 - a broken run must not lose the report
            items.append({"run": run.name, "error": f"{type(exc).__name__}: {exc}", "anchor": f"forensics-{ri}"})
            continue
        shown = _events_to_show(events, max_events)
        left = len(events) - len(shown)
        for ei, (_, ev) in enumerate(shown.iterrows()):
            item: dict[str, Any] = {
                "run": run.name, "step": int(ev["step"]), "kind": str(ev["kind"]), "value": _g(float(ev["value"])),
                "threshold": _g(float(ev["threshold"])), "source": str(ev["source"]),
                "anchor": f"forensics-{ri}-{ei}", "rows": [], "figure": None, "error": None,
                "detail": describe(ev.get("detail")),
                "more": (f"{left} more event(s) in this run (run.events() lists them all)"
                         if left and ei == len(shown) - 1 else ""),
            }
            try:
                table = forensics(run, int(ev["step"]))
                item["loss_step"] = int(table.attrs.get("loss_step", ev["step"]))
                item["rows"] = [{"rank": i + 1, "module": r["module"], "metric": r["metric"],
                                 "first_step": int(r["first_step"]), "lead": int(r["lead"]), "ratio": _g(r["ratio"]),
                                 "direction": r["direction"], "z": _g(r["z"])}
                                for i, (_, r) in enumerate(table.head(top).iterrows())]
                item["n_rows"] = len(table)
                if len(table):
                    fig = forensics_figure(run, ev, table)
                    item["figure"] = render(fig) if fig is not None else None
                    item["caption"] = str(getattr(fig, CAPTION_ATTR, "") or "")
            except Exception as exc:  # noqa: BLE001
                item["error"] = f"{type(exc).__name__}: {exc}"
            items.append(item)
    return items


def comparison_figure(run: RunData, baseline: RunData, dev: pd.DataFrame, *, panels: int = 6) -> Figure | None:
    """Small multiples of the first deviating layers (one panel per layer, its first metric): the run, the
    baseline and the band the run is tested against; the first deviating step marked."""
    from ..analysis.comparison import band
    from ..analysis.findings import distinct_layers

    firsts = dev[dev["layer"].isin(distinct_layers(dev)[:panels])].drop_duplicates("layer")
    if firsts.empty:
        return None
    n = len(firsts)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = new_figure(10, 2.6 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (_, row) in zip(axes, firsts.iterrows()):
        b = band(run, baseline, str(row["metric"]), str(row["layer"]))
        log = bool(np.all(b["baseline"].dropna() > 0))
        ax.fill_between(b["step"], b["low"], b["high"], color=_BASE_COLOR, alpha=0.18, linewidth=0,
                        label="baseline band")
        plot_series(ax, b["step"].to_numpy(), b["baseline"].to_numpy(), color=_BASE_COLOR,
                    label=text(f"baseline {baseline.name}"), log=log, linewidth=1.0)
        plot_series(ax, b["step"].to_numpy(), b["value"].to_numpy(), color=_RUN_COLOR, label=text(run.name), log=log,
                    linewidth=1.3)
        ax.axvline(int(row["first_step"]), color=_EVENT_COLOR, linestyle="--", linewidth=1.0)
        if log:
            log_axis(ax)
        lay = str(row["layer"]) or "run-level"
        ax.set_title(text(f"{row['metric']} · {lay}"), fontsize=9)
        few_xticks(ax)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7, loc="best", frameon=False)
    for ax in axes[n:]:
        ax.set_visible(False)
    finish(fig, rows, cols, legend=False, top=0.3, hgap=0.7)
    set_caption(fig, f"Run {run.name} against baseline {baseline.name}: the first {n} deviating layers in the "
                "comparison order, each with its first deviating metric. Grey band: the baseline's value and "
                "rolling median widened by its own step-to-step spread (docs/forensics.md); red dashed line: the "
                "first step of the deviation.")
    return fig


def comparison_items(runs: Sequence[RunData], baseline: RunData, deviations: dict[str, pd.DataFrame],
                     render: Render, *, top: int = 15) -> list[dict[str, Any]]:
    """One entry per run: the first ``top`` deviations (strings) and the rendered comparison figure."""
    items = []
    for i, run in enumerate(runs):
        dev = deviations.get(run.name)
        item: dict[str, Any] = {"run": run.name, "baseline": baseline.name, "rows": [], "figure": None,
                                "n_rows": 0 if dev is None else len(dev), "error": None,
                                "anchor": "fig-" + COMPARISON_FIGURE if i == 0 else f"fig-{COMPARISON_FIGURE}-{i}"}
        if dev is None:
            item["error"] = "no comparison (see the warning above)"
        else:
            item["rows"] = [{"metric": r["metric"], "layer": r["layer"], "first_step": int(r["first_step"]),
                             "ratio": _g(r["ratio"]), "direction": r["direction"], "z": _g(r["z"]),
                             "n_steps": int(r["n_steps"])} for _, r in dev.head(top).iterrows()]
            try:
                fig = comparison_figure(run, baseline, dev)
                item["figure"] = None if fig is None else render(fig)
                item["caption"] = "" if fig is None else str(getattr(fig, CAPTION_ATTR, "") or "")
            except Exception as exc:  # noqa: BLE001
                item["error"] = f"{type(exc).__name__}: {exc}"
        items.append(item)
    return items
