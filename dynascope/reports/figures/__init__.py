"""Figure registry: one function per paper figure, ``runs -> Figure | None``.

The report (:mod:`dynascope.reports.html`) and the notebook API
(``dynascope.figures()``, ``dynascope.figure(name, runs)``) both iterate this
registry, so a figure has exactly one implementation.

Adding a figure is one decorator on a function in any module of this package
(modules whose name does not start with ``_`` are imported automatically, in
:func:`all_figures`; nothing else needs editing)::

    from . import register

    @register("noise_scale", title="Gradient noise scale against step", section="Gradients",
              source="McCandlish et al. 2018", metrics=("grad.noise_scale",),
              recorded_by="dynascope.NoiseScale(every=N) passed as probe(..., scheduled=[...])", order=150)
    def noise_scale(runs: Sequence[RunData], have: Have, *, layers: Sequence[str] | None = None) -> Figure | None:
        ...   # only the drawing: ``have`` holds the runs that recorded grad.noise_scale, never empty

A per-layer line figure (a metric against step, one panel per layer) is a
declaration, ``register_layers(key, LayerFigure(metric, ylabel, caption=...), ...)``
(:mod:`._panels`).

- ``metrics``: the scalar metrics or artifact names the figure draws; when the
  figure returns ``None`` (nothing to draw), ``dynascope.figure`` names the
  ones the runs did not record, with ``recorded_by`` (the probe, diagnostic or
  command that records them).
- ``needs``: what a run must have recorded to be drawn, ANY one of these names
  (a scalar metric, or an artifact with at least one entry); by default
  ``metrics``. The registry filters the runs before it calls the figure, and
  returns ``None`` without calling it when no run has any of them. ``needs=()``
  passes every run (a figure that decides itself, e.g. the loss figure draws
  every run-level scalar).
- ``order``: position in the report (sections appear in the order of their
  first figure); by default after every figure registered with an order.
- The function is called as ``fn(runs, have, **options)``: ``runs`` all the
  runs (``run_colors(runs)`` gives each its colour, the same in every figure),
  ``have`` the ``(index in runs, run)`` pairs of the runs that recorded what it
  needs, in run order, never empty. A function with ``runs`` as its only
  positional parameter is called as ``fn(runs, **options)`` (after the same
  check). It still returns ``None`` when the runs it got hold nothing it can
  draw (e.g. too few layers), so the report omits it instead of drawing an
  empty panel.
- Keyword-only parameters of the function are the figure's options
  (``dynascope.figure(name, runs, layers=[...])``); the report calls it with
  the runs only, so every option needs a default.

:func:`register` returns (and the registry keeps, as ``FigureSpec.fn``) the
figure as the report and ``dynascope.figure`` call it: ``fn(runs, **options)``
with the filtering done; ``FigureSpec.draw`` is the registered function.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from ...store import RunData, query

__all__ = ["FigureSpec", "register", "REGISTRY", "run_colors", "all_figures", "recorded", "Have"]

FigureFn = Callable[..., "Figure | None"]
Have = list[tuple[int, RunData]]  # (index in runs, run) of the runs a figure draws, in run order


@dataclass(frozen=True)
class FigureSpec:
    key: str          # stable id, used for anchors and file names
    section: str      # report section heading
    title: str        # what it shows
    source: str       # paper / reference it reproduces
    order: int
    fn: FigureFn      # fn(runs, **options) -> Figure | None, the runs filtered by ``needs``
    metrics: tuple[str, ...] = ()   # scalar metrics or artifact names it draws
    recorded_by: str = ""           # the probe / diagnostic / command that records them
    needs: tuple[str, ...] = ()     # a run is drawn when it recorded any of these; () = every run
    draw: FigureFn | None = None    # the registered function (fn without the filtering)


REGISTRY: dict[str, FigureSpec] = {}


# what records the metrics of the built-in figures (``recorded_by``)
BY_ACTIVATIONS = "the activations probe of dynascope.probe (on by default: probes=('activations', ...))"
BY_GRADIENTS = "the gradients probe of dynascope.probe (on by default: probes=(..., 'gradients', ...))"
BY_UPDATES = "the updates probe of dynascope.probe (on by default: probes=(..., 'updates'); needs the optimizer)"
BY_CURVATURE = "dynascope.Curvature(every=N, batch=..., loss_fn=...) passed as dynascope.probe(..., curvature=...)"
BY_LANDSCAPE = "dynascope.Landscape(at='end', batch=..., loss_fn=...) passed as dynascope.probe(..., landscape=...)"
BY_PLASTICITY = "dynascope.Plasticity(every=N, batch=...) passed as dynascope.probe(..., plasticity=...)"
BY_ANALYZE = "dynascope analyze CHECKPOINTS --model pkg.module:factory -o RUN (data-free weight diagnostics)"
_UNORDERED = itertools.count(10_000)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def recorded(run: RunData, name: str) -> bool:
    """``name`` is a scalar metric of ``run``, or an artifact it saved at least once (read through the report's
    cache, :mod:`dynascope.store.query`)."""
    return query.has(run, name) or bool(query.artifact_steps(run, name))


def _filtered(fn: FigureFn, needs: tuple[str, ...]) -> FigureFn:
    """``fn`` as the report calls it, ``(runs, **options)``: the runs that recorded one of ``needs`` are passed
    on as ``have`` (none: None, ``fn`` is not called)."""
    params = list(inspect.signature(fn).parameters.values())
    with_have = sum(p.kind in _POSITIONAL for p in params) >= 2

    @functools.wraps(fn)
    def figure_of(runs: Sequence[RunData], **options: object) -> Figure | None:
        have = [(i, r) for i, r in enumerate(runs) if not needs or any(recorded(r, m) for m in needs)]
        if not have:
            return None
        return fn(runs, have, **options) if with_have else fn(runs, **options)

    if with_have:  # the options stay visible (dynascope.figures() lists them); ``have`` is the registry's
        figure_of.__signature__ = inspect.Signature(params[:1] + params[2:])  # type: ignore[attr-defined]
    return figure_of


def register(key: str, *, section: str, title: str, source: str, order: int | None = None,
             metrics: Sequence[str] | str = (), recorded_by: str = "",
             needs: Sequence[str] | str | None = None) -> Callable[[FigureFn], FigureFn]:
    """Register a figure function under ``key`` (see the module docstring); returns it as the report calls it."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    if isinstance(needs, str):
        needs = (needs,)
    need = tuple(metrics if needs is None else needs)

    def deco(fn: FigureFn) -> FigureFn:
        wrapped = _filtered(fn, need)
        REGISTRY[key] = FigureSpec(key, section, title, source, next(_UNORDERED) if order is None else order,
                                   wrapped, tuple(metrics), recorded_by, need, fn)
        return wrapped

    return deco


_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
            "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def run_colors(runs: Sequence[RunData]) -> list[str]:
    """One stable colour per run, in the order given."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(len(runs))]


def all_figures() -> list[FigureSpec]:
    """Every registered figure, in report order (imports every public module of this package)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return sorted(REGISTRY.values(), key=lambda s: (s.order, s.key))
