"""Figure: the gradient noise scale B_simple against step with the run's batch size (McCandlish et al. 2018),
recorded by :class:`dynascope.NoiseScale`.

Each measurement is a point with its standard error; the line is the running
median of the measurements over ``WINDOW`` of them; the dashed horizontal line
is the training batch size. McCandlish et al. average ``tr(Sigma)`` and
``|G|^2`` over steps before dividing; over a whole training run both change by
orders of magnitude (|G|^2 falls as the loss does), so such averages are
dominated by the early, large values and the ratio lags far behind: the
running median of the per-measurement ratios follows the run and shrugs off
the heavy tail of single ratios. Where the batch sits far below B_simple, larger
batches would cut the number of steps almost proportionally; far above it,
they buy little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import finish, log_axis, new_figure, run_gid, run_legend, set_caption

__all__ = ["noise_scale_figure", "smoothed_noise_scale", "WINDOW"]

WINDOW = 5  # recorded measurements in the running median


def smoothed_noise_scale(run: RunData, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the running median of B_simple over ``window`` measurements centred on each (unresolved
    measurements count as +inf; NaN ones are skipped)."""
    steps, b = query.noise_scale_points(run)
    if len(steps) == 0:
        return steps, b
    med = pd.Series(b).rolling(window, center=True, min_periods=1).median()
    return steps, med.to_numpy(dtype=float)


@register("gradient_noise_scale", section="Gradient noise scale",
          title="Gradient noise scale B_simple against step, with the batch size",
          source="McCandlish et al. 2018, An Empirical Model of Large-Batch Training (appendix A estimators)",
          order=150,
          metrics=("gns.simple", "gns.grad_sq", "gns.trace_cov"), needs=("gns.grad_sq",),
          recorded_by="dynascope.NoiseScale(every=N, batch=..., loss_fn=...)")
def noise_scale_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = new_figure(8.5, 4.4)
    ax = fig.subplots()
    n_unresolved = 0
    for i, r in have:
        c = colors[i]
        s, v = query.series(r, "gns.simple")
        se_s, se = query.series(r, "gns.simple_stderr")
        err = pd.Series(se, index=se_s).reindex(s).to_numpy(dtype=float) if len(se_s) else np.full(len(s), np.nan)
        ok = np.isfinite(v) & (v > 0)
        if ok.any():
            # a lower error bar below zero cannot be drawn on a log axis: clip it at a tenth of the value
            lower = np.minimum(np.nan_to_num(err[ok]), 0.9 * v[ok])
            ax.errorbar(s[ok], v[ok], yerr=[lower, np.nan_to_num(err[ok])], fmt="o", color=c, markersize=3,
                        alpha=0.45, elinewidth=0.8, gid=run_gid(fig, i, f"{r.name}: gns.simple"))
        gs, _ = query.series(r, "gns.grad_sq")
        n_unresolved += len(gs) - int(ok.sum())
        ss, sm = smoothed_noise_scale(r)
        good = np.isfinite(sm) & (sm > 0)
        if good.any():
            ax.plot(ss[good], sm[good], color=c, linewidth=1.8, gid=run_gid(fig, i, f"{r.name}: smoothed B_simple"))
        bs, bv = query.series(r, "gns.batch_size")
        if len(bs):
            ax.axhline(float(bv[-1]), color=c, linestyle="--", linewidth=1.2)
    log_axis(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr(Sigma) / |G|^2  (examples)")
    ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="gray", marker="o", linestyle="none", markersize=3, label="measurement +- s.e."),
             Line2D([], [], color="gray", linewidth=1.8, label=f"running median ({WINDOW} measurements)"),
             Line2D([], [], color="gray", linestyle="--", label="training batch size")]
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have], extra)
    finish(fig, 1, 1, left=0.9)
    unresolved = (f" {n_unresolved} measurement(s) had a |G|^2 estimate <= 0 (noise dominates the probe batch) and "
                  "show no point." if n_unresolved else "")
    set_caption(fig, "Simple noise scale B_simple = tr(Sigma)/|G|^2 from the unbiased estimators of McCandlish et "
                "al.'s appendix A (gradient norms of micro-batches and of the whole probe batch), with jackknife "
                "standard errors over the micro-batches; the line is the running median over "
                f"{WINDOW} measurements (a measurement whose |G|^2 estimate is <= 0 counts as infinite). "
                "B_simple approximates the critical batch size: with the batch far below it (dashed), a larger "
                "batch would cut the number of steps almost proportionally; far above "
                "it, a larger batch buys almost nothing." + unresolved)
    return fig
