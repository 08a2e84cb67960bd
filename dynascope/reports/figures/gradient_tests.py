"""Figures: Cockpit's gradient tests against step and its per-example gradient histogram, recorded by
:class:`dynascope.GradientTests` (Schneider, Dangel and Hennig 2021, the "gradient tests" and "gradient
histogram" instruments).

The three tests are the largest theta (norm and inner-product tests) or nu (orthogonality test) for which
each test would pass at the probe batch's size (Byrd et al. 2012; Bollapragada et al. 2018): values above 1
say that the batch's gradient is dominated by noise in that sense, values well below 1 that a smaller
batch would pass. The mean GSNR (Liu et al. 2020) is drawn beside them. The histogram is the latest
recorded step's 1D histogram of the per-example gradient elements (clipped into its range).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import finish, log_axis, new_figure, plot_series, run_gid, run_legend, set_caption

__all__ = ["gradient_tests_figure", "gradient_histogram_figure"]

_TESTS = (("gradtest.norm_test", "norm test (theta)"), ("gradtest.inner_test", "inner-product test (theta)"),
          ("gradtest.ortho_test", "orthogonality test (nu)"), ("gradtest.gsnr", "mean GSNR"))


@register("gradient_tests", section="Gradient tests (Cockpit)",
          title="Gradient tests and mean GSNR against step",
          source="Byrd et al. 2012 (norm test); Bollapragada et al. 2018 (inner-product, orthogonality tests); "
                 "Liu et al. 2020 (GSNR); as Cockpit's instruments (Schneider et al. 2021)",
          order=155, metrics=tuple(m for m, _ in _TESTS), needs=("gradtest.norm_test", "gradtest.gsnr"),
          recorded_by="dynascope.GradientTests(every=N, batch=..., loss_fn=...)")
def gradient_tests_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = new_figure(10.0, 6.4)
    axes = fig.subplots(2, 2).ravel()
    drawn = False
    for ax, (metric, label) in zip(axes, _TESTS):
        for i, r in have:
            s, v = query.series(r, metric)
            ok = np.isfinite(v) & (v > 0)
            if ok.any():
                plot_series(ax, s[ok], v[ok], color=colors[i], gid=run_gid(fig, i, f"{r.name}: {metric}"))
                drawn = True
        if metric != "gradtest.gsnr":
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=1.0)
        log_axis(ax)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    if not drawn:
        return None
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have])
    finish(fig, 2, 2)
    set_caption(fig, "Cockpit's gradient tests on the GradientTests probe batch of B examples, from per-example "
                "gradients g_i and their mean g: norm test theta = sqrt(tr Var(g_i) / (B |g|^2)), inner-product test "
                "theta = sqrt(Var<g_i, g> / (B |g|^4)), orthogonality test nu = sqrt(Var(g_i orthogonal to g) / "
                "(B |g|^2)) (sample variances, ddof 1): the largest theta / nu for which each test passes at this "
                "batch size (dotted: 1). Lower right: the mean over parameters of the gradient signal-to-noise ratio "
                "g_j^2 / (Var_i g_ij + 1e-5).")
    return fig


@register("gradient_histogram", section="Gradient tests (Cockpit)",
          title="Histogram of per-example gradient elements (latest recorded step)",
          source="Cockpit's GradHist1d instrument (Schneider, Dangel and Hennig 2021)",
          order=156, metrics=("gradtest.hist1d",),
          recorded_by="dynascope.GradientTests(every=N, batch=..., loss_fn=...)")
def gradient_histogram_figure(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = new_figure(8.5, 4.0)
    ax = fig.subplots()
    drawn = []
    for i, r in have:
        steps = query.artifact_steps(r, "gradtest.hist1d")
        if not steps:
            continue
        arrays, _ = query.artifact(r, "gradtest.hist1d", steps[-1])
        counts, edges = np.asarray(arrays["counts"], float), np.asarray(arrays["edges"], float)
        if counts.sum() <= 0:
            continue
        ax.stairs(counts / counts.sum(), edges, color=colors[i], linewidth=1.4,
                  gid=run_gid(fig, i, f"{r.name}: gradtest.hist1d @ {steps[-1]}"))
        drawn.append((i, r, steps[-1]))
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("per-example gradient element (clipped into the range)")
    ax.set_ylabel("fraction of elements")
    ax.grid(alpha=0.3, which="both")
    run_legend(fig, [r for _, r, _ in drawn], [colors[i] for i, _, _ in drawn])
    finish(fig, 1, 1)
    at = ", ".join(f"{r.name}: step {s}" for _, r, s in drawn)
    set_caption(fig, "Distribution of the B x P per-example gradient elements on the GradientTests probe batch at the "
                f"latest recorded step ({at}); elements outside the range are counted in the outer bins, as in "
                "Cockpit's GradHist1d.")
    return fig
