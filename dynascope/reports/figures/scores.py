"""Figure: example difficulty scores per checkpoint (Paul, Ganguli and Dziugaite 2021, "Deep Learning on a Data
Diet"), recorded by ``dynascope analyze --scores el2n|grand``.

Per score kind: the 10-90% quantile band, median and mean against the
checkpoint's step, and the histogram of the per-example scores at the first
and the last checkpoint (from the ``scores.<kind>`` artifacts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import finish, log_axis, new_figure, run_gid, run_legend, set_caption

__all__ = ["scores_figure"]

KINDS = (("el2n", "EL2N = ||softmax(f(x)) - onehot(y)||"), ("grand", "GraNd = ||grad_theta loss(x, y)||"))


@register("example_scores", section="Example difficulty", title="Example difficulty scores per checkpoint",
          source="Paul, Ganguli and Dziugaite 2021, Deep Learning on a Data Diet (EL2N and GraNd)", order=640,
          metrics=("scores.el2n", "scores.grand"), recorded_by='dynascope analyze CKPTS --data ... --scores el2n grand')
def scores_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    kinds = [(k, label) for k, label in KINDS if any(query.has(r, f"scores.{k}") for _, r in have)]
    if not kinds:
        return None
    colors = run_colors(runs)
    fig = new_figure(10, 3.6 * len(kinds) + 0.5)
    axes = fig.subplots(len(kinds), 2, squeeze=False)
    drawn = []
    for (kind, label), (ax_q, ax_h) in zip(kinds, axes):
        metric = f"scores.{kind}"
        q_all: list[np.ndarray] = []
        log_x = False
        for i, r in have:
            if not query.has(r, metric):
                continue
            drawn.append(i)
            c = colors[i]
            s10, q10 = query.series(r, metric, "q10")
            s90, q90 = query.series(r, metric, "q90")
            s50, q50 = query.series(r, metric, "q50")
            sm, mean = query.series(r, metric, "mean")
            if len(s10) and np.array_equal(s10, s90):
                ax_q.fill_between(s10, q10, q90, color=c, alpha=0.18, linewidth=0)
            gid = run_gid(fig, i, f"{r.name}: {metric} median")
            ax_q.plot(s50, q50, color=c, linewidth=1.6, marker="o" if len(s50) <= 40 else None, markersize=3, gid=gid)
            ax_q.plot(sm, mean, color=c, linewidth=1.1, linestyle="--")
            steps = query.artifact_steps(r, metric)
            hists = []
            for step in (steps[0], steps[-1]) if steps else ():
                arrays, _ = query.artifact(r, metric, step)
                v = np.asarray(arrays["scores"], dtype=float)
                hists.append(v[np.isfinite(v) & (v > 0)])
            if hists and all(h.size for h in hists):
                lo = min(float(h.min()) for h in hists)
                hi = max(float(h.max()) for h in hists)
                # scores fall by orders of magnitude during training: log-spaced bins over both checkpoints
                bins = np.geomspace(lo, hi * 1.0001, 41) if hi > lo else 10
                for h, ls, alpha in zip(hists, (":", "-"), (0.6, 0.9)):
                    ax_h.hist(h, bins=bins, histtype="step", color=c, alpha=alpha, linewidth=1.4, linestyle=ls)
                log_x = True
            q_all.extend(v for v in (q10, q90) if len(v))
        vals = np.concatenate(q_all) if q_all else np.zeros(0)
        vals = vals[np.isfinite(vals)]
        if vals.size and vals.min() > 0 and vals.max() / vals.min() > 20:
            log_axis(ax_q)
        if log_x:
            log_axis(ax_h, "x")
        ax_q.set_title(f"{label}: median, 10-90% band, mean", fontsize=10)
        ax_q.set_xlabel("checkpoint step")
        ax_q.grid(alpha=0.3)
        ax_h.set_title(f"{kind.upper() if kind == 'el2n' else 'GraNd'} histogram: first (dotted) and last checkpoint",
                       fontsize=10)
        ax_h.set_xlabel("score")
        ax_h.set_ylabel("examples")
        ax_h.grid(alpha=0.3)
    keep = sorted(set(drawn))
    run_legend(fig, [runs[i] for i in keep], [colors[i] for i in keep],
               [Patch(color="gray", alpha=0.25, label="10-90% of examples"),
                Line2D([], [], color="gray", linestyle="--", label="mean")])
    finish(fig, len(kinds), 2, wgap=0.8, hgap=0.8)
    set_caption(fig, "Per-example difficulty on the --data examples at each checkpoint: EL2N is the L2 distance "
                "between the softmax output and the one-hot label, GraNd the norm of the example's own loss "
                "gradient (per-sample gradients, eval mode). Paul et al. score early in training and keep the "
                "high-score examples when pruning the data set; low scores mark the examples already learnt. Log axes "
                "where the scores span more than 20x.")
    return fig
