"""Figures: calibration over training (Guo et al. 2017), recorded by :class:`dynascope.Calibration`.

* ECE, NLL and accuracy (with the mean confidence) against step: Guo et al.'s
  Fig. 3 shows the NLL rising while the error keeps falling (over-confidence);
* reliability diagrams (their Fig. 1) at the first and the last recorded step
  of each run: per confidence bin the accuracy (bars), the gap to the bin's mean
  confidence (hatched) and the diagonal of perfect calibration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import finish, log_axis, new_figure, plot_series, run_gid, run_label, run_legend, set_caption, text

__all__ = ["calibration_curves", "reliability_diagrams"]

SECTION = "Calibration"
MAX_RUNS = 4  # reliability diagrams: one row per run


def _wide(ax) -> bool:
    """Positive values spanning more than 10x: drawn on a log axis."""
    ys = [np.asarray(ln.get_ydata(), dtype=float) for ln in ax.lines]
    v = np.concatenate(ys) if ys else np.zeros(0)
    v = v[np.isfinite(v)]
    return bool(v.size and v.min() > 0 and v.max() / v.min() > 10)


@register("calibration", section=SECTION, title="Calibration against step: ECE, NLL and accuracy",
          source="Guo et al. 2017, On Calibration of Modern Neural Networks, Fig. 3", order=600,
          metrics=("calibration.ece", "calibration.nll"), needs=("calibration.ece",),
          recorded_by='dynascope.Calibration(every=N, batch=(x, y))')
def calibration_curves(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = new_figure(11, 3.9)
    axes = fig.subplots(1, 3).ravel()
    panels = [("calibration.ece", "ECE (15 bins)"), ("calibration.nll", "NLL on the held-out batch"),
              ("calibration.accuracy", "accuracy (solid), mean confidence (dashed)")]
    for ax, (metric, title) in zip(axes, panels):
        for i, r in have:
            s, v = query.series(r, metric)
            if len(s):
                plot_series(ax, s, v, color=colors[i], gid=run_gid(fig, i, f"{r.name}: {metric}"), linewidth=1.3,
                            marker="o" if len(s) <= 40 else None, markersize=3)
            if metric == "calibration.accuracy":
                s2, v2 = query.series(r, "calibration.confidence")
                if len(s2):
                    plot_series(ax, s2, v2, color=colors[i], linestyle="--", linewidth=1.1,
                                gid=run_gid(fig, i, f"{r.name}: calibration.confidence"))
        if metric == "calibration.nll" and _wide(ax):
            log_axis(ax)  # the late rise of a small NLL is invisible next to its start on a linear axis
            title += " (log)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have],
               [Line2D([], [], color="gray", linestyle="--", label="mean confidence")])
    finish(fig, 1, 3, wgap=0.7)
    set_caption(fig, "Expected calibration error (sum over 15 equal-width confidence bins of |accuracy - mean "
                "confidence| weighted by the bin's share of examples), negative log-likelihood, and accuracy "
                "with the mean max-probability, all on the fixed held-out batch in eval mode. Over-confidence, as "
                "Guo et al. found for deep networks: the NLL turns up while the accuracy holds or improves, and the "
                "confidence climbs above the accuracy.")
    return fig


@register("calibration_reliability", section=SECTION,
          title="Reliability diagrams at the first and last recorded step",
          source="Guo et al. 2017, Fig. 1 (reliability diagrams)", order=610,
          metrics=("calibration.reliability",), recorded_by='dynascope.Calibration(every=N, batch=(x, y))')
def reliability_diagrams(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    shown = have[:MAX_RUNS]
    fig = new_figure(7.6, 3.3 * len(shown) + 0.5)
    axes = fig.subplots(len(shown), 2, squeeze=False)
    for row, (i, r) in zip(axes, shown):
        steps = query.artifact_steps(r, "calibration.reliability")
        for ax, step in zip(row, (steps[0], steps[-1])):
            arrays, meta = query.artifact(r, "calibration.reliability", step)
            edges = np.asarray(arrays["edges"], dtype=float)
            acc = np.asarray(arrays["accuracy"], dtype=float)
            conf = np.asarray(arrays["confidence"], dtype=float)
            count = np.asarray(arrays["count"])
            left, width = edges[:-1], np.diff(edges)
            ok = count > 0
            gid = run_gid(fig, i, f"{r.name}: reliability at step {step}")
            ax.bar(left[ok], acc[ok], width=width[ok], align="edge", color=colors[i], alpha=0.75,
                   edgecolor="black", linewidth=0.6, gid=gid)
            lo, hi = np.minimum(acc, conf), np.maximum(acc, conf)
            ax.bar(left[ok], (hi - lo)[ok], bottom=lo[ok], width=width[ok], align="edge", facecolor="none",
                   edgecolor="tab:red", hatch="////", linewidth=0.6)
            ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
            share = count / max(int(count.sum()), 1)
            ax.plot((left + width / 2)[ok], share[ok], color="black", marker="D", markersize=3.5, linestyle="none",
                    clip_on=False)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ece = meta.get("ece")
            ece_txt = f", ECE {ece:.3f}" if isinstance(ece, (int, float)) else ""
            ax.set_title(f"{run_label(r)}: step {step}{ece_txt}", fontsize=9)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.2)
    extra = [Patch(facecolor="none", edgecolor="tab:red", hatch="////", label="gap to the bin's mean confidence"),
             Line2D([], [], color="gray", linestyle="--", label="perfect calibration"),
             Line2D([], [], color="black", marker="D", markersize=3.5, linestyle="none",
                    label="share of examples in the bin")]
    run_legend(fig, [r for _, r in shown], [colors[i] for i, _ in shown], extra)
    finish(fig, len(shown), 2, left=0.7, wgap=0.9, hgap=0.75)
    more = f" Showing {len(shown)} of {len(have)} runs." if len(have) > len(shown) else ""
    set_caption(fig, "Per equal-width confidence bin (max softmax probability), the accuracy of the examples in it "
                "(bars; empty bins are left out) against the diagonal of a perfectly calibrated model; hatched: the "
                "gap between accuracy and mean confidence; black diamonds: the share of the examples in each bin (a "
                "bar over few examples is noisy). Bars below the diagonal are over-confident. Left: the first "
                "recorded step; right: the last." + text(more))
    return fig
