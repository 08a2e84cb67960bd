"""Figures: BatchNorm batch-vs-running statistics and the train/eval gap, distance
from initialisation, spectral norms of the weights and of their updates.

Orders 192-198 (weights section) and 230-239 (BatchNorm section). Runs keep
their colour; per-layer figures are small multiples of at most 8 layers
(evenly spaced in model order, named in the caption); non-finite values are
marked with an ``x`` at the top of the panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData, query
from . import Have, register, run_colors
from ._helpers import (
    NONFINITE_HANDLE,
    few_xticks,
    finish,
    log_axis,
    new_figure,
    plot_series,
    run_gid,
    run_legend,
    set_caption,
)
from ._panels import Decoration, LayerFigure, register_layers

BN_SECTION = "BatchNorm statistics"
WEIGHT_SECTION = "Weights and effective learning rate"


# ----------------------------------------------------------------------------- BatchNorm
BY_BATCHNORM = 'the "batchnorm" probe (default) on a model with BatchNorm'

bn_mean_shift = register_layers("bn_mean_shift", LayerFigure(
    "bn.mean_shift", "mean shift (running sd)", logy=False,
    caption="bn.mean_shift = mean over channels of |batch mean - running mean| / sqrt(running var + eps), from the "
            "input of each BatchNorm layer in train mode at recording steps, against the running statistics before "
            "that forward. Large values: eval mode (running statistics) normalises this data differently from "
            "training (small batches, a shifted input distribution, a momentum too low to follow fast-moving "
            "weights). "),
    section=BN_SECTION, title="Batch mean against running mean, per BatchNorm layer",
    source="Ioffe 2017, Batch Renormalization; Schneider et al. 2020, test-time BN adaptation", order=230,
    recorded_by=BY_BATCHNORM)


def _ratio_one(runs: Sequence[RunData]) -> Decoration:
    """A dashed reference line at ratio 1 in every panel (drawn once per panel)."""
    ref = Line2D([], [], color="gray", linestyle="--", label="ratio 1 (running = batch)")

    def extra(fig, ax, i, r, m, lay, c):
        if i == 0 and not getattr(ax, "_dynascope_one", False):
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            ax._dynascope_one = True
        return [ref]

    return Decoration(extra)


bn_var_ratio = register_layers("bn_var_ratio", LayerFigure(
    "bn.var_ratio", "batch var / running var", decorate=_ratio_one,
    caption="bn.var_ratio = mean over channels of batch variance (ddof=0) / (running variance + eps) for each "
            "BatchNorm layer in train mode. 1 when the running variance matches the batches; far from 1 the "
            "eval-mode outputs are scaled differently from the training ones (PowerNorm's argument against batch "
            "statistics with large fluctuations). "),
    section=BN_SECTION, title="Batch variance over running variance, per BatchNorm layer",
    source="Ioffe 2017, Batch Renormalization; Yao et al. 2021 / Shen et al. 2020, PowerNorm", order=232,
    recorded_by=BY_BATCHNORM)


@register("bn_gap", section=BN_SECTION, title="Loss with running statistics minus loss with batch statistics",
          source="train/eval discrepancy of BatchNorm (Ioffe 2017; Summers and Dinneen 2020)", order=236,
          metrics=("bn.train_eval_gap",), recorded_by='dynascope.BNGap(every=N, batch=(x, y), loss_fn=...)')
def bn_gap(runs: Sequence[RunData], have: Have) -> Figure | None:
    fig = new_figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    colors = run_colors(runs)
    any_bad = False
    losses: list[np.ndarray] = []
    for i, r in have:
        s, v = query.series(r, "bn.train_eval_gap")
        any_bad |= plot_series(ax1, s, v, color=colors[i], marker="o", markersize=3, linewidth=1.1,
                               gid=run_gid(fig, i, f"{r.name}: bn.train_eval_gap"))
        for metric, ls in (("bn.eval_loss", "-"), ("bn.train_loss", "--")):
            s, v = query.series(r, metric)
            if len(s):
                any_bad |= plot_series(ax2, s, v, color=colors[i], linestyle=ls, linewidth=1.1,
                                       gid=run_gid(fig, i, f"{r.name}: {metric}"))
                losses.append(v[np.isfinite(v)])
    vals = np.concatenate(losses) if losses else np.zeros(0)
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 20:
        log_axis(ax2)
    ax1.axhline(0.0, color="gray", linewidth=0.8)
    ax1.set_title("bn.train_eval_gap = eval loss - batch-statistics loss", fontsize=9)
    ax2.set_title("loss on the fixed batch", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        few_xticks(ax, 5)
    ax1.set_ylabel("loss difference")
    ax2.set_ylabel("loss")
    styles = [Line2D([], [], color="gray", linestyle="-", label="eval mode (running statistics)"),
              Line2D([], [], color="gray", linestyle="--", label="BatchNorm on batch statistics")]
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have],
               styles + ([NONFINITE_HANDLE] if any_bad else []))
    finish(fig, 1, 2, wgap=0.8)
    set_caption(fig, "On a fixed batch (dynascope.BNGap): the loss in eval mode minus the loss with only the "
                "BatchNorm layers in train mode (normalising with the batch's own statistics; dropout off). A "
                "positive gap is what the running statistics cost at evaluation; model and running statistics "
                "are restored after each measurement.")
    return fig


# ----------------------------------------------------------------------------- distance from initialisation
def _log_fit(s: np.ndarray, v: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares a + b log(t) with t = step + 1, and its R^2 (numpy.polyfit)."""
    ok = np.isfinite(v)
    t, y = s[ok] + 1.0, v[ok]
    if len(t) < 4 or np.ptp(np.log(t)) <= 0:
        return None
    b, a = np.polyfit(np.log(t), y, 1)
    resid = y - (a + b * np.log(t))
    tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / tot if tot > 0 else float("nan")
    return float(a), float(b), r2


