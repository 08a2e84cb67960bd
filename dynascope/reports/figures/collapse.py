"""Figure: neural collapse against step (Papyan, Han and Donoho 2020), recorded by :class:`dynascope.Collapse`.

NC1 = tr(Sigma_W Sigma_B^+)/C on a log axis (their Fig. 6), the coefficient
of variation of the centred class-mean norms (Fig. 2, equinorm) and the
standard deviation of the cosines between centred class means (Fig. 3,
equiangularity). One line style per layer, one colour per run.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import finish, log_axis, new_figure, plot_series, run_gid, run_legend, set_caption, short, text

__all__ = ["collapse_figure"]

MAX_LAYERS = 4
_STYLES = ["-", "--", ":", "-."]


def _where(have: Sequence[tuple[int, RunData]], layer: str) -> str:
    """'input of NAME' or 'output of NAME', from the recorded ``collapse.input`` flag."""
    for _, r in have:
        if query.has(r, "collapse.input"):
            _, flag = query.series(r, "collapse.input", layer)
            if len(flag):
                return f"{'input' if flag[-1] > 0.5 else 'output'} of {text(short(layer, 30))}"
    return text(short(layer, 30))


@register("neural_collapse", section="Neural collapse", title="Neural collapse against step: NC1, equinorm, "
          "equiangularity", source="Papyan, Han and Donoho 2020, PNAS, Figs. 2, 3 and 6", order=630,
          metrics=("collapse.nc1",), recorded_by='dynascope.Collapse(every=N, batch=(x, y))')
def collapse_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = new_figure(11, 3.9)
    axes = fig.subplots(1, 3).ravel()
    panels = [("collapse.nc1", "NC1 = tr(Sigma_W Sigma_B^+) / C", True),
              ("collapse.equinorm", "equinorm: CV of class-mean norms", False),
              ("collapse.equiangular", "equiangular: std of class-mean cosines", False)]
    layers: list[str] = []
    for _, r in have:
        for lay in query.layers(r, "collapse.nc1"):
            if lay not in layers:
                layers.append(lay)
    shown = layers[:MAX_LAYERS]
    for ax, (metric, title, log) in zip(axes, panels):
        for i, r in have:
            for j, lay in enumerate(shown):
                s, v = query.series(r, metric, lay)
                if len(s):
                    plot_series(ax, s, v, color=colors[i], linestyle=_STYLES[j % len(_STYLES)], linewidth=1.3,
                                log=log, marker="o" if len(s) <= 40 else None, markersize=3,
                                gid=run_gid(fig, i, f"{r.name}: {metric} ({lay})"))
        if log:
            log_axis(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both" if log else "major")
    names = {lay: _where(have, lay) for lay in shown}
    extra = [Line2D([], [], color="gray", linestyle=_STYLES[j % len(_STYLES)], label=names[lay])
             for j, lay in enumerate(shown)] if len(shown) > 1 else []
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have], extra)
    finish(fig, 1, 3, wgap=0.7)
    where = f"the features ({names[shown[0]]})" if len(shown) == 1 else "each layer's features"
    set_caption(fig, f"Neural collapse of {where} on the fixed labelled probe batch (eval mode; by default the input "
                "of the last Linear layer, the penultimate features): NC1 compares the within-class covariance with "
                "the between-class covariance of the class means and falls towards 0 as every example collapses "
                "onto its class mean; equinorm and equiangularity fall towards 0 as the centred class means form a "
                "simplex equiangular tight frame (Papyan et al.'s terminal phase of training).")
    return fig
