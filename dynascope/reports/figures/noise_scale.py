"""Figure: the gradient noise scale B_simple against step with the run's batch size (McCandlish et al. 2018),
recorded by :class:`dynascope.NoiseScale`.

Each measurement is a point with its standard error; the line is the ratio of
exponential moving averages of ``tr(Sigma)`` and ``|G|^2`` (the paper averages
numerator and denominator separately before dividing, because the ratio of
two noisy estimates is biased and heavy-tailed); the dashed horizontal line is
the training batch size. Where the batch sits far below B_simple, larger
batches would cut the number of steps almost proportionally; far above it,
they buy little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData
from .. import _data
from . import figure, run_colors
from ._helpers import finish, log_axis, new_figure, run_gid, run_legend, set_caption

__all__ = ["noise_scale_figure", "smoothed_noise_scale", "EMA_SPAN"]

EMA_SPAN = 5  # recorded measurements


def smoothed_noise_scale(run: RunData, span: int = EMA_SPAN) -> tuple[np.ndarray, np.ndarray]:
    """Steps and EMA(tr(Sigma)) / EMA(|G|^2) over the recorded measurements (NaN where the EMA of |G|^2 <= 0)."""
    s_g, g = _data.series(run, "gns.grad_sq")
    s_t, t = _data.series(run, "gns.trace_cov")
    df = pd.DataFrame({"g": pd.Series(g, index=s_g), "t": pd.Series(t, index=s_t)}).dropna()
    if df.empty:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    ema = df.ewm(span=span, adjust=True).mean()
    ratio = np.where(ema["g"] > 0, ema["t"] / ema["g"].where(ema["g"] > 0), np.nan)
    return df.index.to_numpy(dtype=np.int64), ratio.astype(float)


@figure("gradient_noise_scale", section="Gradient noise scale",
        title="Gradient noise scale B_simple against step, with the batch size",
        source="McCandlish et al. 2018, An Empirical Model of Large-Batch Training (appendix A estimators)",
        order=150)
def noise_scale_figure(runs: Sequence[RunData]) -> Figure | None:
    have = [(i, r) for i, r in enumerate(runs) if _data.has(r, "gns.grad_sq")]
    if not have:
        return None
    colors = run_colors(runs)
    fig = new_figure(8.5, 4.4)
    ax = fig.subplots()
    n_unresolved = 0
    for i, r in have:
        c = colors[i]
        s, v = _data.series(r, "gns.simple")
        se_s, se = _data.series(r, "gns.simple_stderr")
        err = pd.Series(se, index=se_s).reindex(s).to_numpy(dtype=float) if len(se_s) else np.full(len(s), np.nan)
        ok = np.isfinite(v) & (v > 0)
        if ok.any():
            # a lower error bar below zero cannot be drawn on a log axis: clip it at a tenth of the value
            lower = np.minimum(np.nan_to_num(err[ok]), 0.9 * v[ok])
            ax.errorbar(s[ok], v[ok], yerr=[lower, np.nan_to_num(err[ok])], fmt="o", color=c, markersize=3,
                        alpha=0.45, elinewidth=0.8, gid=run_gid(fig, i, f"{r.name}: gns.simple"))
        gs, _ = _data.series(r, "gns.grad_sq")
        n_unresolved += len(gs) - int(ok.sum())
        ss, sm = smoothed_noise_scale(r)
        good = np.isfinite(sm) & (sm > 0)
        if good.any():
            ax.plot(ss[good], sm[good], color=c, linewidth=1.8, gid=run_gid(fig, i, f"{r.name}: smoothed B_simple"))
        bs, bv = _data.series(r, "gns.batch_size")
        if len(bs):
            ax.axhline(float(bv[-1]), color=c, linestyle="--", linewidth=1.2)
    log_axis(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr(Sigma) / |G|^2  (examples)")
    ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="gray", marker="o", linestyle="none", markersize=3, label="measurement +- s.e."),
             Line2D([], [], color="gray", linewidth=1.8, label=f"ratio of EMAs (span {EMA_SPAN})"),
             Line2D([], [], color="gray", linestyle="--", label="training batch size")]
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have], extra)
    finish(fig, 1, 1, left=0.9)
    unresolved = (f" {n_unresolved} measurement(s) had a |G|^2 estimate <= 0 (noise dominates the probe batch) and "
                  "show no point." if n_unresolved else "")
    set_caption(fig, "Simple noise scale B_simple = tr(Sigma)/|G|^2 from the unbiased estimators of McCandlish et "
                "al.'s appendix A (gradient norms of micro-batches and of the whole probe batch), with jackknife "
                "standard errors over the micro-batches; the line divides exponential moving averages of tr(Sigma) "
                "and |G|^2, as the paper does. B_simple approximates the critical batch size: with the batch far "
                "below it (dashed), a larger batch would cut the number of steps almost proportionally; far above "
                "it, a larger batch buys almost nothing." + unresolved)
    return fig
