"""Figure: Cockpit's normalised step length alpha (the "alpha gauge"), recorded by :class:`dynascope.Alpha`.

alpha places each update on a quadratic fitted to the loss along it (Schneider, Dangel and Hennig 2021): 0 is
a step to the minimum along its direction, 1 a step to the other side of the parabola at the starting height,
below 0 short of the minimum, above 1 overshooting. Left: alpha against step; right: the distribution of the
recorded values (Cockpit's gauge), clipped into [-1.5, 3].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import finish, new_figure, run_gid, run_legend, set_caption

__all__ = ["alpha_figure"]

_LO, _HI = -1.5, 3.0


@register("step_alpha", section="Gradient tests (Cockpit)",
          title="Normalised step length alpha against step, and its distribution",
          source="Cockpit's Alpha instrument (Schneider, Dangel and Hennig 2021)",
          order=157, metrics=("step.alpha",), needs=("step.alpha",),
          recorded_by="dynascope.Alpha(every=N, loss_fn=...) with run.step(loss, batch=(inputs, targets))")
def alpha_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = new_figure(10.0, 4.0)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    drawn = []
    bins = np.linspace(_LO, _HI, 46)
    for i, r in have:
        s, v = query.series(r, "step.alpha")
        ok = np.isfinite(v)
        if not ok.any():
            continue
        left.plot(s[ok], v[ok], "o", markersize=3, color=colors[i], gid=run_gid(fig, i, f"{r.name}: step.alpha"))
        right.hist(np.clip(v[ok], _LO, _HI), bins=bins, color=colors[i], alpha=0.5,
                   weights=np.full(int(ok.sum()), 1.0 / ok.sum()))
        drawn.append((i, r))
    if not drawn:
        return None
    for ax in (left, right):
        line = ax.axhline if ax is left else ax.axvline
        line(0.0, color="gray", linestyle="--", linewidth=1.0)
        line(1.0, color="gray", linestyle=":", linewidth=1.0)
        ax.grid(alpha=0.3)
    left.set_ylim(_LO, _HI)
    left.set_xlabel("step")
    left.set_ylabel("alpha")
    right.set_xlabel("alpha (clipped into [-1.5, 3])")
    right.set_ylabel("fraction of steps")
    run_legend(fig, [r for _, r in drawn], [colors[i] for i, _ in drawn])
    finish(fig, 1, 2)
    fig.subplots_adjust(wspace=0.32)  # room for the histogram's axis label
    set_caption(fig, "Cockpit's normalised step length: a quadratic fitted (with the per-example variances as noise) "
                "to the loss and its slope along the update at its start and end, each on its own minibatch; alpha = "
                "0 (dashed): the step went to the minimum along its direction; 1 (dotted): to the other side at the "
                "starting height; below 0: short of it; above 1: overshooting. Cockpit's reading: values mostly "
                "above 1 say the learning rate overshoots, mostly below 0 that it is small.")
    return fig
