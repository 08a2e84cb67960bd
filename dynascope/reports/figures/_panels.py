"""One layout for the per-layer small multiples of the report's figures: a metric against step, one
panel per layer (at most MAX_LAYERS, evenly spaced in model order), runs overlaid.

A per-layer figure is a declaration, :class:`LayerFigure` (metric, y label and scale, caption, a companion
series, ...), registered with :func:`register_layers`; :func:`draw_layers` draws every one of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...store import RunData, query
from . import FigureFn, Have, register, run_colors
from ._helpers import (
    NONFINITE_HANDLE,
    few_xticks,
    finish,
    log_axis,
    new_figure,
    pick_layers,
    plot_series,
    run_gid,
    run_legend,
    set_caption,
    short,
    text,
)

__all__ = ["MAX_LAYERS", "layer_panels", "layers_caption", "companion", "LayerFigure", "Decoration", "draw_layers",
           "register_layers"]

MAX_LAYERS = 8

# extra(fig, ax, run index, run, metric, layer, colour) -> legend handles: what a figure adds to a panel
Extra = Callable[[Figure, object, int, RunData, str, str, str], list]


def layers_caption(shown: list[str], total: int) -> str:
    if total <= len(shown):
        return f"All {total} layers: {', '.join(shown)}."
    return f"{len(shown)} of {total} layers, evenly spaced in model order: {', '.join(shown)}."


def layer_panels(
    runs: Sequence[RunData],
    have: Have,
    metric: str,
    *,
    ylabel: str,
    logy: bool = True,
    logx: bool = False,
    candidates: Callable[[RunData], list[str]] | None = None,
    layers: Sequence[str] | None = None,
    leading: tuple[str, str, str] | None = None,
    extra: Extra | None = None,
) -> tuple[Figure, list[str], int, bool] | None:
    """Small multiples of ``metric`` against step (``logx``: against step + 1 on a log axis), runs
    overlaid, for ``layers`` (default: at most MAX_LAYERS of the recorded ones, or of ``candidates(run)``,
    evenly spaced). ``leading`` = (metric, layer, title) of a first panel (e.g. the whole network), drawn
    when a run recorded it. ``have``: the ``(index, run)`` pairs of the runs that recorded ``metric`` (the
    layers come from them, and the legend names them). Returns the figure, the layers shown, how many were
    available and whether any value was non-finite; None when there is no panel to draw."""
    pool: list[str] = []
    for _, r in have:
        for lay in (candidates(r) if candidates else query.layers(r, metric)):
            if lay and lay not in pool:
                pool.append(lay)
    if layers is not None:
        recorded = {lay for _, r in have for lay in query.layers(r, metric)}
        unknown = [lay for lay in layers if lay not in recorded]
        if unknown or not layers:
            raise ValueError(f"layers={list(layers)!r}: {metric} was not recorded for {unknown or 'an empty list'}; "
                             f"recorded layers: {pool}")
        pool = list(layers)
    shown = pool if layers is not None else pick_layers(pool, MAX_LAYERS)
    panels: list[tuple[str, str, str]] = []
    if leading is not None and any(query.has(r, leading[0]) for r in runs):
        panels.append(leading)
    panels += [(metric, lay, short(lay, 38)) for lay in shown]
    if not panels:
        return None
    cols = min(len(panels), 3 if len(panels) <= 6 or len(panels) == 9 else 4)
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(11 if cols == 4 else 10, 2.6 * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
    colors = run_colors(runs)
    handles: dict[str, object] = {}
    any_bad = False
    for ax, (m, lay, title) in zip(axes, panels):
        for i, (r, c) in enumerate(zip(runs, colors)):
            s, v = query.series(r, m, lay)
            if len(s) == 0:
                continue
            any_bad |= plot_series(ax, s + 1 if logx else s, v, color=c, log=logy, linewidth=1.1,
                                   gid=run_gid(fig, i, f"{r.name}: {m} {lay}"))
            if extra is not None:
                for h in extra(fig, ax, i, r, m, lay, c):
                    handles[h.get_label()] = h
        if logy:
            log_axis(ax)
        if logx:
            log_axis(ax, "x")
        else:
            few_xticks(ax, 4)
        ax.set_title(text(title), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for k, ax in enumerate(axes[:len(panels)]):
        if k + cols >= len(panels):  # the lowest panel of its column: label its step axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("step + 1 (updates applied)" if logx else "step", fontsize=9)
    for ax in axes[::cols]:
        ax.set_ylabel(text(ylabel), fontsize=9)
    run_legend(fig, [r for _, r in have], [colors[i] for i, _ in have],  # a run without the metric: no entry
               list(handles.values()) + ([NONFINITE_HANDLE] if any_bad else []))
    finish(fig, rows, cols, hgap=0.45, wgap=0.7)
    return fig, shown, len(pool), any_bad


def companion(metric: str, handle: object, linestyle: str) -> Extra:
    """An ``extra`` that draws ``metric`` of the same layer in each panel (thin, ``linestyle``, log scale)
    and puts ``handle`` in the legend: a threshold or a related norm beside the panel's metric."""
    def extra(fig: Figure, ax: object, i: int, r: RunData, m: str, lay: str, c: str) -> list:
        s, v = query.series(r, metric, lay)
        if len(s) == 0:
            return []
        plot_series(ax, s, v, color=c, linestyle=linestyle, linewidth=1, log=True,
                    gid=run_gid(fig, i, f"{r.name}: {metric} {lay}"))
        return [handle]
    return extra


