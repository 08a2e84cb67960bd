"""Figures: curvature (recorded by :class:`dynascope.probes.curvature.Curvature`).

* sharpness against step with the optimizer's stability threshold dotted (the
  edge-of-stability figure, Cohen et al. 2021/2022; log y when the values span
  more than two decades, as Gilmer et al. 2021 draw lambda_1), with the training
  loss above it when the run recorded ``loss``;
* Hessian trace against step (Hutchinson, +-1 standard error);
* eigenvalue spectral density (SLQ, log density; Ghorbani et al. 2019);
* per-layer (block-diagonal) sharpness against depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData, query
from . import BY_CURVATURE, Have, register, run_colors
from ._helpers import log_axis, set_caption, text

SECTION = "Curvature"
DENSITY_FLOOR = 1e-7  # PyHessian's plot adds 1e-7 before the log scale


def _wide_range(values: list[np.ndarray]) -> bool:
    v = np.concatenate([a[np.isfinite(a)] for a in values]) if values else np.array([])
    if v.size == 0 or np.any(v <= 0):
        return False
    return float(v.max() / v.min()) > 100.0


@register("curvature_sharpness", section=SECTION, title="Sharpness against step, with the stability threshold",
          source="Cohen et al. 2021 (edge of stability); Cohen et al. 2022 (Adam: preconditioned sharpness)",
          order=300,
          metrics=("hessian.eig", "hessian.precond_eig"), recorded_by=BY_CURVATURE + ", or dynascope analyze --hessian")
def sharpness(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    with_loss = any(query.has(r, "loss") for _, r in have)
    fig = Figure(figsize=(7.5, 6.2 if with_loss else 4.4), layout="constrained")
    if with_loss:
        ax_loss, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))
    else:
        ax_loss, ax = None, fig.add_subplot()
    plotted: list[np.ndarray] = []
    any_pre = any_raw = any_thr = False
    for i, run in have:
        c = colors[i]
        name = text(run.name)
        pre = query.has(run, "hessian.precond_eig")
        if pre:
            s, v = query.series(run, "hessian.precond_eig", "1")
            ax.plot(s, v, color=c, lw=1.8, marker="o", ms=3, label=f"{name}: preconditioned sharpness")
            any_pre = True
            plotted.append(v)
        if query.has(run, "hessian.eig"):
            s, v = query.series(run, "hessian.eig", "1")
            ax.plot(s, v, color=c, lw=1.8 if not pre else 1.0, alpha=1.0 if not pre else 0.45, marker="o",
                    ms=3 if not pre else 2, label=f"{name}: sharpness " + r"$\lambda_1$")
            any_raw = True
            plotted.append(v)
        if query.has(run, "hessian.threshold"):
            s, v = query.series(run, "hessian.threshold")
            what = "(2+2β1)/((1-β1)η)" if pre else "stability threshold"
            ax.step(s, v, where="post", color=c, ls=":", lw=1.6, label=f"{name}: {what}")
            any_thr = True
            plotted.append(v)
        if ax_loss is not None and query.has(run, "loss"):
            s, v = query.series(run, "loss")
            ax_loss.plot(s, v, color=c, lw=1.2, label=name)
    if _wide_range(plotted):
        log_axis(ax, "y")
    ax.set_xlabel("step")
    label = "top Hessian eigenvalue"
    if any_pre and not any_raw:
        label = r"$\lambda_1(P^{-1}H)$"
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if ax_loss is not None:
        ax_loss.set_ylabel("training loss")
        ax_loss.grid(alpha=0.3)
        if ax_loss.lines and all(np.all(line.get_ydata() > 0) for line in ax_loss.lines):
            log_axis(ax_loss, "y")
    fig.suptitle("Sharpness and the edge of stability", fontsize=11)
    cap = ("Top eigenvalue of the Hessian of the mean loss on the fixed probe batch (Lanczos). Dotted: the "
           "optimizer's stability threshold from its current learning rate (2/η for gradient descent, (2+2β)/η "
           "with heavy-ball momentum). Under gradient descent sharpness rises (progressive sharpening) until it "
           "reaches the threshold and then hovers there (edge of stability).")
    if any_pre:
        cap += (" For Adam the threshold (2+2β1)/((1-β1)η) = 38/η (β1 = 0.9) applies to the preconditioned "
                "sharpness λ1(P^-1/2 H P^-1/2), P = (1-β1^t)(diag(sqrt(v̂))+ε), drawn bold; the raw sharpness "
                "is faint. Before the optimizer's first step there is no preconditioned sharpness (no point), and "
                "coordinates without a second moment yet (no non-zero gradient so far, e.g. unseen embedding rows "
                "at step 0) are left out: P would be ε there.")
    if not any_thr:
        cap += " No threshold recorded (optimizer without a known threshold)."
    set_caption(fig, cap)
    return fig


@register("curvature_trace", section=SECTION, title="Hessian trace against step",
          source="Hutchinson 1990; PyHessian (Yao et al. 2020)", order=310,
          metrics=("hessian.trace",), recorded_by="dynascope.Curvature(..., trace=True), or dynascope analyze --trace")
def trace(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, run in have:
        s, v = query.series(run, "hessian.trace")
        ax.plot(s, v, color=colors[i], lw=1.6, marker="o", ms=3, label=text(run.name))
        if query.has(run, "hessian.trace_stderr"):
            s2, e = query.series(run, "hessian.trace_stderr")
            if len(s2) == len(s) and np.array_equal(s2, s):
                ax.fill_between(s, v - e, v + e, color=colors[i], alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("tr(H)")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Hessian trace (Hutchinson, Rademacher probes)", fontsize=11)
    set_caption(fig, "Trace of the Hessian of the mean loss on the probe batch, estimated with Rademacher vectors "
                     "(E[zᵀHz] = tr H); the band is ±1 standard error of the estimate.")
    return fig


@register("curvature_spectrum", section=SECTION, title="Hessian eigenvalue spectral density",
          source="Ghorbani, Krishnan, Xiao 2019; PyHessian (stochastic Lanczos quadrature)", order=320,
          metrics=("hessian.spectrum",), recorded_by="dynascope.Curvature(..., spectrum=True)")
def spectrum(runs: Sequence[RunData], have: Have) -> Figure | None:
    found = [(i, run, *query.artifact(run, "hessian.spectrum"), query.artifact_steps(run, "hessian.spectrum")[-1])
             for i, run in have]
    colors = run_colors(runs)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, run, arrays, _meta, step in found:
        ax.plot(arrays["grid"], np.maximum(arrays["density"], 0) + DENSITY_FLOOR, color=colors[i], lw=1.2,
                label=f"{text(run.name)} (step {step})")
    log_axis(ax, "y")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Eigenvalue spectral density of the Hessian", fontsize=11)
    m = found[-1][3]
    set_caption(fig, f"Stochastic Lanczos quadrature ({m.get('n_runs', '?')} run(s) of {m.get('n_iter', '?')} "
                     f"Lanczos steps over {m.get('n_params', '?')} parameters), each Ritz value broadened by a "
                     f"Gaussian of variance {m.get('sigma_squared', float('nan')):.2g}; the last recorded step of "
                     f"each run. {DENSITY_FLOOR:g} is added before the log scale, as in PyHessian.")
    return fig


@register("curvature_layers", section=SECTION, title="Per-layer sharpness against depth",
          source="block-diagonal Hessian: lambda_max of each layer's diagonal block", order=330,
          metrics=("hessian.layer_eig",), recorded_by="dynascope.Curvature(..., layers=True)")
def layers(runs: Sequence[RunData], have: Have) -> Figure | None:
    colors = run_colors(runs)
    fig = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    names_all: list[str] = []
    values: list[np.ndarray] = []
    for i, run in have:
        blocks = query.layers(run, "hessian.layer_eig")
        steps = sorted({int(s) for b in blocks for s in query.steps(run, "hessian.layer_eig", b)})
        table = query.at_steps(run, "hessian.layer_eig", blocks, sorted({steps[0], steps[-1]}))
        names = [str(c) for c in table.columns]
        if len(names) > len(names_all):
            names_all = names
        depth = np.arange(len(names))
        last = table.loc[steps[-1]].to_numpy(dtype=float)
        ax.plot(depth, last, color=colors[i], lw=1.8, marker="o", ms=4,
                label=f"{text(run.name)}, step {steps[-1]}")
        values.append(last)
        if len(steps) > 1:
            first = table.loc[steps[0]].to_numpy(dtype=float)
            ax.plot(depth, first, color=colors[i], lw=1.0, ls="--", marker="o", ms=2.5, alpha=0.6,
                    label=f"{text(run.name)}, step {steps[0]}")
            values.append(first)
    if _wide_range(values):
        log_axis(ax, "y")
    ax.set_xticks(np.arange(len(names_all)))
    ax.set_xticklabels([text(n) for n in names_all], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel(r"$\lambda_{max}$ of the layer's Hessian block")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 8:
        handles = handles[:8] + [Line2D([], [], ls="none", label="…")]
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("Per-layer sharpness (block-diagonal Hessian)", fontsize=11)
    set_caption(fig, "Top eigenvalue of each layer's diagonal Hessian block (its weight and bias together), "
                     "first and last recorded step; the blocks ignore the coupling between layers, so the "
                     "largest of them is a lower bound on the full sharpness.")
    return fig
