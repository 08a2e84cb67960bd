"""Figures: loss landscapes (Li et al. 2018) and linear interpolation (Goodfellow et al. 2015).

Each figure uses the last ``landscape.*`` artifact of each run; runs without
it are left out (by the registry), and the figure is None when no run has it. Several runs are
drawn side by side on shared contour levels / axes, so "with vs without skip
connections" comparisons are honest. Every panel states the BatchNorm policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ...store import RunData, query
from . import BY_LANDSCAPE, Have, register, run_colors
from ._helpers import log_axis

SECTION = "Loss landscape"
SOURCE = "Li et al. 2018, Visualizing the Loss Landscape of Neural Nets"


def _collect(have: Have, name: str, dims: int | None = None) -> list[tuple[int, RunData, dict, dict]]:
    """The last artifact ``name`` of each run in ``have`` (with ``dims``: only the surfaces of that many dims)."""
    out = []
    for i, run in have:
        arrays, meta = query.artifact(run, name)
        if dims is not None and int(meta.get("dims", 2)) != dims:
            continue
        out.append((i, run, arrays, meta))
    return out


def _levels(values: list[np.ndarray], n: int = 20) -> np.ndarray:
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values])
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1e-12
    if lo > 0 and hi / lo > 10:
        return np.geomspace(lo, hi, n)  # losses span decades: log-spaced contours
    return np.linspace(lo, hi, n)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def _has_batchnorm(run: RunData) -> bool | None:
    """Whether the run's model has BatchNorm: meta ``batchnorm`` (dynascope analyze), else the model summary;
    None when neither tells."""
    if isinstance(run.meta.get("batchnorm"), list):
        return bool(run.meta["batchnorm"])
    summary = (run.meta.get("model") or {}).get("summary")
    return None if not summary else "BatchNorm" in summary


def _policy(meta: dict, run: RunData) -> str:
    """How the landscape was evaluated: "BN eval" / "BN recompute" for a model with BatchNorm, "eval mode"
    without one (the BN policy has nothing to act on)."""
    how = "eval mode" if _has_batchnorm(run) is False else f"BN {meta.get('bn_policy', '?')}"
    return f"{how}, batch {meta.get('batch_size', '?')}"


@register("landscape_1d", section=SECTION, title="1D loss along filter-normalized random directions",
          source=SOURCE, order=400,
          metrics=("landscape.surface",), recorded_by=BY_LANDSCAPE + " with dims=1")
def landscape_1d(runs: Sequence[RunData], have: Have) -> Figure | None:
    found = _collect(have, "landscape.surface", dims=1)
    if not found:
        return None
    colors = run_colors(runs)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, run, arrays, meta in found:
        a = arrays["alphas"]
        k = int(meta.get("n_directions", 1))
        label = f"{run.name} ({_policy(meta, run)}, {k} direction{'s' if k > 1 else ''}, seed {meta.get('seed')})"
        if "band_min" in arrays and k > 1:
            ax.fill_between(a, arrays["band_min"], arrays["band_max"], color=colors[i], alpha=0.2, lw=0)
            label += ": median, band = min..max"
        ax.plot(a, arrays["losses"], color=colors[i], lw=1.8, label=label)
        ax.plot([0.0], [meta["center_loss"]], marker="o", color=colors[i], ms=5)
    ax.set_xlabel(r"step $\alpha$ along the direction ($\theta + \alpha d$)")
    ax.set_ylabel("loss")
    ax.set_title("Loss along random filter-normalized directions")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _panels(found: list, *, projection: str | None = None, size: float = 3.8) -> tuple[Figure, list]:
    rows, cols = _grid(len(found))
    fig = Figure(figsize=(size * cols + 0.8, size * rows))
    axes = [fig.add_subplot(rows, cols, n + 1, projection=projection) for n in range(len(found))]
    fig.subplots_adjust(wspace=0.45, hspace=0.5, top=0.82, bottom=0.14)
    return fig, axes


@register("landscape_contour", section=SECTION, title="2D loss contours around the weights (filter-normalized plane)",
          source=SOURCE, order=410,
          metrics=("landscape.surface",), recorded_by=BY_LANDSCAPE + " (dims=2), or dynascope analyze --landscape")
def landscape_contour(runs: Sequence[RunData], have: Have) -> Figure | None:
    found = _collect(have, "landscape.surface", dims=2)
    if not found:
        return None
    colors = run_colors(runs)
    levels = _levels([f[2]["losses"] for f in found])
    fig, axes = _panels(found)
    cs = None
    for ax, (i, run, arrays, meta) in zip(axes, found):
        a, b, z = arrays["alphas"], arrays["betas"], arrays["losses"]
        # losses[i, j] is at (alphas[i], betas[j]): transpose so alpha runs along x
        cs = ax.contour(a, b, z.T, levels=levels, cmap="viridis", linewidths=0.9)
        ax.plot([0.0], [0.0], marker="*", color=colors[i], ms=12, mec="k", mew=0.6, ls="none",
                label=f"weights (loss {meta['center_loss']:.3g})")
        ax.set_aspect("equal")
        ax.set_xlabel(r"$\alpha$ ($d_1$)")
        ax.set_ylabel(r"$\beta$ ($d_2$)")
        cos = meta.get("axis_cosine")
        detail = f"seed {meta.get('seed')}" + (f", cos(d1, d2) = {cos:.2g}" if cos is not None else "")
        ax.set_title(f"{run.name}\n{_policy(meta, run)}\n{detail}", fontsize=8, color=colors[i])
        ax.legend(fontsize=7, loc="upper right")
    if cs is not None:
        fig.colorbar(cs, ax=axes, shrink=0.8, label="loss (shared levels)")
    return fig


@register("landscape_surface3d", section=SECTION, title="3D loss surface around the weights", source=SOURCE,
          order=420,
          metrics=("landscape.surface",), recorded_by=BY_LANDSCAPE + " (dims=2), or dynascope analyze --landscape")
def landscape_surface3d(runs: Sequence[RunData], have: Have) -> Figure | None:
    found = _collect(have, "landscape.surface", dims=2)
    if not found:
        return None
    colors = run_colors(runs)
    zs = np.concatenate([f[2]["losses"][np.isfinite(f[2]["losses"])].ravel() for f in found])
    zlim = (float(zs.min()), float(zs.max()))
    fig, axes = _panels(found, projection="3d", size=4.2)
    for ax, (i, run, arrays, meta) in zip(axes, found):
        a, b, z = arrays["alphas"], arrays["betas"], arrays["losses"]
        aa, bb = np.meshgrid(a, b, indexing="ij")
        ax.plot_surface(aa, bb, z, cmap="viridis", vmin=zlim[0], vmax=zlim[1], linewidth=0, antialiased=True,
                        rcount=min(60, len(a)), ccount=min(60, len(b)))
        ax.scatter([0.0], [0.0], [meta["center_loss"]], color=colors[i], s=30, edgecolor="k", depthshade=False)
        ax.set_zlim(*zlim)
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel(r"$\beta$")
        ax.set_zlabel("loss")
        ax.set_title(f"{run.name}\n{_policy(meta, run)}", fontsize=9, color=colors[i])
    return fig


@register("landscape_trajectory", section=SECTION, title="Optimization path on the PCA plane of the checkpoints",
          source=SOURCE + ", section 7", order=430,
          metrics=("landscape.trajectory",), recorded_by=BY_LANDSCAPE + ", or dynascope analyze --landscape")
def landscape_trajectory(runs: Sequence[RunData], have: Have) -> Figure | None:
    found = _collect(have, "landscape.trajectory")
    colors = run_colors(runs)
    fig, axes = _panels(found)
    for ax, (i, run, arrays, meta) in zip(axes, found):
        a, b, z, path = arrays["alphas"], arrays["betas"], arrays["losses"], arrays["path"]
        cs = ax.contour(a, b, z.T, levels=_levels([z]), cmap="viridis", linewidths=0.9)
        ax.clabel(cs, fontsize=6, fmt="%.3g")
        ax.plot(path[:, 0], path[:, 1], "-o", color=colors[i], ms=3, lw=1.4, label="checkpoints")
        ax.plot(path[0, 0], path[0, 1], marker="s", color=colors[i], ms=6, mec="k", ls="none", label="first")
        ax.plot(path[-1, 0], path[-1, 1], marker="*", color=colors[i], ms=12, mec="k", ls="none",
                label=f"final (loss {meta['center_loss']:.3g})")
        if "path_steps" in arrays:
            steps = arrays["path_steps"]
            for k in (0, len(steps) - 1):
                ax.annotate(f"step {int(steps[k])}", path[k], fontsize=6, xytext=(4, 4), textcoords="offset points")
        ev = arrays["explained_variance_ratio"]
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}% of variance)")
        ax.set_title(f"{run.name}\n{_policy(meta, run)}\n{meta.get('n_checkpoints')} checkpoints", fontsize=8,
                     color=colors[i])
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


@register("landscape_interpolation", section=SECTION,
          title="Loss on the straight line from the first kept checkpoint to the final weights",
          source="Goodfellow, Vinyals, Saxe 2015, Qualitatively characterizing neural network optimization problems",
          order=440,
          metrics=("landscape.interpolation",), recorded_by=BY_LANDSCAPE + ", or dynascope analyze --interpolate")
def landscape_interpolation(runs: Sequence[RunData], have: Have) -> Figure | None:
    found = _collect(have, "landscape.interpolation")
    colors = run_colors(runs)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for i, run, arrays, meta in found:
        steps = ""
        if "step_a" in meta:
            steps = f", step {meta['step_a']} -> {meta['step_b']}"
        ax.plot(arrays["t"], arrays["losses"], color=colors[i], lw=1.8,
                label=f"{run.name} ({_policy(meta, run)}{steps})")
        ia, ib = int(meta["index_a"]), int(meta["index_b"])
        ax.plot(arrays["t"][[ia, ib]], arrays["losses"][[ia, ib]], "o", color=colors[i], ms=5)
    for t in (0.0, 1.0):
        ax.axvline(t, color="0.6", lw=0.8, ls=":")
    # beyond the endpoints the loss can explode by orders of magnitude; a log axis keeps the path between them legible
    values = np.concatenate([np.asarray(arrays["losses"], dtype=float).ravel() for _, _, arrays, _ in found])
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
        log_axis(ax)
    ax.set_xlabel(r"$t$ in $(1-t)\,\theta_{first} + t\,\theta_{final}$")
    ax.set_ylabel("loss")
    ax.set_title("Linear interpolation between checkpoints")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
