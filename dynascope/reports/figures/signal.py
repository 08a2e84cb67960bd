"""Figures: signal propagation along depth (orders 200-299).

- Signal propagation plot (Brock, De, Smith 2021): average channel squared
  mean, average channel variance and residual-branch average channel variance
  against block depth, at the first and last recorded step.
- Hidden-state variance against layer index at several steps (curse of depth,
  Sun et al. 2025).
- Largest |activation| against layer index (massive activations, Sun et al. 2024).

Depth follows :func:`dynascope.store.query.depth_modules` (meta ``blocks`` when the user
marked them, else a stated heuristic), and each caption says which was used.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData, query
from . import BY_ACTIVATIONS, Have, register, run_colors
from ._helpers import (
    NONFINITE_HANDLE,
    finish,
    index_xticks,
    log_axis,
    new_figure,
    plot_series,
    run_gid,
    run_label,
    run_legend,
    set_caption,
    text,
)

MASSIVE_ABS = 100.0


def _depth_ticks(ax, names: list[str], single: bool) -> bool:
    """Name the depth positions when one run with few of them is drawn; True when it did."""
    if single and len(names) <= 16:
        ax.set_xticks(np.arange(1, len(names) + 1), [text(n if len(n) <= 16 else "…" + n[-15:]) for n in names],
                      rotation=45, ha="right", fontsize=7)
        return True
    return False


@register("signal_propagation", section="Signal propagation", title="Signal propagation plot: channel statistics "
          "against block depth at the first and last recorded step", source="Brock, De, Smith 2021, Characterizing "
          "signal propagation to close the performance gap in unnormalized ResNets (Fig. 1)", order=200,
          metrics=("act.channel_var",), recorded_by=BY_ACTIVATIONS)
def signal_propagation(runs: Sequence[RunData], have: Have) -> Figure | None:
    with_branches = any(r.meta.get("branches") and query.has(r, "act.channel_var") for _, r in have)
    panels = [("act.channel_sq_mean", "avg channel squared mean"), ("act.channel_var", "avg channel variance")]
    if with_branches:
        panels.append(("branch", "residual branch avg channel variance"))
    fig = new_figure(4.0 * len(panels) + 1, 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    colors = run_colors(runs)
    hows, any_bad, drawn, named = [], False, False, False
    for i, r in have:
        prof = query.depth_profile(r, "act.channel_var", query.first_last)
        if prof is None:
            continue
        mods, steps = prof.modules, prof.steps
        hows.append(f"{r.name}: {prof.how} ({len(mods)} points)")
        branches = [b for b in (r.meta.get("branches") or []) if b in set(query.layers(r, "act.channel_var"))]
        for ax, (metric, _) in zip(axes, panels):
            lays = branches if metric == "branch" else mods
            m = "act.channel_var" if metric == "branch" else metric
            if not lays or not query.has(r, m):
                continue
            table = query.at_steps(r, m, lays, steps)
            x = np.arange(1, len(lays) + 1)
            for k, step in enumerate(steps):
                last = k == len(steps) - 1 and len(steps) > 1
                y = table.loc[step].to_numpy(dtype=float)
                any_bad |= plot_series(ax, x, y, color=colors[i], linestyle="-" if last else "--",
                                       marker="o" if len(x) <= 60 else None, markersize=3.5,
                                       markerfacecolor=colors[i] if last else "white",
                                       gid=run_gid(fig, i, f"{r.name}: step {step}"), log=True)
                drawn = True
            if len(have) == 1:
                named |= _depth_ticks(ax, lays, True)
    if not drawn:
        return None
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block depth")
        index_xticks(ax)
        log_axis(ax)
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="gray", linestyle="--", marker="o", markerfacecolor="white",
                    label="first recorded step"),
             Line2D([], [], color="gray", linestyle="-", marker="o", label="last recorded step")]
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have], extra + ([NONFINITE_HANDLE] if any_bad else []))
    finish(fig, 1, len(panels), bottom=1.3 if named else 0.55, wgap=0.75)
    set_caption(fig, "Statistics of each block's output, averaged over channels (channel = dim 1 for conv "
                "outputs, the last dim for sequences), on the training batches the probe saw (the paper uses a "
                "N(0,1) input batch at initialization). Index i = output of block i. Residual-branch variance is "
                "the branch output before the skip addition (meta 'branches'). " + " ".join(h + "." for h in hows))
    return fig


def _spread_steps(st: np.ndarray, k: int = 5) -> list[int]:
    if len(st) == 0:
        return []
    idx = np.unique(np.linspace(0, len(st) - 1, min(k, len(st))).round().astype(int))
    return [int(st[i]) for i in idx]


@register("hidden_variance_depth", section="Signal propagation", title="Hidden-state variance against layer index "
          "at several steps", source="Sun et al. 2025, The Curse of Depth in Large Language Models", order=210,
          metrics=("act.var",), recorded_by=BY_ACTIVATIONS)
def hidden_variance_depth(runs: Sequence[RunData], have: Have) -> Figure | None:
    n = len(have)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = new_figure(max(4.2 * cols, 7), 3.6 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = run_colors(runs)
    hows, any_bad, drawn = [], False, False
    cmap = matplotlib.colormaps["viridis"]
    for ax, (i, r) in zip(axes, have):
        prof = query.depth_profile(r, "act.var", _spread_steps)
        if prof is None:
            ax.set_visible(False)
            continue
        hows.append(f"{r.name}: {prof.how}")
        steps = prof.steps
        x = np.arange(1, len(prof.modules) + 1)
        for k, step in enumerate(steps):
            col = cmap(0.85 * k / max(len(steps) - 1, 1))
            any_bad |= plot_series(ax, x, prof.at(step), color=col, label=f"step {step}",
                                   marker="o" if len(x) <= 60 else None, markersize=3, log=True,
                                   gid=run_gid(fig, i, f"{r.name}: step {step}"))
            drawn = True
        log_axis(ax)
        ax.set_title(run_label(r), fontsize=10, color=colors[i])
        ax.set_xlabel("layer index")
        index_xticks(ax)
        ax.set_ylabel("variance of the output")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="step", title_fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    if not drawn:
        return None
    if any_bad:
        fig.legend(handles=[NONFINITE_HANDLE], loc="upper center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                   fontsize=8.5)
    finish(fig, rows, cols, legend=any_bad, wgap=0.8, hgap=0.75)
    set_caption(fig, "Variance of each layer's output over all its elements (ddof = 0) against layer index, at up "
                "to 5 recorded steps (darker = earlier, yellow-green = later). Pre-LN transformers show this variance "
                "growing with depth, "
                "which makes deep layers close to identity maps (curse of depth). One panel per run. "
                + " ".join(h + "." for h in hows))
    return fig


@register("massive_activations", section="Signal propagation", title="Largest |activation| against layer index",
          source="Sun et al. 2024, Massive Activations in Large Language Models", order=220,
          metrics=("act.absmax",), recorded_by=BY_ACTIVATIONS)
def massive_activations(runs: Sequence[RunData], have: Have) -> Figure | None:
    fig = new_figure(9, 4.0)
    ax = fig.subplots()
    colors = run_colors(runs)
    hows, any_bad, drawn, named = [], False, False, False
    for i, r in have:
        prof = query.depth_profile(r, "act.absmax", lambda st: st[-1:])
        if prof is None:
            continue
        mods = prof.modules
        hows.append(f"{r.name}: {prof.how}")
        if not prof.steps:
            continue
        last = prof.steps[-1]
        y_last = prof.at(last)
        peak = query.layer_max(r, "act.absmax")
        y_max = np.array([peak.get(m, np.nan) for m in mods], dtype=float)
        x = np.arange(1, len(mods) + 1)
        any_bad |= plot_series(ax, x, y_last, color=colors[i], marker="o" if len(x) <= 60 else None, markersize=3.5,
                               log=True, gid=run_gid(fig, i, f"{r.name}: last step {last}"))
        plot_series(ax, x, y_max, color=colors[i], linestyle=":", log=True,
                    gid=run_gid(fig, i, f"{r.name}: max over steps"))
        if len(have) == 1:
            named |= _depth_ticks(ax, mods, True)
        drawn = True
    if not drawn:
        return None
    ax.axhline(MASSIVE_ABS, color="black", linewidth=0.8, linestyle="-.")
    log_axis(ax)
    ax.set_xlabel("layer index")
    index_xticks(ax)
    ax.set_ylabel("max |activation|")
    ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="gray", marker="o", label="last recorded step"),
             Line2D([], [], color="gray", linestyle=":", label="max over recorded steps"),
             Line2D([], [], color="black", linestyle="-.", label="|act| = 100")]
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have], extra + ([NONFINITE_HANDLE] if any_bad else []))
    finish(fig, bottom=1.3 if named else 0.55)
    set_caption(fig, "Largest absolute value of each layer's output. Sun et al. call an activation massive when it "
                "exceeds 100 and 1000x the median |activation| of its hidden state; the probe records the maximum "
                "only, so the median is not drawn. " + " ".join(h + "." for h in hows))
    return fig
