"""Figure registry: one function per paper figure, ``runs -> Figure | None``.

Each module in this package registers its figures with :func:`figure`; a
function returns ``None`` when none of the runs recorded what it needs, so the
report omits it instead of drawing an empty panel. Runs keep one colour each
across every figure (:func:`run_colors`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from ...store import RunData

__all__ = ["FigureSpec", "figure", "REGISTRY", "run_colors", "all_figures"]

FigureFn = Callable[[Sequence[RunData]], "Figure | None"]


@dataclass(frozen=True)
class FigureSpec:
    key: str          # stable id, used for anchors and file names
    section: str      # report section heading
    title: str        # what it shows
    source: str       # paper / reference it reproduces
    order: int
    fn: FigureFn


REGISTRY: dict[str, FigureSpec] = {}


def figure(key: str, *, section: str, title: str, source: str, order: int) -> Callable[[FigureFn], FigureFn]:
    """Register a figure function under ``key``."""

    def deco(fn: FigureFn) -> FigureFn:
        REGISTRY[key] = FigureSpec(key, section, title, source, order, fn)
        return fn

    return deco


_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
            "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def run_colors(runs: Sequence[RunData]) -> list[str]:
    """One stable colour per run, in the order given."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(len(runs))]


def all_figures() -> list[FigureSpec]:
    """Every registered figure, in report order (imports the figure modules)."""
    from . import curvature, dynamics, landscape, plasticity, signal, training  # noqa: F401
    for extra in ("calibration", "collapse", "noise_scale", "scores"):  # issue 12's figures
        importlib.import_module(f"{__name__}.{extra}")

    return sorted(REGISTRY.values(), key=lambda s: s.order)
