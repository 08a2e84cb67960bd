"""Plot helpers shared by the signal and training figures.

- :func:`new_figure` makes a pyplot-free Figure (no global state, safe in threads).
- :func:`plot_series` draws a line against step, min/max-decimated to a
  readable number of points (spikes survive), and marks every non-finite value
  with an ``x`` at the top edge of the axes so NaN/Inf are visible, not dropped.
- :func:`set_caption` attaches a caption the HTML report prints under the figure.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter
from matplotlib.transforms import blended_transform_factory

from ...store import RunData

__all__ = ["new_figure", "plot_series", "decimate", "pick_layers", "set_caption", "text",
           "run_gid", "short", "run_label", "finish", "log_axis", "few_xticks", "NONFINITE_HANDLE", "run_legend",
           "CAPTION_ATTR", "GID_LABELS_ATTR", "index_xticks"]

CAPTION_ATTR = "dynascope_caption"
GID_LABELS_ATTR = "dynascope_gid_labels"
MAX_POINTS = 1000
_gid_counter = itertools.count()

NONFINITE_HANDLE = Line2D([], [], linestyle="none", marker="x", color="black", markersize=7, label="non-finite value")


def text(s: object) -> str:
    """A user string made safe for matplotlib text: ``$`` would start mathtext."""
    return str(s).replace("$", r"\$")


def new_figure(width: float = 9.0, height: float = 4.0) -> Figure:
    """A Figure without a layout engine (constrained layout measures every tick label and costs
    seconds on a page of small multiples); call :func:`finish` after drawing."""
    fig = Figure(figsize=(width, height))
    setattr(fig, GID_LABELS_ATTR, {})
    return fig


def finish(fig: Figure, rows: int = 1, cols: int = 1, *, legend: bool = True, left: float = 0.75,
           bottom: float = 0.55, right: float = 0.2, top: float = 0.35, hgap: float = 0.62,
           wgap: float = 0.62) -> None:
    """Fixed margins in inches (cheap, predictable); ``legend`` reserves a row above the panels."""
    w, h = fig.get_size_inches()
    rows_legend = 0
    if legend and fig.legends:
        leg = fig.legends[-1]
        texts = leg.get_texts()
        ncols = max(getattr(leg, "_ncols", 1), 1)
        rows_legend = -(-len(texts) // ncols)
    elif legend:
        rows_legend = 1
    top_in = top + 0.2 * rows_legend + (0.1 if rows_legend else 0.0)
    avail_h = max(h - top_in - bottom, 0.5)
    avail_w = max(w - left - right, 0.5)
    ax_h = max((avail_h - (rows - 1) * hgap) / rows, 0.2)
    ax_w = max((avail_w - (cols - 1) * wgap) / cols, 0.2)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top_in / h,
                        hspace=hgap / ax_h, wspace=wgap / ax_w)


class PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks to label, printed as plain numbers (0.02, 1e-05). At module
    level so a figure pickles (a notebook's figure cache, multiprocessing)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_formatter(minor: bool) -> PlainLogFormatter:
    return PlainLogFormatter(labelOnlyBase=not minor, minor_thresholds=(2, 2))  # label 2 and 5 up to 2 decades


def log_axis(ax, axis: str = "y") -> None:
    """Log scale with plain-text tick labels such as 0.02 (the default mathtext labels are slow to lay out)."""
    from matplotlib.ticker import LogLocator

    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(LogLocator(numticks=6))
    a.set_minor_locator(LogLocator(subs=(2.0, 5.0), numticks=6))  # fewer Tick objects: each costs ms to draw
    a.set_major_formatter(_plain_log_formatter(False))
    a.set_minor_formatter(_plain_log_formatter(True))
    ax.tick_params(axis=axis, which="both", labelsize=8)


def few_xticks(ax, n: int = 5) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(n, integer=True))


def index_xticks(ax) -> None:
    """Integer ticks on a numeric layer / block index axis (no 1.5, 2.5); named ticks (a FixedLocator) stay."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if not isinstance(ax.xaxis.get_major_locator(), FixedLocator):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def set_caption(fig: Figure, caption: str) -> None:
    """Caption printed below the figure in the report (plain text, escaped there)."""
    setattr(fig, CAPTION_ATTR, caption)


