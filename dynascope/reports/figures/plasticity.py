"""Figures: plasticity (Dohare et al. 2024; Sokar et al. 2023) and data-free
weight spectra of checkpoints (WeightWatcher, Martin and Mahoney 2021).

Each metric is drawn against step, or against task number when every run that
recorded it marked task boundaries with ``run.mark("task", i)``: then the
value shown for task ``i`` is the last measurement taken while task ``i`` ran
(the end-of-task value the papers plot). One line per layer (line style and
marker by layer), several runs overlaid in their run colours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from ...store import RunData, query
from . import BY_ANALYZE, BY_PLASTICITY, Have, register, run_colors
from ._helpers import pick_layers
from ._helpers import set_caption as _set_caption

__all__ = ["task_of_steps", "plasticity_units", "plasticity_rank", "plasticity_weight_magnitude",
           "weight_spectra_figure", "weight_esd"]

SECTION = "Plasticity"
MAX_LAYERS = 6
_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P")]


def task_of_steps(run: RunData) -> pd.DataFrame | None:
    """The run's ``task`` marks as a table ``step, task`` (None when there are none)."""
    marks = query.marks(run, "task")
    if marks.empty:
        return None
    tasks = []
    for v in marks["value"]:
        try:
            tasks.append(int(v))
        except (TypeError, ValueError):
            tasks.append(len(tasks))
    return pd.DataFrame({"step": marks["step"].to_numpy(dtype=np.int64), "task": tasks})


def _x_axis(runs: Sequence[RunData]) -> str:
    return "task" if runs and all(task_of_steps(r) is not None for r in runs) else "step"


def _series(run: RunData, metric: str, layer: str, axis: str) -> tuple[np.ndarray, np.ndarray]:
    steps, vals = query.series(run, metric, layer)
    if axis == "step":
        return steps, vals
    marks = task_of_steps(run)
    assert marks is not None
    idx = np.searchsorted(marks["step"].to_numpy(), steps, side="right") - 1
    keep = idx >= 0  # measurements before the first task mark have no task
    task = marks["task"].to_numpy()[idx[keep]]
    sub = pd.DataFrame({"task": task, "value": vals[keep]}).groupby("task", as_index=False).last()
    return sub["task"].to_numpy(), sub["value"].to_numpy(dtype=float)


def _run_layers(run: RunData, metric: str) -> list[str]:
    """The run's layers of ``metric`` in model order, without the whole-network ``""``, at most MAX_LAYERS."""
    return pick_layers([lay for lay in query.layers(run, metric) if lay], MAX_LAYERS)


def _layer_plan(have: Have, metric: str) -> tuple[dict[int, list[str]], list[str] | None]:
    """Layers per run (by run index), and the shared list when every run has the same names (else None: the
    line style then marks the layer's position in its own network, 1st, 2nd, ...)."""
    per_run = {i: _run_layers(r, metric) for i, r in have}
    lists = [tuple(v) for v in per_run.values() if v]
    shared = list(lists[0]) if lists and all(v == lists[0] for v in lists) else None
    return per_run, shared


def _panel(ax, have: Have, colors: list[str], metric: str, per_run: dict[int, list[str]] | None,
           axis: str, scale: float = 1.0, ylabel: str = "", title: str = "", log: bool = False) -> bool:
    """Draw ``metric`` for each run's layers (``per_run`` None: the whole-network layer ``""``)."""
    drawn = False
    for i, r in have:
        if not query.has(r, metric):
            continue
        layers = [""] if per_run is None else per_run.get(i, [])
        for j, lay in enumerate(layers):
            x, y = _series(r, metric, lay, axis)
            if len(x) == 0:
                continue
            ls, mk = _STYLES[j % len(_STYLES)]
            ax.plot(x, y * scale, color=colors[i], linestyle=ls, marker=mk if len(x) <= 40 else None,
                    markersize=3.5, linewidth=1.3, label=f"{r.name}: {lay or 'all'}")
            drawn = True
    ax.set_xlabel("task" if axis == "task" else "step")
    if axis == "task":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return drawn


def _ordinal(k: int) -> str:
    return f"{k}{'st' if k == 1 else 'nd' if k == 2 else 'rd' if k == 3 else 'th'}"