@dataclass
class Decoration:
    """What a figure adds to the panels of one drawing: ``extra`` (see :data:`Extra`) and a ``note`` for the
    caption, read after the drawing (it may report what ``extra`` found)."""

    extra: Extra
    note: Callable[[], str] = field(default=lambda: "")


@dataclass(frozen=True)
class LayerFigure:
    """A per-layer line figure: ``metric`` against step, one panel per layer (:func:`layer_panels`)."""

    metric: str
    ylabel: str
    caption: str                    # before the sentence naming the layers; "{note}" takes the decoration's note
    logy: bool = True
    logx: bool = False              # against step + 1 on a log axis
    companion: tuple[str, str, str] | None = None   # (metric, legend label, line style) drawn thin in each panel
    leading: tuple[str, str, str] | None = None     # (metric, layer, title) of a first panel
    candidates: Callable[[RunData], list[str]] | None = None   # the layers to choose from (default: recorded)
    decorate: Callable[[Sequence[RunData]], Decoration] | None = None   # made from all the runs, per drawing
    hint: Callable[[Sequence[RunData], list[str]], str] | None = None   # after the layers sentence (runs, shown)
    layers_option: bool = False     # the figure takes ``layers=[...]`` (dynascope.figure(name, runs, layers=...))

    def __post_init__(self) -> None:
        if self.companion is not None and self.decorate is not None:
            raise ValueError("a LayerFigure has a companion series or a decoration, not both")


def draw_layers(spec: LayerFigure, runs: Sequence[RunData], have: Have,
                layers: Sequence[str] | None = None) -> Figure | None:
    """Draw the declared per-layer figure ``spec`` (``have``: the runs that recorded its metric)."""
    deco = spec.decorate(runs) if spec.decorate is not None else None
    extra = deco.extra if deco is not None else None
    if spec.companion is not None:
        metric, label, style = spec.companion
        extra = companion(metric, Line2D([], [], color="gray", linestyle=style, label=label), style)
    out = layer_panels(runs, have, spec.metric, ylabel=spec.ylabel, logy=spec.logy, logx=spec.logx,
                       candidates=spec.candidates, layers=layers, leading=spec.leading, extra=extra)
    if out is None:
        return None
    fig, shown, total, _ = out
    caption = spec.caption.replace("{note}", deco.note()) if deco is not None else spec.caption
    set_caption(fig, caption + layers_caption(shown, total) + (spec.hint(runs, shown) if spec.hint else ""))
    return fig


def register_layers(key: str, spec: LayerFigure, *, metrics: Sequence[str] | None = None, **registration) -> FigureFn:
    """Register the per-layer figure ``spec`` under ``key``: ``registration`` are :func:`register`'s keywords;
    the figure draws the runs that recorded ``spec.metric`` (``metrics`` default to it alone)."""
    if spec.layers_option:
        def draw(runs: Sequence[RunData], have: Have, *, layers: Sequence[str] | None = None) -> Figure | None:
            return draw_layers(spec, runs, have, layers)
    else:
        def draw(runs: Sequence[RunData], have: Have) -> Figure | None:
            return draw_layers(spec, runs, have)
    draw.__name__ = draw.__qualname__ = key
    draw.__doc__ = f"Per-layer figure {key!r}: {spec.metric} against step (declared, drawn by draw_layers)."
    return register(key, metrics=(spec.metric,) if metrics is None else metrics, needs=spec.metric,
                    **registration)(draw)
