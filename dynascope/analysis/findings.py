"""Automatic findings: each rule reads a run and returns what it found, with the evidence.

Every rule is a function ``rule(run) -> list[Finding]`` registered in
:data:`RULES`; its docstring gives the source and the threshold, and the
threshold is a module constant so the report and docs/report.md can state it.
A rule returns nothing when the run lacks the metrics it needs.

Thresholds (module constants):

- ``SHARPNESS_RATIO = 1.0``: ``hessian.eig`` (layer "1") >= ``hessian.threshold``.
- ``SPIKE_WINDOW = 20``, ``SPIKE_FACTOR = 2.0``, ``SPIKE_MADS = 6.0``: a spike is a value above
  ``SPIKE_FACTOR`` x the median of the previous ``SPIKE_WINDOW`` recorded values and above that median
  by more than ``SPIKE_MADS`` robust standard deviations (1.4826 x MAD); a loss spike also rises by at
  least ``SPIKE_MIN_RISE = 0.1`` x the loss at the start of the run (minibatch noise near zero loss is
  not a spike).
- ``DEPTH_VAR_RATIO = 10``, ``DEPTH_VAR_RHO = 0.8``: variance at the last depth point >= 10x the first,
  Spearman rank correlation with depth >= 0.8, at least 4 depth points.
- ``MASSIVE_ABS = 100``, ``MASSIVE_MEDIAN_RATIO = 1000`` (with a recorded median),
  ``MASSIVE_RMS_RATIO = 100`` (weaker criterion without a median).
- ``GRAD_RATIO = 10``: gradient norm ratio between the last and first block.
- ``EFF_LR_DECAY = 10``: effective LR of a scale-invariant weight fell more than 10x with weight decay 0.
- ``DEAD_FRACTION = 0.10``, ``DORMANT_FRACTION = 0.20``: fraction of units per layer.
- ``ERANK_DROP = 0.5``: effective rank below half of its first recorded value.
- ``NLL_RISE = 0.10``, ``ACC_HOLD = 0.01``, ``NLL_WINDOW = 3``: held-out NLL (trailing mean of 3
  measurements) at the last calibration measurement >= 1.10x its minimum while the accuracy (same mean) is at
  most 0.01 below its value at that minimum (Guo et al.'s over-confidence).
- ``GNS_FAR = 10``: training batch size >= 10x or <= 1/10 of the gradient noise scale B_simple (median of the
  per-measurement estimates over the last half of the measurements, at least ``GNS_MIN_POINTS = 3``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core.drift import describe
from ..store import RunData, query
from .forensics import run_events

__all__ = ["Finding", "RULES", "RULE_SOURCES", "findings", "rule", "collect", "frame", "baseline_findings",
           "FRAME_COLUMNS", "rule_source"]

SEVERITIES = ("error", "warning", "info")

SHARPNESS_RATIO = 1.0
# one spike rule for the findings, the recorded-series events and the live sentinel
from ..core.robust import SPIKE_FACTOR, SPIKE_MADS, SPIKE_MIN_RISE, SPIKE_WINDOW  # noqa: E402, F401
from ..core.robust import series_spike_threshold as spike_threshold  # noqa: E402, F401

SPIKE_COINCIDE_STEPS = 1  # recorded steps either side
DEPTH_VAR_RATIO = 10.0
DEPTH_VAR_RHO = 0.8
MASSIVE_ABS = 100.0
MASSIVE_MEDIAN_RATIO = 1000.0
MASSIVE_RMS_RATIO = 100.0
GRAD_RATIO = 10.0
EFF_LR_DECAY = 10.0
DEAD_FRACTION = 0.10
DORMANT_FRACTION = 0.20
ERANK_DROP = 0.5
SCALE_INVARIANT_MAJORITY = 0.5
NLL_RISE = 0.10
ACC_HOLD = 0.01
NLL_WINDOW = 3
GNS_FAR = 10.0
GNS_MIN_POINTS = 3
LR_JUMP = 3.0  # a learning rate above 3x the median of its previous 5 values: a jump (warmup moves < 2x, cosine ~1x)
UPDATE_JUMP = 10.0  # lr.effective / update.relative of a module above 10x its previous 5 recorded values
JUMP_BAND = 5  # previous recorded values the jump rules compare with


@dataclass(frozen=True)
class Finding:
    """One diagnosis with its evidence: ``value`` compared with ``threshold`` for ``metric`` at ``layer``/``step``."""

    severity: str           # "error" | "warning" | "info"
    message: str            # one sentence, plain text (escaped when rendered)
    metric: str
    layer: str
    step: int | None
    value: float | None
    threshold: float | None
    figure_key: str | None  # anchor of the figure that shows it (registry key)
    run: str = ""
    rule: str = field(default="", compare=False)


Rule = Callable[[RunData], list[Finding]]
RULES: dict[str, Rule] = {}


def rule(fn: Rule) -> Rule:
    RULES[fn.__name__] = fn
    return fn


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def _finite(v: np.ndarray) -> np.ndarray:
    return v[np.isfinite(v)]


def _threshold_series(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    lays = query.layers(run, "hessian.threshold")
    if not lays:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return query.series(run, "hessian.threshold", "" if "" in lays else lays[0])


def _aligned_threshold(run: RunData, steps: np.ndarray) -> np.ndarray:
    """hessian.threshold at ``steps`` (the latest recorded at or before each step, else the first)."""
    ts, tv = _threshold_series(run)
    if len(ts) == 0:
        return np.full(len(steps), np.nan)
    idx = np.clip(np.searchsorted(ts, steps, side="right") - 1, 0, len(ts) - 1)
    return tv[idx]


@rule
def sharpness_above_threshold(run: RunData) -> list[Finding]:
    """Sharpness at or above its stability threshold.

    Source: Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability"
    (GD: 2/eta; heavy-ball momentum beta: (2+2beta)/eta); Cohen et al. 2022 for Adam's preconditioned
    sharpness. Rule: top Hessian eigenvalue ``hessian.eig`` (layer "1") >= ``hessian.threshold`` (as the
    curvature probe records it for the optimizer) at any measured step. Reports the first such step and the
    largest ratio.
    """
    if not query.has(run, "hessian.eig") or not query.has(run, "hessian.threshold"):
        return []
    s, v = query.series(run, "hessian.eig", "1")
    if len(s) == 0:
        return []
    thr = _aligned_threshold(run, s)
    ok = np.isfinite(v) & np.isfinite(thr) & (thr > 0)
    hit = ok & (v >= SHARPNESS_RATIO * thr)
    if not hit.any():
        return []
    k = int(np.argmax(hit))
    ratio = v[ok] / thr[ok]
    return [Finding(
        "warning",
        f"Sharpness reached its stability threshold: top Hessian eigenvalue {_fmt(v[k])} >= {_fmt(thr[k])} "
        f"at step {s[k]} ({int(hit.sum())} of {int(ok.sum())} measurements at or above; peak ratio "
        f"{_fmt(float(ratio.max()))}). Training is at the edge of stability (Cohen et al. 2021): expect "
        "oscillating or spiking loss; a smaller learning rate or warmup lowers the operating sharpness.",
        "hessian.eig", "1", int(s[k]), float(v[k]), float(thr[k]), "curvature_sharpness")]


def spikes(steps: np.ndarray, values: np.ndarray, min_rise: float = 0.0) -> np.ndarray:
    """Indices of spikes: finite values above :func:`spike_threshold` (value > SPIKE_FACTOR x the median of
    the previous SPIKE_WINDOW recorded values, above it by more than SPIKE_MADS robust SDs, and by at least
    ``min_rise`` x the loss at the start). Non-finite values are neither spikes nor part of the window."""
    v = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(np.isfinite(v) & (v > spike_threshold(v, min_rise)))


@rule
def loss_spikes(run: RunData) -> list[Finding]:
    """Loss spikes, and whether they coincide with gradient-norm or sharpness spikes.

    Sources: Cohen et al. 2021 (loss spikes when sharpness exceeds 2/eta); Gilmer et al. 2021, "A Loss
    Curvature Perspective on Training Instability in Deep Learning"; Chowdhery et al. 2022 (PaLM) for
    loss spikes with gradient-norm spikes. Spike: see :func:`spikes`, with the rise at least
    SPIKE_MIN_RISE x the loss at the start of the run. Coincides: a ``grad.global_norm``
    spike within SPIKE_COINCIDE_STEPS recorded steps, or the last sharpness measurement at or before the
    loss spike at or above its threshold (or itself a spike). Coinciding spikes are warnings, others info.
    """
    if not query.has(run, "loss"):
        return []
    s, v = query.series(run, "loss")
    idx = spikes(s, v, min_rise=SPIKE_MIN_RISE)
    if len(idx) == 0:
        return []
    g_steps: np.ndarray = np.zeros(0, dtype=np.int64)
    if query.has(run, "grad.global_norm"):
        gs, gv = query.series(run, "grad.global_norm")
        g_steps = gs[spikes(gs, gv)]
    hs = hv = ht = None
    if query.has(run, "hessian.eig"):
        hs, hv = query.series(run, "hessian.eig", "1")
        ht = _aligned_threshold(run, hs) if len(hs) else None
        h_spk = set(hs[spikes(hs, hv)].tolist()) if len(hs) else set()
    every = int(np.median(np.diff(s))) if len(s) > 1 else 1
    coinciding, alone = [], []
    for k in idx:
        st = int(s[k])
        why = []
        if len(g_steps) and np.any(np.abs(g_steps - st) <= SPIKE_COINCIDE_STEPS * every):
            why.append("gradient-norm spike")
        if hs is not None and len(hs):
            j = int(np.searchsorted(hs, st, side="right")) - 1
            if j >= 0:
                above = ht is not None and np.isfinite(ht[j]) and hv[j] >= ht[j]
                if above or int(hs[j]) in h_spk:
                    why.append(f"sharpness {_fmt(hv[j])} at step {int(hs[j])}"
                               + (f" >= threshold {_fmt(ht[j])}" if above else " (spike)"))
        (coinciding if why else alone).append((k, why))
    out = []
    for group, sev in ((coinciding, "warning"), (alone, "info")):
        if not group:
            continue
        k, why = group[0]
        base = float(np.nanmedian(v[max(k - SPIKE_WINDOW, 0):k])) if k > 0 else float("nan")
        steps_list = ", ".join(str(int(s[j])) for j, _ in group[:5]) + (" ..." if len(group) > 5 else "")
        what = ("coinciding with " + " and ".join(why)) if why else "with no gradient-norm or sharpness spike recorded"
        out.append(Finding(
            sev,
            f"{len(group)} loss spike(s) {what} (steps {steps_list}); first: loss {_fmt(float(v[k]))} at step "
            f"{int(s[k])} against a median of {_fmt(base)} over the previous {SPIKE_WINDOW} recorded steps "
            f"(spike = more than {SPIKE_FACTOR:g}x the median and {SPIKE_MADS:g} robust SDs above it).",
            "loss", "", int(s[k]), float(v[k]), SPIKE_FACTOR * base, "loss"))
    return out


@rule
def early_warnings(run: RunData) -> list[Finding]:
    """The sentinel's early warnings (``event.warning``): its CUSUM on the loss or on most modules'
    gradient or update norms crossed the threshold (docs/forensics.md, Early warning).

    Source: Page 1954 (CUSUM); a loss CUSUM fires steps before organic loss explosions of small GPT-2s
    (trainscope). Rule: one warning for the run's stored warnings: the first one, what drifted (its
    mark) and the count.
    """
    if not query.has(run, "event.warning"):
        return []
    events = run_events(run, detect=False)
    warned = events[events["kind"] == "warning"]
    if warned.empty:
        return []
    first, value = int(warned["step"].iloc[0]), float(warned["value"].iloc[0])
    what = describe(warned["detail"].iloc[0]) or "the loss or the norms"
    steps = warned["step"].tolist()
    more = f"; {len(steps)} warnings, at steps {', '.join(map(str, steps[:5]))}{' ...' if len(steps) > 5 else ''}" \
        if len(steps) > 1 else ""
    return [Finding(
        "warning",
        f"early warning at step {first}: {what} drifted upward (CUSUM statistic {_fmt(value)}); a loss "
        f"explosion may follow within tens of steps: run.forensics({first}) ranks the modules{more}.",
        "event.warning", "", first, value, None, "loss")]


_NONFINITE_FIGURE = {"loss": "loss", "hessian.eig": "curvature_sharpness", "grad.global_norm": "grad_norm_step",
                     "grad.norm": "grad_norm_step",
                     "weight.norm": "weight_norm", "update.angle_row": "angular_update", "lr.effective": "effective_lr",
                     "act.channel_var": "signal_propagation", "act.channel_sq_mean": "signal_propagation",
                     "act.var": "hidden_variance_depth", "act.absmax": "massive_activations"}


_FAMILY = {"act": "activations", "grad": "gradients", "update": "updates", "weight": "weights", "lr": "learning rates",
           "hessian": "curvature", "landscape": "landscape", "plasticity": "plasticity"}


@rule
def non_finite_values(run: RunData) -> list[Finding]:
    """Non-finite values (NaN, +-inf) in any recorded metric.

    Source: a training run whose loss, gradients or activations become NaN/Inf has diverged or overflowed
    (e.g. fp16 overflow); the probe records these values as such. Rule: any NaN/Inf row. One error per
    metric family (``loss``, each user scalar, ``act.*``, ``grad.*``, ...): the metrics, the count, the number
    of layers, and the first step and layer; ``loss`` first, then by first step.
    """
    df = query.non_finite_summary(run)
    df = df[~df["metric"].str.startswith("event.")]  # a stored non-finite event repeats a metric's value
    if df.empty:
        return []
    df = df.copy()
    df["family"] = [m.split(".", 1)[0] if "." in m else m for m in df["metric"]]
    out = []
    fams = df.groupby("family").agg(first=("first_step", "min"), count=("count", "sum"))
    fams["not_loss"] = [f != "loss" for f in fams.index]
    fams = fams.sort_values(["not_loss", "first", "count"], ascending=[True, True, False])
    for fam in fams.index:
        sub = df[df["family"] == fam].sort_values(["first_step", "metric", "layer"])
        first = sub.iloc[0]
        metrics = list(dict.fromkeys(sub["metric"]))
        kinds = " and ".join(k for k, n in (("NaN", sub["n_nan"].sum()), ("inf", sub["n_inf"].sum())) if n)
        n_layers = sub["layer"].nunique()
        label = _FAMILY.get(fam, fam)
        listed = ", ".join(metrics[:6]) + (" ..." if len(metrics) > 6 else "")
        what = metrics[0] if len(metrics) == 1 else f"{label} ({listed})"
        where = f" in {n_layers} layer(s), first {str(first['layer'])!r}," if str(first["layer"]) else ""
        out.append(Finding(
            "error",
            f"{what}: {int(sub['count'].sum())} non-finite value(s) ({kinds}){where} first at step "
            f"{int(first['first_step'])}.",
            str(first["metric"]), str(first["layer"]), int(first["first_step"]), float("nan"), None,
            _NONFINITE_FIGURE.get(str(first["metric"]))))
    return out


def _spearman(y: np.ndarray) -> float:
    """Spearman rank correlation of ``y`` with its index (depth); 0 for a constant ``y``."""
    from scipy.stats import spearmanr

    if np.ptp(y) == 0:
        return 0.0
    rho, _ = spearmanr(np.arange(len(y)), y)
    return float(rho)


@rule
def variance_grows_with_depth(run: RunData) -> list[Finding]:
    """Activation variance growing with depth (curse of depth; unnormalized residual networks).

    Sources: Sun et al. 2025, "The Curse of Depth in Large Language Models" (Pre-LN output variance grows
    with depth); Brock, De, Smith 2021 (variance grows linearly with depth in unnormalized ResNets).
    Rule: at the last recorded step before the run's first event, if it has one (a change that begins at an
    event, e.g. a learning-rate jump, is the event's), or the last of the final 10 with at least 4 finite values,
    ``act.var`` along the depth modules (meta ``blocks`` or the figures' heuristic) has last/first >=
    DEPTH_VAR_RATIO (10) and Spearman rank correlation with depth >= DEPTH_VAR_RHO (0.8), over at least 4
    depth points.
    """
    if not query.has(run, "act.var"):
        return []
    limit = _first_event(run)  # a change that begins at an event is the event's, not the architecture's
    prof = query.depth_profile(run, "act.var", lambda st: (st if limit is None else st[st < limit])[-10:])
    if prof is None or len(prof.modules) < 4 or not prof.steps:
        return []
    mods = prof.modules
    for last in prof.steps[::-1]:  # the last recorded step with enough finite values (a diverged run ends in NaN)
        y = prof.at(last)
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() >= 4:
            break
    else:
        return []
    yy = y[ok]
    names = [m for m, k in zip(mods, ok) if k]
    ratio = float(yy[-1] / yy[0])
    rho = _spearman(yy)
    if ratio >= DEPTH_VAR_RATIO and rho >= DEPTH_VAR_RHO:
        return [Finding(
            "warning",
            f"Activation variance grows with depth: {_fmt(yy[0])} at {names[0]!r} to {_fmt(yy[-1])} at "
            f"{names[-1]!r} ({_fmt(ratio)}x over {len(yy)} layers, rank correlation {rho:.2f}) at step {last}. "
            "Deep layers then contribute little (curse of depth, Sun et al. 2025); LayerNorm scaling by "
            "1/sqrt(layer index), Peri-LN or down-scaled residual branches counter it.",
            "act.var", names[-1], last, float(yy[-1]), DEPTH_VAR_RATIO * float(yy[0]), "hidden_variance_depth")]
    return []


@rule
def massive_activations(run: RunData) -> list[Finding]:
    """Massive activations.

    Source: Sun et al. 2024, "Massive Activations in Large Language Models": top |activation| > 100 and
    >= 1000x the median |activation| of the hidden state. When the run records a median (``act.absmedian``)
    that criterion is used. Otherwise (the default probe records ``act.absmax``, ``act.var`` and
    ``act.mean`` only) a weaker criterion: absmax > MASSIVE_ABS (100) and absmax >= MASSIVE_RMS_RATIO (100)
    x the RMS of the same output, sqrt(var + mean^2). For a Gaussian, 1000 x median |x| = 674 RMS, so the
    weaker rule flags more; the RMS also includes the outliers themselves. Checked at every recorded step.
    """
    if not query.has(run, "act.absmax"):
        return []
    has_median = query.has(run, "act.absmedian")
    hits = []
    peaks = query.layer_max(run, "act.absmax")
    for lay in query.layers(run, "act.absmax"):
        if not peaks.get(lay, np.nan) > MASSIVE_ABS:  # one aggregate query first; series only where needed
            continue
        s, amax = query.series(run, "act.absmax", lay)
        if len(s) == 0:
            continue
        if has_median:
            ms, med = query.series(run, "act.absmedian", lay)
            ref = pd.Series(med, index=ms).reindex(s).to_numpy()
            ratio_needed = MASSIVE_MEDIAN_RATIO
        else:
            vs, var = query.series(run, "act.var", lay)
            mean_s, mean = query.series(run, "act.mean", lay)
            v = pd.Series(var, index=vs).reindex(s).to_numpy()
            m = pd.Series(mean, index=mean_s).reindex(s).to_numpy() if len(mean_s) else np.zeros(len(s))
            ref = np.sqrt(v + np.nan_to_num(m) ** 2)
            ratio_needed = MASSIVE_RMS_RATIO
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = amax / ref
        hit = (amax > MASSIVE_ABS) & (ratio >= ratio_needed) & np.isfinite(ratio)
        if hit.any():
            k = int(np.argmax(np.where(hit, amax, -np.inf)))
            hits.append((lay, int(s[k]), float(amax[k]), float(ratio[k])))
    if not hits:
        return []
    hits.sort(key=lambda h: -h[2])
    lay, st, val, ratio = hits[0]
    crit = (f"> {MASSIVE_ABS:g} and >= {MASSIVE_MEDIAN_RATIO:g}x the median |activation|" if has_median else
            f"> {MASSIVE_ABS:g} and >= {MASSIVE_RMS_RATIO:g}x the output's RMS (weaker than Sun et al.'s "
            "1000x median: no median recorded)")
    others = f" and {len(hits) - 1} other layer(s)" if len(hits) > 1 else ""
    return [Finding(
        "warning",
        f"Massive activations in {lay!r}{others}: max |activation| {_fmt(val)} at step {st}, {_fmt(ratio)}x the "
        f"reference ({crit}). Such outliers act as fixed biases (attention sinks) and break low-precision "
        "quantization (Sun et al. 2024).",
        "act.absmax", lay, st, val, MASSIVE_ABS, "massive_activations")]


@rule
def grad_norm_depth_ratio(run: RunData) -> list[Finding]:
    """Gradient-norm ratio between the first and last blocks beyond GRAD_RATIO (10x).

    Sources: Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture" (Post-LN: gradients
    of late layers larger at initialization); Shleifer et al. 2021, "NormFormer" (Pre-LN: early layers get
    larger gradients than late ones). Rule: ``grad.norm`` of the last depth module / the first, at the first
    and at the last recorded step (before the run's first event, if it has one); flagged when >= 10 or <= 1/10.
    """
    if not query.has(run, "grad.norm"):
        return []
    limit = _first_event(run)  # a change that begins at an event is the event's, not the architecture's
    prof = query.depth_profile(run, "grad.norm", lambda st: query.first_last(st if limit is None else st[st < limit]))
    if prof is None or len(prof.modules) < 2 or not prof.steps:
        return []
    mods = prof.modules
    out = []
    worst = None
    for step in prof.steps:
        g0, g1 = prof.table.loc[step, mods[0]], prof.table.loc[step, mods[-1]]
        if not (np.isfinite(g0) and np.isfinite(g1)) or g0 <= 0 or g1 <= 0:
            continue
        r = float(g1 / g0)
        if (r >= GRAD_RATIO or r <= 1 / GRAD_RATIO) and (worst is None or abs(math.log(r)) > abs(math.log(worst[1]))):
            worst = (step, r, float(g0), float(g1))
    if worst is not None:
        step, r, g0, g1 = worst
        if r >= GRAD_RATIO:
            why = ("gradients grow with depth, the Post-LN pattern at initialization (Xiong et al. 2020); "
                   "warmup or Pre-LN keep it trainable")
        else:
            why = ("early layers get much larger gradients than late ones (the Pre-LN mismatch NormFormer "
                   "reports, or vanishing gradients towards the output)")
        out.append(Finding(
            "warning",
            f"Gradient norm differs {_fmt(max(r, 1 / r))}x between the first and last block at step {step}: "
            f"{_fmt(g0)} at {mods[0]!r}, {_fmt(g1)} at {mods[-1]!r}; {why}.",
            "grad.norm", mods[-1], step, r, GRAD_RATIO if r >= 1 else 1 / GRAD_RATIO, "grad_norm_depth"))
    return out


def _no_weight_decay(run: RunData) -> bool:
    opt = run.meta.get("optimizer") or {}
    groups = opt.get("hyperparameters") or []
    if not groups:
        return False
    return all(not (g.get("weight_decay") or 0) for g in groups)


@rule
def effective_lr_decay(run: RunData) -> list[Finding]:
    """Effective learning rate of scale-invariant weights decayed more than EFF_LR_DECAY (10x) without weight decay.

    Sources: van Laarhoven 2017, "L2 Regularization versus Batch and Weight Normalization"; Hoffer et al. 2018;
    Heo et al. 2021 (AdamP): without weight decay the norm of a scale-invariant weight only grows, so its
    effective step lr/||w||^2 (SGD) or lr/||w|| (Adam) shrinks and learning stalls. Rule: every param group
    has weight_decay 0, the weight is scale-invariant (``scale_invariant`` = 1 on the majority of recorded
    steps) and ``lr.effective`` at the last recorded step is below 1/10 of its first value.
    """
    if not (query.has(run, "lr.effective") and query.has(run, "scale_invariant")) or not _no_weight_decay(run):
        return []
    hits = []
    for lay in query.layers(run, "scale_invariant"):
        _, flag = query.series(run, "scale_invariant", lay)
        flag = _finite(flag)
        if not len(flag) or flag.mean() < SCALE_INVARIANT_MAJORITY:
            continue
        s, v = query.series(run, "lr.effective", lay)
        fin = np.isfinite(v) & (v > 0)
        if fin.sum() < 2:
            continue
        first, last = v[fin][0], v[fin][-1]
        if first / last > EFF_LR_DECAY:
            hits.append((lay, int(s[fin][0]), int(s[fin][-1]), float(first), float(last)))
    if not hits:
        return []
    hits.sort(key=lambda h: h[4] / h[3])
    lay, s0, s1, first, last = hits[0]
    others = f" ({len(hits)} scale-invariant weights in all)" if len(hits) > 1 else ""
    return [Finding(
        "warning",
        f"Effective learning rate of scale-invariant weight {lay!r} fell {_fmt(first / last)}x from {_fmt(first)} "
        f"at step {s0} to {_fmt(last)} at step {s1} with no weight decay{others}: its norm grows and learning "
        "slows (van Laarhoven 2017). Weight decay, or AdamP/SGDP's projection, keeps the effective step.",
        "lr.effective", lay, s1, last, first / EFF_LR_DECAY, "effective_lr")]


def _jumps(run: RunData, metric: str, factor: float) -> list[tuple[int, str, float, float, float]]:
    """(step, layer, ratio, before, after) where ``metric`` rose ``factor`` x above the median of its previous
    JUMP_BAND recorded values (the first step of each such rise)."""
    from ..core.robust import rolling_band

    out = []
    for lay in query.layers(run, metric):
        s, v = query.series(run, metric, lay)
        if len(s) <= JUMP_BAND:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(np.isfinite(v) & (v > 0), np.log(np.where(v > 0, v, 1.0)), np.nan)
        med, _ = rolling_band(y, JUMP_BAND)
        with np.errstate(invalid="ignore"):
            hit = np.flatnonzero(np.isfinite(med) & (y - med >= math.log(factor)))
        if len(hit):
            hit = hit[np.r_[True, np.diff(hit) > 1]]  # the first step of each rise
        out += [(int(s[i]), lay, float(math.exp(y[i] - med[i])), float(math.exp(med[i])), float(v[i])) for i in hit]
    return out


@rule
def learning_rate_jumps(run: RunData) -> list[Finding]:
    """A jump of the learning rate, and the modules whose step jumped with it.

    A learning rate that jumps is set, not caused: a scheduler or a loop bug, found before any architecture
    explanation of what follows. Rule: ``optim.lr`` of a param group (recorded every step; or a logged
    ``lr`` scalar) above LR_JUMP (3) x the median of its previous JUMP_BAND (5) values (a linear warmup moves
    < 2x a step from its 5th step, cosine decay ~1x), or ``lr.effective`` / ``update.relative`` of modules
    above UPDATE_JUMP (10) x the median of their previous 5 recorded values. One finding per step where the
    learning rate jumped (naming the groups, the size and the modules whose update jumped within 5 steps),
    and one per step where only module updates did (naming the modules). Sources: the warmup and schedule
    practice of Goyal et al. 2017 (a learning rate changes smoothly; a jump is a bug or a restart); the
    effective step of van Laarhoven 2017.
    """
    lr_hits = [(st, lay, r, b, a, m) for m in ("optim.lr", "lr") if query.has(run, m)
               for st, lay, r, b, a in _jumps(run, m, LR_JUMP)]
    upd_hits = [(st, lay, r, b, a, m) for m in ("lr.effective", "update.relative") if query.has(run, m)
                for st, lay, r, b, a in _jumps(run, m, UPDATE_JUMP)]
    out = []
    used: set[int] = set()
    for step in sorted({h[0] for h in lr_hits}):
        here = sorted((h for h in lr_hits if h[0] == step), key=lambda h: -h[2])
        mods = sorted({h[1] for h in upd_hits if step <= h[0] <= step + 5})
        used.update(i for i, h in enumerate(upd_hits) if step <= h[0] <= step + 5)
        groups = ", ".join(f"{h[1] or h[5]} {_fmt(h[2])}x ({_fmt(h[3])} -> {_fmt(h[4])})" for h in here[:4])
        more = f" and {len(here) - 4} more" if len(here) > 4 else ""
        moved = (f"; the step of {len(mods)} module(s) jumped with it ({', '.join(repr(m) for m in mods[:5])}"
                 f"{', ...' if len(mods) > 5 else ''})") if mods else ""
        out.append(Finding(
            "warning",
            f"Learning rate jumped at step {step}: {groups}{more}{moved}. A jump of the learning rate, not the "
            "architecture, explains what follows it (a scheduler restarting or a loop that sets the lr): check "
            "the schedule before changing the model.",
            here[0][5], here[0][1], step, here[0][2], LR_JUMP, "effective_lr"))
    rest = [h for i, h in enumerate(upd_hits) if i not in used]
    for step in sorted({h[0] for h in rest}):
        here = sorted((h for h in rest if h[0] == step), key=lambda h: -h[2])
        names = sorted({h[1] for h in here})
        out.append(Finding(
            "warning",
            f"The update of {len(names)} module(s) jumped at step {step}: {here[0][5]} of {here[0][1]!r} "
            f"{_fmt(here[0][2])}x its recent median ({', '.join(repr(n) for n in names[:5])}"
            f"{', ...' if len(names) > 5 else ''}) with no learning-rate jump recorded: a param group's "
            "learning rate or the optimizer's state changed for these modules.",
            here[0][5], here[0][1], step, here[0][2], UPDATE_JUMP, "effective_lr"))
    return out


def _first_event(run: RunData) -> int | None:
    """The step of the run's first event (stored by the sentinel or detected from the loss), or None."""
    ev = run_events(run)
    return int(ev["step"].min()) if len(ev) else None


def _plasticity_fraction(run: RunData, metric: str, limit: float, what: str, source: str) -> list[Finding]:
    if not query.has(run, metric):
        return []
    hits = []
    for lay in query.layers(run, metric):
        s, v = query.series(run, metric, lay)
        fin = np.isfinite(v)
        if not fin.any():
            continue
        last_val, last_step = float(v[fin][-1]), int(s[fin][-1])
        frac = last_val / 100.0 if last_val > 1.0 else last_val  # accept percent
        if frac > limit:
            hits.append((lay, last_step, frac))
    if not hits:
        return []
    hits.sort(key=lambda h: -h[2])
    lay, st, frac = hits[0]
    where = f"layer {lay!r}" if lay else "the network"
    others = f" ({len(hits)} layers above {limit:.0%})" if len(hits) > 1 else ""
    return [Finding(
        "warning",
        f"{frac:.1%} of the units of {where} are {what} at step {st} (threshold {limit:.0%}){others}; "
        f"they no longer learn ({source}).",
        metric, lay, st, frac, limit, "plasticity_units")]


@rule
def dead_units(run: RunData) -> list[Finding]:
    """Dead units above DEAD_FRACTION (10%) of a layer at the last measurement.

    Source: Dohare et al. 2024, "Loss of plasticity in deep continual learning" (units zero on every example
    of the probe batch; fraction per layer as ``plasticity.dead``; values > 1 are read as percent).
    """
    return _plasticity_fraction(run, "plasticity.dead", DEAD_FRACTION, "dead (zero on every probe example)",
                                "Dohare et al. 2024")


@rule
def dormant_units(run: RunData) -> list[Finding]:
    """Dormant units above DORMANT_FRACTION (20%) of a layer at the last measurement.

    Source: Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (tau-dormant:
    normalized mean |activation| <= tau; fraction per layer as ``plasticity.dormant``).
    """
    return _plasticity_fraction(run, "plasticity.dormant", DORMANT_FRACTION, "dormant", "Sokar et al. 2023")


@rule
def effective_rank_collapse(run: RunData) -> list[Finding]:
    """Effective rank collapse: ``plasticity.erank`` below ERANK_DROP (50%) of its first measurement.

    Source: Dohare et al. 2024 (effective rank of Roy and Vetterli 2007 falls as plasticity is lost);
    Kumar et al. 2021, "Implicit Under-Parameterization". Per layer, the last finite value / the first.
    """
    if not query.has(run, "plasticity.erank"):
        return []
    hits = []
    for lay in query.layers(run, "plasticity.erank"):
        s, v = query.series(run, "plasticity.erank", lay)
        fin = np.isfinite(v) & (v >= 0)
        if fin.sum() < 2 or v[fin][0] <= 0:
            continue
        r = float(v[fin][-1] / v[fin][0])
        if r < ERANK_DROP:
            hits.append((lay, int(s[fin][0]), int(s[fin][-1]), float(v[fin][0]), float(v[fin][-1]), r))
    if not hits:
        return []
    hits.sort(key=lambda h: h[5])
    lay, s0, s1, a, b, r = hits[0]
    where = f"layer {lay!r}" if lay else "the network"
    others = f" ({len(hits)} layers below {ERANK_DROP:.0%})" if len(hits) > 1 else ""
    return [Finding(
        "warning",
        f"Effective rank of {where} collapsed from {_fmt(a)} at step {s0} to {_fmt(b)} at step {s1} "
        f"({r:.0%} of its first value, threshold {ERANK_DROP:.0%}){others}: the representation uses fewer "
        "directions, a sign of lost plasticity (Dohare et al. 2024).",
        "plasticity.erank", lay, s1, b, ERANK_DROP * a, "plasticity_rank")]


@rule
def overconfidence(run: RunData) -> list[Finding]:
    """Over-confidence: held-out NLL rising while accuracy holds or improves.

    Source: Guo et al. 2017, "On Calibration of Modern Neural Networks", Fig. 3 (the NLL on held-out data
    overfits while the error keeps falling: the network becomes over-confident). Rule, on
    ``calibration.nll`` and ``calibration.accuracy`` (the scheduled :class:`dynascope.Calibration`), each
    smoothed by a trailing mean over NLL_WINDOW = 3 measurements (a small held-out batch is noisy, and the
    minimum of a noisy series is biased low): at least 5 measurements, the smoothed NLL at the last one
    >= (1 + NLL_RISE) = 1.10x its minimum, which came earlier, and the smoothed accuracy at the last one
    >= its value at that minimum - ACC_HOLD (0.01).
    """
    if not (query.has(run, "calibration.nll") and query.has(run, "calibration.accuracy")):
        return []
    s, nll = query.series(run, "calibration.nll")
    sa, acc = query.series(run, "calibration.accuracy")
    acc_at = pd.Series(acc, index=sa).reindex(s).to_numpy(dtype=float)
    ok = np.isfinite(nll) & np.isfinite(acc_at)
    s, nll, acc_at = s[ok], nll[ok], acc_at[ok]
    if len(s) < NLL_WINDOW + 2:
        return []
    nll_m = pd.Series(nll).rolling(NLL_WINDOW).mean().to_numpy()[NLL_WINDOW - 1:]
    acc_m = pd.Series(acc_at).rolling(NLL_WINDOW).mean().to_numpy()[NLL_WINDOW - 1:]
    s = s[NLL_WINDOW - 1:]
    k = int(np.argmin(nll_m))
    if k == len(s) - 1 or nll_m[k] <= 0:
        return []
    last_nll, last_acc = float(nll_m[-1]), float(acc_m[-1])
    if last_nll < (1 + NLL_RISE) * nll_m[k] or last_acc < acc_m[k] - ACC_HOLD:
        return []
    ece = ""
    if query.has(run, "calibration.ece"):
        se, ev = query.series(run, "calibration.ece")
        e = pd.Series(ev, index=se).rolling(NLL_WINDOW).mean()
        if int(s[k]) in e.index and int(s[-1]) in e.index:
            ece = f"; ECE {_fmt(float(e[int(s[k])]))} -> {_fmt(float(e[int(s[-1])]))}"
    return [Finding(
        "warning",
        f"Over-confidence: held-out NLL (mean of {NLL_WINDOW} consecutive measurements) rose from its minimum "
        f"{_fmt(float(nll_m[k]))} at step {int(s[k])} to {_fmt(last_nll)} at step {int(s[-1])} "
        f"({last_nll / nll_m[k]:.2f}x, threshold {1 + NLL_RISE:.2f}x) while accuracy went from {acc_m[k]:.3f} to "
        f"{last_acc:.3f}{ece}. The model overfits the likelihood and its probabilities are too confident (Guo et "
        "al. 2017); temperature scaling on held-out data, weight decay or early stopping on NLL restore calibration.",
        "calibration.nll", "", int(s[-1]), last_nll, float((1 + NLL_RISE) * nll_m[k]), "calibration")]


@rule
def batch_size_vs_noise_scale(run: RunData) -> list[Finding]:
    """Training batch size far above or below the gradient noise scale.

    Source: McCandlish et al. 2018, "An Empirical Model of Large-Batch Training": the simple noise scale
    B_simple = tr(Sigma)/|G|^2 predicts the critical batch size; well below it, doubling the batch nearly halves
    the steps needed (step-inefficient), well above it, more examples per step buy little (compute-inefficient).
    Rule: B_simple as the median of the per-measurement estimates tr(Sigma)/|G|^2 over the last half of the
    measurements (at least GNS_MIN_POINTS = 3 in all; a measurement whose |G|^2 estimate is <= 0 counts as
    infinite), compared with ``gns.batch_size``: a warning at >= GNS_FAR (10) x B_simple, info at <= B_simple / 10.
    (The paper divides averages taken over steps; over a run both quantities change by orders of magnitude,
    so the median of the ratios is used, as in the report's figure.)
    """
    if not (query.has(run, "gns.grad_sq") and query.has(run, "gns.trace_cov") and query.has(run, "gns.batch_size")):
        return []
    steps, est = query.noise_scale_points(run)
    ok = ~np.isnan(est)
    steps, est = steps[ok], est[ok]
    if len(est) < GNS_MIN_POINTS:
        return []
    tail_steps, tail = steps[len(est) // 2:], est[len(est) // 2:]
    b_simple = float(np.median(tail))
    if not b_simple > 0:
        return []
    _, bv = query.series(run, "gns.batch_size")
    batch = float(bv[-1])
    ratio = batch / b_simple
    first, last = int(tail_steps[0]), int(tail_steps[-1])
    where = f"over steps {first}-{last}" if first != last else f"at step {last}"
    if ratio >= GNS_FAR:
        return [Finding(
            "warning",
            f"Batch size {batch:g} is {_fmt(ratio)}x the gradient noise scale B_simple = {_fmt(b_simple)} {where} "
            f"(threshold {GNS_FAR:g}x): far above the critical batch size, extra examples per step barely reduce "
            "the steps needed, so most of the compute is spent on redundant gradient precision (McCandlish et al. "
            "2018). A smaller batch would reach the same loss with far fewer examples.",
            "gns.simple", "", last, b_simple, batch / GNS_FAR, "gradient_noise_scale")]
    if ratio <= 1 / GNS_FAR:
        return [Finding(
            "info",
            f"Batch size {batch:g} is {_fmt(1 / ratio)}x below the gradient noise scale B_simple = {_fmt(b_simple)} "
            f"{where} (threshold {GNS_FAR:g}x): the gradient is dominated by noise, and a larger batch (up to about "
            "B_simple, with a correspondingly larger learning rate) would cut the number of steps almost "
            "proportionally at little extra cost in examples (McCandlish et al. 2018).",
            "gns.simple", "", last, b_simple, batch * GNS_FAR, "gradient_noise_scale")]
    return []


@rule
def run_step_never_called(run: RunData) -> list[Finding]:
    """A run that ended without one ``run.step()`` call: nothing was recorded.

    Source: dynascope's usage, run.step() ends each training step inside the probe's block. Rule: a run whose
    meta.json says it finished with ``steps`` 0 (``run.step(loss=loss)`` never called: nothing recorded).
    """
    if run.meta.get("status") != "finished" or run.meta.get("steps") != 0:
        return []
    return [Finding(
        "warning",
        "run.step() was never called inside the `with dynascope.probe(...)` block: nothing was recorded. Call "
        "run.step(loss=loss) once per training step.",
        "", "", None, 0.0, None, None)]


_SEVERITY_ORDER = {s: i for i, s in enumerate(SEVERITIES)}


def findings(runs: Sequence[RunData], rules: Sequence[str] | None = None) -> list[Finding]:
    """Apply every rule (or the named ones) to every run; errors first, then warnings, then info.

    A rule that raises does not hide the others: it becomes an ``info`` finding naming the error.
    """
    names = list(RULES) if rules is None else list(rules)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise KeyError(f"unknown finding rule(s) {unknown}; known: {sorted(RULES)}")
    out: list[Finding] = []
    for run in runs:
        for name in names:
            try:
                found = RULES[name](run)
            except Exception as exc:  # noqa: BLE001 - a broken rule must not hide the rest of the report
                found = [Finding("info", f"Rule {name} could not run: {type(exc).__name__}: {exc}", "", "", None,
                                 None, None, None)]
            out += [Finding(f.severity, f.message, f.metric, f.layer, f.step, f.value, f.threshold, f.figure_key,
                            run.name, name) for f in found]
    return sorted(out, key=lambda f: _SEVERITY_ORDER.get(f.severity, 9))


# the literature behind each rule, short (the ``source`` column of dynascope.findings); a rule missing here
# gets its docstring's Source sentence (rule_source)
RULE_SOURCES: dict[str, str] = {
    "sharpness_above_threshold": "Cohen et al. 2021 (edge of stability); Cohen et al. 2022 (adaptive)",
    "loss_spikes": "Cohen et al. 2021; Gilmer et al. 2021; Chowdhery et al. 2022 (PaLM)",
    "non_finite_values": "NaN/inf in a recorded value",
    "early_warnings": "Page 1954 (CUSUM); trainscope (loss CUSUM before GPT-2 loss explosions)",
    "variance_grows_with_depth": "Sun et al. 2025 (curse of depth); Brock, De, Smith 2021",
    "massive_activations": "Sun et al. 2024 (massive activations)",
    "grad_norm_depth_ratio": "Xiong et al. 2020 (Post-LN); Shleifer et al. 2021 (NormFormer)",
    "effective_lr_decay": "van Laarhoven 2017; Hoffer et al. 2018; Heo et al. 2021 (AdamP)",
    "dead_units": "Dohare et al. 2024 (loss of plasticity)",
    "dormant_units": "Sokar et al. 2023 (dormant neurons)",
    "effective_rank_collapse": "Dohare et al. 2024; Kumar et al. 2021",
}
BASELINE_RULE = "baseline_deviation"
BASELINE_FIGURE = "baseline_deviations"  # anchor of the report's comparison figure
MAX_DEVIATION_FINDINGS = 8               # deviating layers listed one per finding; the rest in one line
FRAME_COLUMNS = ["severity", "rule", "metric", "layer", "step", "message", "source", "run", "value", "threshold",
                 "figure"]


def _ratio_text(row: pd.Series) -> str:
    if row["direction"] == "non-finite":
        return f"{row['metric']} non-finite"
    if isinstance(row["ratio"], float) and math.isfinite(row["ratio"]):
        return f"{row['metric']} {_fmt(row['ratio'])}x {row['direction']}"
    return f"{row['metric']} {row['direction']} ({_fmt(row['z'])} robust SDs)"


def _layer_groups(deviations: pd.DataFrame) -> dict[str, list[str]]:
    """Deviating layers in compare order, each with the later layers whose deviations are identical (same
    metrics, first steps and values: e.g. a Linear and the Identity after it) folded into it."""
    groups: dict[str, list[str]] = {}
    seen: dict[tuple, str] = {}
    for lay, sub in deviations.groupby("layer", sort=False):
        sig = tuple((m, int(s), round(float(v), 9)) for m, s, v in zip(sub["metric"], sub["first_step"],
                                                                       sub["value"].fillna(0.0)))
        if sig in seen:
            groups[seen[sig]].append(str(lay))
        else:
            seen[sig] = str(lay)
            groups[str(lay)] = [str(lay)]
    first = {lay: i for i, lay in enumerate(dict.fromkeys(deviations["layer"]))}
    return dict(sorted(groups.items(), key=lambda kv: first[kv[0]]))


def distinct_layers(deviations: pd.DataFrame) -> list[str]:
    """The deviating layers in compare order, layers with identical deviations listed once."""
    return list(_layer_groups(deviations))


def baseline_findings(run: RunData, baseline: RunData, deviations: pd.DataFrame | None = None) -> list[Finding]:
    """The deviations of ``run`` from ``baseline`` (:func:`dynascope.compare`) as findings, in the compare order:
    one warning per deviating layer for the first MAX_DEVIATION_FINDINGS layers (its metrics listed), then one
    info line counting the rest."""
    from .comparison import compare, deviation_text

    if deviations is None:
        deviations = compare(run, baseline)
    if deviations.empty:
        return []
    out: list[Finding] = []
    groups = _layer_groups(deviations)
    order = list(groups)
    for lay in order[:MAX_DEVIATION_FINDINGS]:
        sub = deviations[deviations["layer"] == lay]
        first = sub.iloc[0]
        what = ", ".join(deviation_text(r) for _, r in sub.head(4).iterrows())  # each with its own first step
        more = f" and {len(sub) - 4} more metric(s)" if len(sub) > 4 else ""
        same = groups[lay][1:]
        twins = f" (and {', '.join(repr(t) for t in same[:3])}{' ...' if len(same) > 3 else ''}, identical)" \
            if same else ""
        where = (f"layer {lay!r}" if lay else "run-level") + twins
        out.append(Finding(
            "warning",
            f"Deviates from baseline {baseline.name!r} at {where} from step {int(first['first_step'])}: {what}{more} "
            f"(outside the baseline's band at the same steps for {int(first['n_steps'])} recorded step(s)).",
            str(first["metric"]), str(lay), int(first["first_step"]),
            float(first["ratio"]) if math.isfinite(first["ratio"]) else None, None, BASELINE_FIGURE,
            run.name, BASELINE_RULE))
    if len(order) > MAX_DEVIATION_FINDINGS:
        rest = deviations[deviations["layer"].isin([t for lay in order[MAX_DEVIATION_FINDINGS:] for t in groups[lay]])]
        out.append(Finding(
            "info",
            f"{len(order) - MAX_DEVIATION_FINDINGS} more layer(s) deviate from baseline {baseline.name!r} "
            f"({len(rest)} metric/layer pairs, first at step {int(rest['first_step'].min())}); "
            "dynascope.compare lists them all.",
            str(rest.iloc[0]["metric"]), "", int(rest["first_step"].min()), None, None, BASELINE_FIGURE, run.name,
            BASELINE_RULE))
    return out


def collect(runs: Sequence[RunData], baseline: RunData | None = None, rules: Sequence[str] | None = None,
            deviations: dict[str, pd.DataFrame] | None = None) -> list[Finding]:
    """What the report lists and ``dynascope.findings`` / ``dynascope check`` return: with a baseline, its
    deviations first (per run, :func:`baseline_findings`), then every rule's findings (:func:`findings`).
    ``deviations``: precomputed ``compare`` tables keyed by run name."""
    out: list[Finding] = []
    if baseline is not None:
        for run in runs:
            if deviations is not None and run.name not in deviations:
                continue  # the caller could not compare this run (and said so)
            out += baseline_findings(run, baseline, None if deviations is None else deviations[run.name])
    return out + findings(runs, rules)


def _doc_source(name: str, limit: int = 160) -> str:
    """The "Source(s): ..." sentence of a rule's docstring (up to the next sentence), shortened to ``limit``."""
    import re

    doc = " ".join((RULES[name].__doc__ or "").split()) if name in RULES else ""
    m = re.search(r"Sources?:\s*(.+?)(?:\.\s+(?=[A-Z])|$)", doc)
    text = m.group(1).rstrip(".") if m else ""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def rule_source(name: str) -> str:
    """The literature behind a rule: :data:`RULE_SOURCES`, else its docstring's Source sentence."""
    return RULE_SOURCES.get(name) or _doc_source(name)


def frame(found: Sequence[Finding], baseline: RunData | None = None) -> pd.DataFrame:
    """Findings as a DataFrame with :data:`FRAME_COLUMNS` (``source``: the rule's literature, or the baseline run)."""
    rows = []
    for f in found:
        if f.rule == BASELINE_RULE:
            source = f"baseline run {baseline.name!r}" if baseline is not None else "baseline run"
        else:
            source = rule_source(f.rule)
        rows.append({"severity": f.severity, "rule": f.rule, "metric": f.metric, "layer": f.layer,
                     "step": f.step, "message": f.message, "source": source, "run": f.run, "value": f.value,
                     "threshold": f.threshold, "figure": f.figure_key})
    df = pd.DataFrame(rows, columns=FRAME_COLUMNS)
    df["step"] = df["step"].astype("Int64")
    return df


@rule
def eval_loss_worse(run: RunData) -> list[Finding]:
    """An evaluation loss whose last value is >= 10% worse than its best (``dynascope analyze``'s ``loss`` on
    ``--data`` across checkpoints, or a logged ``val_loss`` / ``eval/loss``). Source: early stopping on held-out
    loss (Prechelt 1998). Rule and threshold: :mod:`dynascope.analysis.checkpoints` (``EVAL_LOSS_WORSE``)."""
    from .checkpoints import eval_loss_regressions

    return [Finding("warning", r["message"], r["metric"], "", r["step"], r["value"], r["threshold"], "loss")
            for r in eval_loss_regressions(run)]