def _legend(fig: Figure, have: Have, colors: list[str], per_run: dict[int, list[str]],
            shared: list[str] | None) -> str:
    """Run colours and layer styles above the panels; returns a caption note on the layers."""
    handles = [Line2D([], [], color=colors[i], linewidth=2, label=str(r.name).replace("$", r"\$"))
               for i, r in have]
    n = max((len(v) for v in per_run.values()), default=0)
    names = shared if shared is not None else [f"{_ordinal(j + 1)} layer" for j in range(n)]
    handles += [Line2D([], [], color="gray", linestyle=_STYLES[j % len(_STYLES)][0],
                       marker=_STYLES[j % len(_STYLES)][1], markersize=4,
                       label=f"layer {lay}" if shared is not None else lay)
                for j, lay in enumerate(names)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5), frameon=False, fontsize=8)
    if shared is not None:
        return ""
    parts = [f"{r.name}: {', '.join(per_run[i])}" for i, r in have if per_run.get(i)]
    return " The runs' layers differ, so the line style gives each layer's position in its own network (" + \
        "; ".join(parts) + ")."


def _axis_note(axis: str) -> str:
    if axis == "task":
        return " x axis: task number (from the run's task marks); each point is the last measurement of that task."
    return " x axis: training step."


@register("plasticity_units", section=SECTION, title="Dead and dormant units against step or task, per layer",
          source="Dohare et al. 2024 (Nature), Fig. 3; Sokar et al. 2023 (ReDo)", order=500,
          metrics=("plasticity.dead", "plasticity.dormant"),
          recorded_by=BY_PLASTICITY + ", or dynascope analyze --plasticity")
def plasticity_units(runs: Sequence[RunData], have: Have) -> Figure | None:
    axis = _x_axis([r for _, r in have])
    colors = run_colors(runs)
    metric = "plasticity.dead" if any(query.has(r, "plasticity.dead") for _, r in have) else "plasticity.dormant"
    per_run, shared = _layer_plan(have, metric)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharex=True)
    _panel(ax1, have, colors, "plasticity.dead", per_run, axis, 100, "% of units", "dead (zero on every example)")
    _panel(ax2, have, colors, "plasticity.dormant", per_run, axis, 100, "% of units", "dormant (s_i <= tau)")
    note = _legend(fig, have, colors, per_run, shared)
    _set_caption(fig, "Percent of units per layer that are dead (output exactly zero on every example and position "
                 "of the fixed probe batch) and tau-dormant (Sokar et al.: mean |h_i| / mean over units <= tau, "
                 "tau = 0.025 by default). Rising curves are the loss of plasticity Dohare et al. report for ReLU "
                 "networks trained on a sequence of tasks." + _axis_note(axis) + note)
    return fig


@register("plasticity_rank", section=SECTION, title="Effective rank and srank of the representation, per layer",
          source="Dohare et al. 2024 (Roy-Vetterli effective rank); Kumar et al. 2021 (srank)", order=510,
          metrics=("plasticity.erank",), recorded_by=BY_PLASTICITY + ", or dynascope analyze --plasticity")
def plasticity_rank(runs: Sequence[RunData], have: Have) -> Figure | None:
    axis = _x_axis([r for _, r in have])
    colors = run_colors(runs)
    per_run, shared = _layer_plan(have, "plasticity.erank")
    with_srank = any(query.has(r, "plasticity.srank") for _, r in have)
    fig = Figure(figsize=(10 if with_srank else 6, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if with_srank else 1, sharex=True, squeeze=False).ravel()
    _panel(axes[0], have, colors, "plasticity.erank", per_run, axis, 1, "effective rank",
           "effective rank (Roy-Vetterli)")
    if with_srank:
        _panel(axes[1], have, colors, "plasticity.srank", per_run, axis, 1, "srank", "srank (delta = 0.01)")
    note = _legend(fig, have, colors, per_run, shared)
    _set_caption(fig, "Effective rank exp(-sum p_i log p_i) with p = singular values / their sum (L1), and srank "
                 "= the number of singular values holding 99% of their sum, of each layer's output on the probe "
                 "batch (examples x units; conv positions count as examples). A falling rank means the features "
                 "collapse onto fewer directions." + _axis_note(axis) + note)
    return fig


@register("plasticity_weight_magnitude", section=SECTION, title="Average weight magnitude against step or task",
          source="Dohare et al. 2024 (Nature), Fig. 3", order=520,
          metrics=("weight.magnitude",), recorded_by=BY_PLASTICITY + ", or dynascope analyze")
def plasticity_weight_magnitude(runs: Sequence[RunData], have: Have) -> Figure | None:
    axis = _x_axis([r for _, r in have])
    colors = run_colors(runs)
    per_run, shared = _layer_plan(have, "weight.magnitude")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharex=True)
    _panel(ax1, have, colors, "weight.magnitude", None, axis, 1, "mean |theta|", "whole network")
    _panel(ax2, have, colors, "weight.magnitude", per_run, axis, 1, "mean |theta|", "per layer")
    note = _legend(fig, have, colors, per_run, shared)
    _set_caption(fig, "Mean absolute value of the parameters: over the whole network (left, every entry weighs "
                 "the same) and per module (right, weights and biases of that module). Growing weights go with "
                 "the loss of plasticity; L2 regularisation keeps them small." + _axis_note(axis) + note)
    return fig


