"""Figures: training curves, gradient norms, weight norms, angular updates, effective learning rates.

Orders 100-199. Every figure overlays the runs in their :func:`run_colors`
colour with one shared legend; per-layer figures are small multiples of at
most 8 layers (evenly spaced in model order, named in the caption);
non-finite values are marked with an ``x`` at the top of the panel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...diagnostics.scale import equilibrium_angles
from ...store import RunData, query
from . import BY_GRADIENTS, BY_UPDATES, Have, register, run_colors
from ._helpers import (
    NONFINITE_HANDLE,
    finish,
    index_xticks,
    log_axis,
    new_figure,
    plot_series,
    run_gid,
    run_legend,
    set_caption,
    text,
)
from ._panels import Decoration, LayerFigure, register_layers

_PROBE_PREFIXES = ("act.", "grad.", "update.", "weight.", "lr.", "scale_invariant", "hessian.", "landscape.", "event.",
                   "plasticity.", "bn.")
_PROBE_PREFIXES += ("calibration.", "gns.", "collapse.", "scores.", "gradtest.")  # the scheduled recorders


def _user_scalars(run: RunData) -> list[str]:
    """Run-level metrics (layer "") other than the probes' own: loss first, then the user's scalars."""
    out = []
    for m in query.metrics(run):
        if m == "loss" or m.startswith(_PROBE_PREFIXES):
            continue
        if query.layers(run, m) == [""]:
            out.append(m)
    return (["loss"] if query.has(run, "loss") else []) + out


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


# needs=(): every run is passed on; the figure draws every run-level scalar, not only the loss
@register("loss", section="Training", title="Loss and logged scalars against step",
          source="training curves as recorded by run.step(...)", order=100,
          metrics=("loss",), needs=(),
          recorded_by="run.step(loss=...) inside dynascope.probe (every keyword of run.step is drawn)")
def loss_curves(runs: Sequence[RunData]) -> Figure | None:
    names: list[str] = []
    for r in runs:
        for m in _user_scalars(r):
            if m not in names:
                names.append(m)
    if not names:
        return None
    shown = names[:6]
    rows, cols = _grid(len(shown), 3)
    fig = new_figure(10, 3.2 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = run_colors(runs)
    any_bad = False
    for ax, m in zip(axes, shown):
        finite_all = []
        for i, (r, c) in enumerate(zip(runs, colors)):
            s, v = query.series(r, m)
            if len(s) == 0:
                continue
            any_bad |= plot_series(ax, s, v, color=c, gid=run_gid(fig, i, f"{r.name}: {m}"), linewidth=1.2)
            finite_all.append(v[np.isfinite(v)])
        vals = np.concatenate(finite_all) if finite_all else np.zeros(0)
        if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 20:
            log_axis(ax)
        ax.set_title(text(m), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    run_legend(fig, runs, colors, [NONFINITE_HANDLE] if any_bad else [])
    finish(fig, rows, cols, wgap=0.75)
    cap = "Run-level scalars against training step."
    if len(names) > len(shown):
        cap += f" Showing {len(shown)} of {len(names)} scalars: {', '.join(shown)}."
    set_caption(fig, cap + " Long curves are drawn from the minimum and maximum of each of 500 step buckets, "
                "so single-step spikes stay visible.")
    return fig


def _scale_invariant_layers(run: RunData, layers: Sequence[str]) -> set[str]:
    if not query.has(run, "scale_invariant"):
        return set()
    out = set()
    for lay in layers:
        _, v = query.series(run, "scale_invariant", lay)
        v = v[np.isfinite(v)]
        if len(v) and v.mean() >= 0.5:
            out.add(lay)
    return out


def _grad_layers(run: RunData) -> tuple[list[str], str]:
    """Layers for gradient-norm-vs-depth: the depth modules, else the matrix parameters."""
    mods, how = query.depth_modules(run, "grad.norm")
    if len(mods) >= 2:
        return mods, how
    weights = [p for p in query.layers(run, "grad.norm") if p in set(query.layers(run, "weight.norm"))]
    if len(weights) >= 2:
        return weights, "layer index = parameters with ndim >= 2 in model order"
    return query.layers(run, "grad.norm"), "layer index = every recorded layer in model order"


@register("grad_norm_depth", section="Gradients", title="Gradient norm against layer index (first, middle and last "
          "recorded step)", source="Xiong et al. 2020, On Layer Normalization in the Transformer Architecture; "
          "Shleifer et al. 2021, NormFormer", order=140,
          metrics=("grad.norm",), recorded_by=BY_GRADIENTS)
def grad_norm_depth(runs: Sequence[RunData], have: Have) -> Figure | None:
    fig = new_figure(9, 4.2)
    ax = fig.subplots()
    colors = run_colors(runs)
    styles = {"first": ("--", "o"), "middle": (":", "s"), "last": ("-", "^")}
    hows, any_bad, max_n, named = [], False, 0, False
    for i, r in have:
        prof = query.depth_profile(r, "grad.norm", lambda st: [st[0], st[len(st) // 2], st[-1]] if len(st) else [],
                                   modules=_grad_layers(r))
        if prof is None:
            continue
        lays, st = prof.modules, prof.recorded
        hows.append(f"{r.name}: {prof.how}")
        if len(st) == 0:
            continue
        chosen = {"first": st[0], "middle": st[len(st) // 2], "last": st[-1]}
        x = np.arange(1, len(lays) + 1)  # 1-based, as the depth figures
        max_n = max(max_n, len(lays))
        for which, step in chosen.items():
            ls, mk = styles[which]
            y = prof.at(step)
            any_bad |= plot_series(ax, x, y, color=colors[i], linestyle=ls, marker=mk if len(x) <= 40 else None,
                                   markersize=4, log=True, gid=run_gid(fig, i, f"{r.name}: step {step}"))
        if len(have) == 1 and len(lays) <= 16:
            named = True
            ax.set_xticks(x, [text(_short(n, 18)) for n in lays], rotation=45, ha="right", fontsize=7)
    if max_n == 0:
        return None
    log_axis(ax)
    ax.set_xlabel("layer index")
    index_xticks(ax)
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="gray", linestyle=ls, marker=mk, label=f"{w} recorded step")
             for w, (ls, mk) in styles.items()]
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have],
               extra + ([NONFINITE_HANDLE] if any_bad else []))
    finish(fig, bottom=1.3 if named else 0.55)
    set_caption(fig, "Gradient norm (module norms are the parameters' norms summed in quadrature) against layer "
                "index at the first, middle and last recorded step. Post-LN transformers show gradients growing "
                "with depth at initialization, Pre-LN a flat profile (Xiong et al. 2020). "
                + " ".join(h + "." for h in hows))
    return fig


grad_norm_step = register_layers("grad_norm_step", LayerFigure(
    "grad.norm", "gradient norm", candidates=lambda r: _grad_layers(r)[0],
    leading=("grad.global_norm", "", "global gradient norm"), layers_option=True,
    caption="Gradient norm against step. First panel: global norm over all parameters, when recorded. "),
    section="Gradients", title="Gradient norm against step, per layer",
    source="per-layer gradient norms (Xiong et al. 2020; Shleifer et al. 2021)", order=145, recorded_by=BY_GRADIENTS)


def _si_title_hint(runs: Sequence[RunData], shown: list[str]) -> str:
    si = set()
    for r in runs:
        si |= _scale_invariant_layers(r, shown)
    if not si:
        return ""
    return f" Scale-invariant by the AdamP test (majority of recorded steps): {', '.join(s for s in shown if s in si)}."


weight_norm = register_layers("weight_norm", LayerFigure(
    "weight.norm", "||w||", logy=False, hint=_si_title_hint, layers_option=True,
    caption="Frobenius norm of each weight tensor (ndim >= 2). Without weight decay the norm of a scale-invariant "
            "weight grows, which lowers its effective learning rate. "),
    section="Weights and effective learning rate", title="Weight norm against step, per layer",
    source="Heo et al. 2021, AdamP (project page: average weight norm per epoch)", order=160,
    recorded_by=BY_UPDATES + ", or dynascope analyze")


def _equilibrium_group(run: RunData) -> tuple[str | None, dict | None, str]:
    """The optimizer class and the param group whose weight decay and momentum / beta1 set the equilibrium:
    group 0, or where the groups differ the first with weight decay (the matrices' group in the usual
    decay / no-decay split); and a note."""
    opt = run.meta.get("optimizer") or None
    if not opt or not opt.get("class"):
        return None, None, f"{run.name}: no optimizer recorded"
    groups = opt.get("hyperparameters") or []
    if not groups:
        return None, None, f"{run.name}: no hyper-parameters recorded"
    keys = ("weight_decay", "momentum", "betas")
    k = 0
    if len({repr([g.get(x) for x in keys]) for g in groups}) > 1:
        k = next((i for i, g in enumerate(groups) if g.get("weight_decay")), 0)
    return str(opt["class"]), groups[k], "" if len(groups) == 1 else f"param group {k}'s weight decay"


def _step_lrs(run: RunData, lay: str, group: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """The learning rate of ``lay``'s param group at each recorded step: lr.effective x ||w|| (Adam family) or
    x ||w||^2 (SGD family), as the probe recorded them; else a logged run-level ``lr``; else the recorded
    (initial) lr of the group, constant."""
    s_e, v_e = query.series(run, "lr.effective", lay) if query.has(run, "lr.effective") else (np.zeros(0),) * 2
    if len(s_e):
        s_w, v_w = query.series(run, "weight.norm", lay)
        steps, ie, iw = np.intersect1d(s_e, s_w, return_indices=True)
        if len(steps):
            w = v_w[iw]
            return steps, v_e[ie] * (w if "betas" in group else w * w), "each recorded step's learning rate"
    if query.has(run, "lr") and query.layers(run, "lr") == [""]:
        s, v = query.series(run, "lr")
        if len(s):
            return s, v, "each step's logged lr"
    try:
        lr = float(group["lr"])
    except (KeyError, TypeError, ValueError):
        return np.zeros(0), np.zeros(0), "no learning rate recorded"
    s_a, _ = query.series(run, "update.angle_row", lay)
    return s_a, np.full(len(s_a), lr), "the recorded initial learning rate (no per-step lr recorded)"


def _equilibrium_lines(runs: Sequence[RunData]) -> Decoration:
    """In the panels of the weights a run found scale-invariant (``scale_invariant`` mean >= 0.5), that run's
    equilibrium angle at each step's learning rate (a dashed line over steps: under warmup and decay it
    follows the schedule); nothing in the other panels. The note says what was drawn, per run."""
    handle = Line2D([], [], color="gray", linestyle="--", label="equilibrium angle (scale-invariant weights)")
    info = {id(r): _equilibrium_group(r) for r in runs}
    drawn: dict[int, dict[str, float]] = {id(r): {} for r in runs}   # layer -> angle at the peak lr
    how: dict[int, str] = {}
    why_not: dict[int, str] = {}
    shown: dict[int, set[str]] = {id(r): set() for r in runs}

    def extra(fig, ax, i, r, m, lay, c):
        cls, group, _ = info[id(r)]
        if cls is None or group is None or not lay:
            return []
        shown[id(r)].add(lay)
        if lay not in _scale_invariant_layers(r, [lay]):
            return []
        steps, lrs, where = _step_lrs(r, lay, group)
        eq = equilibrium_angles(cls, group, lrs)
        if eq is None:
            why_not[id(r)] = "no weight decay" if not group.get("weight_decay") else f"no closed form for {cls}"
            return []
        ok = np.isfinite(eq) & (eq > 0)
        if not ok.any():
            return []
        how[id(r)] = where
        drawn[id(r)][lay] = float(np.nanmax(eq[ok]))
        ax.plot(steps[ok], eq[ok], color=c, linestyle="--", linewidth=1,
                gid=run_gid(fig, i, f"{r.name}: equilibrium angle {lay}"))
        return [handle]

    def note() -> str:
        parts = []
        for r in runs:
            cls, group, gnote = info[id(r)]
            if cls is None:
                parts.append(gnote)
                continue
            got = drawn[id(r)]
            if id(r) in why_not and not got:
                parts.append(f"{r.name}: not drawn ({why_not[id(r)]})")
            elif not got:
                parts.append(f"{r.name}: not drawn (no scale-invariant weight among the panels)"
                             if shown[id(r)] else f"{r.name}: not drawn")
            else:
                peak = max(got.values())
                parts.append(f"{r.name}: {cls}, from {how[id(r)]}{', ' + gnote if gnote else ''}, up to {peak:.3g} "
                             f"rad, in the panels of {', '.join(got)}")
        return "; ".join(parts)

    return Decoration(extra, note)


angular_update = register_layers("angular_update", LayerFigure(
    "update.angle_row", "angle (rad)", decorate=_equilibrium_lines, hint=_si_title_hint, layers_option=True,
    caption="Angle between consecutive weights, arccos(<w_t, w_t+1> / (||w_t|| ||w_t+1||)), per row of "
            "w.flatten(1), averaged over rows. Dashed, in the panels of the weights found scale-invariant only: "
            "the expected rotational-equilibrium angle (AdamW: sqrt(2 eta lambda (1-beta1)/(1+beta1)); SGD with "
            "momentum alpha: sqrt(2 eta lambda/(1+alpha))) at each step's learning rate eta (it follows warmup and "
            "decay) and the weight decay lambda: {note}. "),
    section="Weights and effective learning rate",
    title="Angular update per step (mean over rows) against step, with the rotational equilibrium",
    source="Kosson et al. 2024, Rotational Equilibrium (REQ)", order=170, recorded_by=BY_UPDATES)

effective_lr = register_layers("effective_lr", LayerFigure(
    "lr.effective", "effective LR", hint=_si_title_hint, layers_option=True,
    caption="Effective learning rate of each weight tensor as recorded by the probe (SGD family: lr/||w||^2; Adam "
            "family: lr/||w||). It is the step size on the unit sphere for a scale-invariant weight. "),
    section="Weights and effective learning rate", title="Effective learning rate against step, per layer",
    source="van Laarhoven 2017, L2 Regularization versus Batch and Weight Normalization; Heo et al. 2021, AdamP",
    order=180, recorded_by=BY_UPDATES)

grad_weight_cos = register_layers("grad_weight_cos", LayerFigure(
    "grad.weight_cos_rowmax", "max row |cos|", layers_option=True,
    companion=("grad.weight_cos_threshold", "threshold delta/sqrt(row dim)", "--"),
    caption="Max over rows of |cos(grad_row, w_row)| (solid) and the AdamP threshold delta/sqrt(row dim) (dashed). "
            "Below the threshold the weight behaves as scale-invariant; weight decay shrinking rows until the "
            "normalization eps matters breaks the invariance. "),
    section="Weights and effective learning rate",
    title="Largest |cos(gradient, weight)| over rows against the scale-invariance threshold",
    source="Heo et al. 2021, AdamP (projection test, delta = 0.1)", order=190, recorded_by=BY_GRADIENTS)
