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
    def noise_scale(runs: Sequence[RunData], *, layers: Sequence[str] | None = None) -> Figure | None:
        ...

- ``metrics``: the scalar metrics or artifact names the figure draws; when the
  function returns ``None`` (nothing to draw), ``dynascope.figure`` names the
  ones the runs did not record, with ``recorded_by`` (the probe, diagnostic or
  command that records them). The figure draws when ANY of them is present.
- ``order``: position in the report (sections appear in the order of their
  first figure); by default after every figure registered with an order.
- Keyword-only parameters of the function are the figure's options
  (``dynascope.figure(name, runs, layers=[...])``); the report calls it with
  the runs only, so every option needs a default.
- The function returns ``None`` when none of the runs recorded what it needs,
  so the report omits it instead of drawing an empty panel. Runs keep one
  colour each across every figure (:func:`run_colors`).

``figure`` is the older name of :func:`register` (``order`` then required by
habit, not by the code) and stays available.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from ...store import RunData

__all__ = ["FigureSpec", "register", "figure", "REGISTRY", "run_colors", "all_figures"]

FigureFn = Callable[..., "Figure | None"]


@dataclass(frozen=True)
class FigureSpec:
    key: str          # stable id, used for anchors and file names
    section: str      # report section heading
    title: str        # what it shows
    source: str       # paper / reference it reproduces
    order: int
    fn: FigureFn
    metrics: tuple[str, ...] = ()   # scalar metrics or artifact names it draws (any one suffices)
    recorded_by: str = ""           # the probe / diagnostic / command that records them


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


def register(key: str, *, section: str, title: str, source: str, order: int | None = None,
             metrics: Sequence[str] | str = (), recorded_by: str = "") -> Callable[[FigureFn], FigureFn]:
    """Register a figure function under ``key`` (see the module docstring)."""
    if isinstance(metrics, str):
        metrics = (metrics,)

    def deco(fn: FigureFn) -> FigureFn:
        REGISTRY[key] = FigureSpec(key, section, title, source, next(_UNORDERED) if order is None else order, fn,
                                   tuple(metrics), recorded_by)
        return fn

    return deco


figure = register  # the registry's first name, still used by figure modules


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