@register("weight_spectra", section=SECTION, title="Weight spectra of checkpoints: stable rank and power-law alpha",
          source="Martin and Mahoney 2021 (WeightWatcher)", order=540,
          metrics=("weight.stable_rank", "weight.alpha"), recorded_by=BY_ANALYZE)
def weight_spectra_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    per_run, shared = _layer_plan(have, "weight.stable_rank" if any(query.has(r, "weight.stable_rank")
                                                                    for _, r in have) else "weight.alpha")
    panels = [("weight.stable_rank", "||W||_F^2 / sigma_max^2", "stable rank", False),
              ("weight.alpha", "alpha", "power-law alpha of the ESD of W^T W", False)]
    if any(query.has(r, "weight.angle_prev") for _, r in have):
        panels.append(("weight.angle_prev", "radians", "angle to the previous checkpoint", True))
    fig = Figure(figsize=(4 * len(panels) + 1, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True).ravel()
    for ax, (metric, ylabel, title, log) in zip(axes, panels):
        _panel(ax, have, colors, metric, per_run, "step", 1, ylabel, title, log=log)
        if metric == "weight.alpha":
            ax.axhspan(2, 6, color="tab:green", alpha=0.08, linewidth=0)
    note = _legend(fig, have, colors, per_run, shared)
    _set_caption(fig, "Data-free checks per weight matrix (W.flatten(1)) of each checkpoint: WeightWatcher's stable "
                 "rank, the power-law exponent alpha fitted by maximum likelihood to the tail of the eigenvalues "
                 "of W^T W (xmin by Kolmogorov-Smirnov distance; shaded band 2-6 = the range Martin and Mahoney "
                 "read as well trained, < 2 over-trained, > 8 random-like), and the angle between consecutive "
                 "checkpoints." + note)
    return fig


@register("weight_esd", section=SECTION, title="Empirical spectral density of the weights at the last checkpoint",
          source="Martin and Mahoney 2021 (WeightWatcher ESD plot)", order=550,
          metrics=("weight.spectrum",), recorded_by=BY_ANALYZE)
def weight_esd(runs: Sequence[RunData], have: Have) -> Figure | None:
    arrays_by_run = [query.artifact(r, "weight.spectrum") for _, r in have]
    layers: list[str] = []
    for arrays, _ in arrays_by_run:
        for k in arrays:
            if k not in layers:
                layers.append(k)
    if len(layers) > 4:
        idx = np.unique(np.linspace(0, len(layers) - 1, 4).round().astype(int))
        layers = [layers[i] for i in idx]
    fig = Figure(figsize=(3.2 * len(layers) + 0.6, 3.6), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False).ravel()
    colors = run_colors(runs)
    for ax, lay in zip(axes, layers):
        for (i, r), (arrays, meta) in zip(have, arrays_by_run):
            if lay not in arrays:
                continue
            ev = np.asarray(arrays[lay], dtype=float) ** 2
            ev = ev[ev > 0]
            if ev.size < 2:
                continue
            bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), min(40, max(5, ev.size // 3)) + 1)
            dens, edges = np.histogram(ev, bins=bins, density=True)
            centers = np.sqrt(edges[1:] * edges[:-1])
            c = colors[i]
            ax.step(centers, np.where(dens > 0, dens, np.nan), where="mid", color=c, linewidth=1.2)
            alpha = (meta.get("alpha") or {}).get(lay)
            xmin = (meta.get("xmin") or {}).get(lay)
            if alpha is not None and xmin is not None and np.isfinite(alpha) and np.isfinite(xmin):
                tail = ev[ev >= xmin]
                x = np.logspace(np.log10(xmin), np.log10(ev.max()), 20)
                # fitted density, scaled by the tail's share of all eigenvalues
                pdf = (alpha - 1) / xmin * (x / xmin) ** (-alpha) * tail.size / ev.size
                ax.plot(x, pdf, color=c, linestyle="--", linewidth=1, label=f"{r.name}: alpha={alpha:.2f}")
                ax.axvline(xmin, color=c, linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(str(lay).replace("$", r"\$"), fontsize=9)
        ax.set_xlabel("eigenvalue of W^T W")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("density")
    _set_caption(fig, "Histogram (log-log) of the eigenvalues of W^T W at each run's last checkpoint, with the "
                 "fitted power-law tail (dashed, from xmin, dotted). Heavy tails (small alpha) are what "
                 "WeightWatcher associates with strongly trained layers.")
    return fig
