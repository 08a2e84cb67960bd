"""Adaptive 2D grid: quadtree refinement of a loss surface on the lattice of
the full grid."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _adaptive_grid(
    evaluate: Callable[[list[tuple[int, int]]], np.ndarray],
    resolution: int,
    tol: float,
    coarse: int | None,
    known: dict[tuple[int, int], float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Quadtree refinement on the index lattice of the full grid.

    Starts from a coarse lattice (stride ``s``), then for each cell evaluates
    its centre and edge midpoints and compares them with the bilinear
    interpolation of the corners; a cell whose largest error exceeds ``tol``
    times the range of the values seen so far is split into four (those points
    are the children's corners). Unevaluated lattice
    points are filled by linear interpolation on the Delaunay triangulation of
    the evaluated ones. Returns ``(values, evaluated_mask)``.
    """
    from scipy.interpolate import griddata

    R = resolution
    values = np.full((R, R), np.nan)
    done = np.zeros((R, R), dtype=bool)
    for (i, j), v in (known or {}).items():  # points already evaluated (the centre)
        values[i, j] = v
        done[i, j] = True

    def ensure(idx: list[tuple[int, int]]) -> None:
        need = sorted({(i, j) for i, j in idx if not done[i, j]})
        if need:
            vals = evaluate(need)
            for (i, j), v in zip(need, vals):
                values[i, j] = v
                done[i, j] = True

    if coarse is None:
        stride = 1
        while (R - 1) / (stride * 2) >= 4:
            stride *= 2
    else:
        stride = max(1, int(coarse))
    ticks = sorted(set(list(range(0, R, stride)) + [R - 1]))
    ensure([(i, j) for i in ticks for j in ticks])
    cells = [(ticks[a], ticks[a + 1], ticks[b], ticks[b + 1]) for a in range(len(ticks) - 1)
             for b in range(len(ticks) - 1)]
    def probes(i0: int, i1: int, j0: int, j1: int) -> list[tuple[int, int]]:
        im, jm = (i0 + i1) // 2, (j0 + j1) // 2
        return [(im, jm), (im, j0), (im, j1), (i0, jm), (i1, jm)]

    while cells:
        cells = [c for c in cells if c[1] - c[0] >= 2 or c[3] - c[2] >= 2]  # cells with lattice points inside
        ensure([q for c in cells for q in probes(*c)])
        finite = values[done & np.isfinite(values)]
        scale = float(finite.max() - finite.min()) if finite.size else 1.0
        nxt = []
        for i0, i1, j0, j1 in cells:
            err = 0.0
            for i, j in probes(i0, i1, j0, j1):  # centre and edge midpoints against the bilinear patch
                u = (i - i0) / (i1 - i0)
                v = (j - j0) / (j1 - j0)
                bil = ((1 - u) * (1 - v) * values[i0, j0] + u * (1 - v) * values[i1, j0]
                       + (1 - u) * v * values[i0, j1] + u * v * values[i1, j1])
                err = max(err, abs(values[i, j] - bil)) if np.isfinite(bil) else np.inf
            if not np.isfinite(err) or err > tol * scale:
                im, jm = (i0 + i1) // 2, (j0 + j1) // 2
                rows = [(i0, im), (im, i1)] if i1 - i0 >= 2 else [(i0, i1)]
                cols = [(j0, jm), (jm, j1)] if j1 - j0 >= 2 else [(j0, j1)]
                nxt.extend((a0, a1, b0, b1) for a0, a1 in rows for b0, b1 in cols)
        cells = nxt
    if not done.all():
        ii, jj = np.nonzero(done)
        qi, qj = np.nonzero(~done)
        filled = griddata(np.stack([ii, jj], 1), values[ii, jj], np.stack([qi, qj], 1), method="linear")
        values[qi, qj] = filled
    return values, done