def _log_fits(runs: Sequence[RunData]) -> Decoration:
    """A dotted least-squares fit a + b log(t) in the whole-network panel; the note lists the fits."""
    fits: list[str] = []
    fit_handle = Line2D([], [], color="gray", linestyle=":", linewidth=1.5, label="fit a + b log(t)")

    def extra(fig, ax, i, r, m, lay, c):
        if lay != "":
            return []
        s, v = query.series(r, m, lay)
        fit = _log_fit(s, v)
        if fit is None:
            return []
        a, b, r2 = fit
        t = np.geomspace(1, s.max() + 1, 50)
        ax.plot(t, a + b * np.log(t), color=c, linestyle=":", linewidth=1.5,
                gid=run_gid(fig, i, f"{r.name}: fit {a:.3g} + {b:.3g} log t"))
        fits.append(f"{r.name}: b = {b:.3g} per e-fold of steps, R^2 = {r2:.3f}")
        return [fit_handle]

    return Decoration(extra, lambda: "; ".join(fits) if fits else "too few points to fit")


distance_init = register_layers("distance_init", LayerFigure(
    "weight.distance_init", "||w_t - w_0||", logy=False, logx=True, decorate=_log_fits,
    leading=("weight.distance_init", "", "whole network"),
    caption="||w - w_0|| after each recorded step's update (w_0: the weights when the probe started, kept across "
            "resumes), against step + 1 on a log axis. Hoffer et al. observe a random walk on a random potential: "
            "the distance grows like log t, a straight line here. First panel: the whole network (dotted: "
            "least-squares fit a + b log t; {note}). "),
    section=WEIGHT_SECTION, title="Distance from initialisation against log step",
    source="Hoffer, Hubara and Soudry 2017, Train longer, generalize better (Fig. 2)", order=192,
    recorded_by='probes=(..., "distance")')


# ----------------------------------------------------------------------------- spectral norms
spectral_norm = register_layers("spectral_norm", LayerFigure(
    "weight.spectral_norm", "sigma_max(W)",
    caption="Largest singular value of each weight matrix w.flatten(1) before the step, by warm-started block power "
            "iteration (within 1e-3 of the exact value once warm). It bounds the layer's Lipschitz constant (Miyato "
            "et al.). "),
    section=WEIGHT_SECTION, title="Spectral norm of each weight matrix against step",
    source="Miyato et al. 2018, Spectral Normalization; Bernstein and Newhouse 2024", order=194,
    recorded_by='probes=(..., "spectral")')

update_spectral_norm = register_layers("update_spectral_norm", LayerFigure(
    "update.rms_to_rms", "RMS-to-RMS norm", companion=("update.spectral_norm", "sigma_max(update), raw", ":"),
    caption="Solid: update.rms_to_rms = sqrt(fan_in / fan_out) * sigma_max(w_t+1 - w_t), the operator norm of the "
            "step between RMS-normed inputs and outputs that modular-norm optimizers (Muon) hold near a target; "
            "dotted: sigma_max of the update itself. "),
    metrics=("update.spectral_norm", "update.rms_to_rms"), section=WEIGHT_SECTION,
    title="Spectral norm of the update (RMS-to-RMS operator norm) against step",
    source="Bernstein and Newhouse 2024, Old Optimizer, New Norm; Large et al. 2024, modular norm", order=196,
    recorded_by='probes=(..., "spectral")')
