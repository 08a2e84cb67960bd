"""Figures as objects: ``dynascope.figures()`` and ``dynascope.figure(name, runs, **options)``.

Both read the report's figure registry (:mod:`dynascope.reports.figures`):
``figure`` calls the very function the HTML report embeds, so a notebook and
the report never disagree. In a notebook the returned Figure shows itself as
a PNG without pyplot (``_repr_png_``); outside one it is a plain matplotlib
``Figure`` (``fig.savefig(...)``, ``fig.axes``).

    import dynascope
    dynascope.figures()                                   # name, title, section, source
    dynascope.figures("runs/a")                           # only those the run can draw
    dynascope.figure("signal_propagation", ["runs/bn", "runs/plain"])
    dynascope.figure("angular_update", "runs/a", layers=["0.linear.weight"])
"""

from __future__ import annotations

import difflib
import html
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from matplotlib.figure import Figure

from ..store import RunData, as_runs
from .figures import FigureSpec, all_figures

__all__ = ["figures", "figure", "FigureInfo", "FigureCatalog", "FigureDataError", "RunsLike"]

RunsLike = Union[str, "os.PathLike[str]", RunData, Sequence[Union[str, "os.PathLike[str]", RunData]]]


class FigureDataError(ValueError):
    """The runs did not record what a figure draws (the message names the metrics and what records them)."""


@dataclass(frozen=True)
class FigureInfo:
    """One registered figure: call it with ``dynascope.figure(name, runs, **options)``."""

    name: str
    title: str
    section: str
    source: str
    metrics: tuple[str, ...]
    recorded_by: str
    options: tuple[str, ...]


class FigureCatalog(list):
    """The list of :class:`FigureInfo` returned by :func:`figures`; shows as a table in a notebook."""

    def names(self) -> list[str]:
        return [f.name for f in self]

    def __repr__(self) -> str:
        if not self:
            return "no figures"
        width = max(len(f.name) for f in self)
        return "\n".join(f"{f.name:<{width}}  [{f.section}] {f.title}  ({f.source})" for f in self)

    def _repr_html_(self) -> str:
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in
                             (f.name, f.section, f.title, f.source, ", ".join(f.metrics), ", ".join(f.options)))
            + "</tr>" for f in self)
        head = "".join(f"<th>{h}</th>" for h in ("name", "section", "title", "source", "metrics", "options"))
        return f'<table class="dynascope-figures"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


class _NotebookFigure(Figure):
    """A matplotlib Figure that Jupyter shows as a PNG without pyplot."""

    def _repr_png_(self) -> bytes:
        from .html import render_png

        return render_png(self)


def _options(spec: FigureSpec) -> tuple[str, ...]:
    params = inspect.signature(spec.fn).parameters.values()
    return tuple(p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY)


def _info(spec: FigureSpec) -> FigureInfo:
    return FigureInfo(spec.key, spec.title, spec.section, spec.source, spec.metrics, spec.recorded_by,
                      _options(spec))


def _recorded(run: RunData, name: str) -> bool:
    """``name`` is a scalar metric or an artifact of ``run``."""
    if name in run.metrics():
        return True
    try:
        return not run.artifacts(name).empty
    except Exception:  # noqa: BLE001 - an unreadable index counts as not recorded
        return False


def figures(runs: RunsLike | None = None) -> FigureCatalog:
    """The report's figures in report order (name, title, section, source paper, metrics, options).

    With ``runs``: only the figures whose metrics at least one of the runs recorded.
    """
    specs = all_figures()
    if runs is not None:
        run_list = as_runs(runs)
        specs = [s for s in specs if not s.metrics or any(_recorded(r, m) for r in run_list for m in s.metrics)]
    return FigureCatalog(_info(s) for s in specs)


def _spec(name: str) -> FigureSpec:
    specs = {s.key: s for s in all_figures()}
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown figure {name!r}{hint} (dynascope.figures() lists all {len(specs)})")
    return specs[name]


def _missing_message(spec: FigureSpec, run_list: Sequence[RunData]) -> str:
    names = ", ".join(repr(r.name) for r in run_list)
    which = "the run" if len(run_list) == 1 else "the runs"
    if spec.metrics:
        missing = [m for m in spec.metrics if not any(_recorded(r, m) for r in run_list)]
        if missing:
            need = missing[0] if len(missing) == 1 else "one of " + ", ".join(missing)
            by = f"; it is recorded by {spec.recorded_by}" if spec.recorded_by else ""
            return f"figure {spec.key!r} needs {need}, which {which} {names} did not record{by}"
        return (f"figure {spec.key!r}: {which} {names} recorded {', '.join(spec.metrics)} but nothing it can "
                "draw (too few layers or steps)")
    return f"figure {spec.key!r} found nothing to draw in {which} {names}"


def figure(name: str, runs: RunsLike, **options: Any) -> Figure:
    """The report's figure ``name`` for one run or several (paths or RunData), as a matplotlib Figure.

    ``options`` are the figure's keyword options (``dynascope.figures()`` lists
    them, e.g. ``layers=[...]`` for the per-layer figures). Raises
    :class:`FigureDataError` naming the missing metrics and what records them
    when the runs did not record what the figure draws, and ``ValueError`` for
    an unknown name or option.
    """
    spec = _spec(name)
    allowed = _options(spec)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepts = f"it accepts {', '.join(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"figure {name!r} has no option {', '.join(unknown)}; {accepts}")
    run_list = as_runs(runs)
    fig = spec.fn(run_list, **options)
    if fig is None:
        raise FigureDataError(_missing_message(spec, run_list))
    if type(fig) is Figure:
        fig.__class__ = _NotebookFigure  # same layout, adds only the notebook display
    return fig