def run_gid(fig: Figure, run_index: int, label: str) -> str:
    """An SVG id for an artist of run ``run_index``; the report uses it to toggle runs and show tooltips."""
    gid = f"dsrun{run_index}-{next(_gid_counter)}"
    labels = getattr(fig, GID_LABELS_ATTR, None)
    if labels is None:
        labels = {}
        setattr(fig, GID_LABELS_ATTR, labels)
    labels[gid] = label
    return gid


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep the minimum and maximum of each of ``max_points // 2`` buckets (in step order).

    Finite values only; a spike of one step survives. Shorter series pass through.
    """
    n = len(x)
    if n <= max_points:
        return x, y
    nb = max(max_points // 2, 1)
    edges = np.linspace(0, n, nb + 1).astype(int)
    idx: list[int] = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        seg = y[a:b]
        i, j = a + int(np.argmin(seg)), a + int(np.argmax(seg))
        idx.extend(sorted({i, j}))
    sel = np.asarray(idx)
    return x[sel], y[sel]


def plot_series(ax, x: np.ndarray, y: np.ndarray, *, color: str, label: str | None = None, gid: str | None = None,
                log: bool = False, **kw) -> bool:
    """Plot ``y`` against ``x``; returns True when some value was non-finite (and marked).

    With ``log``, non-positive finite values are treated like non-finite ones
    for the line (a log axis cannot show them) but are not marked.
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=float)
    bad = ~np.isfinite(y)
    ok = ~bad & ((y > 0) if log else True)
    xs, ys = decimate(x[ok], y[ok])
    ax.plot(xs, ys, color=color, label=label, gid=gid, **kw)
    if bad.any():
        xb = x[bad]
        if len(xb) > 200:  # one marker per bucket is enough to see where they are
            xb = np.unique(np.linspace(xb.min(), xb.max(), 200).round())
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(xb, np.full(len(xb), 0.97), linestyle="none", marker="x", color=color, markersize=6,
                markeredgewidth=1.5, transform=trans, clip_on=False, gid=None if gid is None else gid + "-nf")
        return True
    return False


def pick_layers(names: Sequence[str], k: int = 8) -> list[str]:
    """At most ``k`` names evenly spaced over ``names`` (first and last included)."""
    names = list(names)
    if len(names) <= k:
        return names
    idx = np.unique(np.linspace(0, len(names) - 1, k).round().astype(int))
    return [names[i] for i in idx]


def short(name: str, width: int = 40) -> str:
    """``name`` cut to ``width`` characters (keeping its end) for titles and legends; tables show it whole."""
    name = str(name)
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width // 2):]


def run_label(run: RunData) -> str:
    return text(short(run.name))


def run_legend(fig: Figure, runs: Sequence[RunData], colors: Sequence[str], extra: Sequence = ()) -> None:
    """One shared legend above the panels: a colour per run plus ``extra`` handles.

    As many columns as fit the figure width (estimated from the label lengths at 8.5 pt).
    """
    handles = [Line2D([], [], color=c, linewidth=2, label=run_label(r)) for r, c in zip(runs, colors)]
    handles += list(extra)
    if handles:
        longest = max(len(h.get_label()) for h in handles)
        col_pt = longest * 5.2 + 40
        fits = max(1, int(fig.get_size_inches()[0] * 72 // col_pt))
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(handles), fits),
                   frameon=False, fontsize=8.5, handlelength=2.2, columnspacing=1.2)


def legend_rows(fig: Figure, n_handles: int, longest: int) -> int:
    fits = max(1, int(fig.get_size_inches()[0] * 72 // (longest * 5.2 + 40)))
    return -(-n_handles // fits)
