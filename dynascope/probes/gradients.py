"""Gradient norms and the scale-invariance test.

Per parameter ``grad.norm`` = ||g||_2; per module ``grad.norm`` = sqrt of the
sum of its parameters' squared norms (all parameters below it);
``grad.global_norm`` over every parameter with a gradient.

For each tracked weight (ndim >= 2 by default) in its row view (one row per
output unit), with eps = 1e-8 as in AdamP's ``_cosine_similarity``:

* ``grad.weight_cos``          = <g, w> / (||g|| ||w||), whole tensor (signed)
* ``grad.weight_cos_rowmax``   = max over rows of |cos(g_row, w_row)|
* ``grad.weight_cos_threshold`` = delta / sqrt(row_dim), delta = 0.1
* ``scale_invariant``          = 1.0 when the channel view passes
  (rowmax < delta / sqrt(row_dim)) or else the layer view passes
  (|cos| < delta / sqrt(numel)); the test of AdamP (Heo et al. 2021,
  clovaai/AdamP ``_projection``), on the raw gradient.

Gradients are read in the optimizer's step pre-hook (so a loop that zeroes
gradients after ``optimizer.step()`` still records them), or at
``run.step()`` when no optimizer is given.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._names import select_modules
from ._groups import ShapeGroups, rowdot, stacked_weights
from .base import Collected, Probe

__all__ = ["GradientProbe", "ADAMP_DELTA", "COS_EPS"]

ADAMP_DELTA = 0.1
COS_EPS = 1e-8


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    if hasattr(torch, "_foreach_norm"):
        try:
            return torch.stack(torch._foreach_norm(tensors)).float()
        except RuntimeError:  # mixed devices/dtypes on old versions
            pass
    return torch.stack([torch.linalg.vector_norm(t).float() for t in tensors])


class GradientProbe(Probe):
    name = "gradients"

    def __init__(self, all_params: bool = False) -> None:
        self.all_params = all_params
        self._pending: Collected | None = None
        self._layout_cache: dict[tuple[int, ...], Any] = {}

    def setup(self, session: Any) -> None:
        super().setup(session)
        self.params = session.param_names  # list[(name, param)]
        index = {id(p): i for i, (_, p) in enumerate(self.params)}
        self.module_params: list[tuple[str, list[int]]] = []
        for name, module in select_modules(session.model, session.module_filter):
            ids = sorted({index[id(p)] for p in module.parameters() if id(p) in index})
            if ids:
                self.module_params.append((name, ids))
        self.tracked = [i for i, (_, p) in enumerate(self.params) if p.ndim >= 2 or self.all_params]

    # called by the session: from the optimizer pre-hook, or at step() without optimizer
    def capture(self) -> None:
        reducer = getattr(self.session, "reducer", None)
        if reducer is not None and reducer.sharded(self.params):  # FSDP2 shards: summed across ranks at the flush
            from ..distributed import sharded_gradients

            self._pending = sharded_gradients(self, reducer.rank)
            return
        present = tuple(i for i, (_, p) in enumerate(self.params) if p.grad is not None)
        if not present:
            self._pending = None
            return
        layout = self._layout(present)
        grads = [self.params[i][1].grad.detach() for i in present]  # type: ignore[union-attr]
        with torch.no_grad():
            norms = _norms(grads)
            device = norms.device
            sq = norms.double() ** 2
            keys = [("grad.norm", self.params[i][0]) for i in present]
            parts = [norms]
            mod_names, mod_idx, par_idx = layout["modules"]
            if mod_names:
                msq = torch.zeros(len(mod_names), dtype=torch.float64, device=device)
                msq.index_add_(0, mod_idx, sq[par_idx])
                parts.append(msq.sqrt().float())
                keys += [("grad.norm", n) for n in mod_names]
            parts.append(sq.sum().sqrt().float()[None])
            keys.append(("grad.global_norm", ""))
            tracked = layout["tracked"]
            if tracked:
                groups: ShapeGroups = layout["groups"]
                gs = groups.stack([self.params[i][1].grad for i in tracked])  # type: ignore[misc]
                ws, wws = stacked_weights(self.session, groups, [self.params[i][1] for i in tracked])
                cos, rowmax, inv = [], [], []
                for g, w, ww, (r, c) in zip(gs, ws, wws, groups.row_shapes):
                    gw, gg = rowdot(g, w), rowdot(g, g)
                    row_cos = gw / (gg.sqrt().clamp_min(COS_EPS) * ww.sqrt().clamp_min(COS_EPS))
                    rmax = row_cos.abs().amax(dim=1)
                    tcos = gw.sum(1) / (gg.sum(1).sqrt().clamp_min(COS_EPS) * ww.sum(1).sqrt().clamp_min(COS_EPS))
                    cos.append(tcos)
                    rowmax.append(rmax)
                    inv.append((rmax < ADAMP_DELTA / math.sqrt(c)) | (tcos.abs() < ADAMP_DELTA / math.sqrt(r * c)))
                names = layout["tracked_names"]
                parts += [torch.cat(cos).float(), torch.cat(rowmax).float(), torch.cat(inv).float()]
                for metric in ("grad.weight_cos", "grad.weight_cos_rowmax", "scale_invariant"):
                    keys += [(metric, n) for n in names]
            values = torch.cat([p.reshape(-1).to(device) for p in parts])

        thresholds = layout["thresholds"]

        def post(_: Any) -> list[tuple[str, str, float]]:
            return [("grad.weight_cos_threshold", n, t) for n, t in thresholds]

        self._pending = Collected(keys, values, post if thresholds else None)

    def _layout(self, present: tuple[int, ...]) -> dict[str, Any]:
        layout = self._layout_cache.get(present)
        if layout is not None:
            return layout
        pos = {i: k for k, i in enumerate(present)}
        mod_names, mod_idx, par_idx = [], [], []
        for name, ids in self.module_params:
            hit = [pos[i] for i in ids if i in pos]
            if hit:
                mod_idx += [len(mod_names)] * len(hit)
                par_idx += hit
                mod_names.append(name)
        tracked = [i for i in self.tracked if i in pos]
        groups = ShapeGroups([self.params[i][1] for i in tracked]) if tracked else None
        device = self.params[present[0]][1].device
        layout: dict[str, Any] = {
            "modules": (mod_names, torch.tensor(mod_idx, dtype=torch.long, device=device),
                        torch.tensor(par_idx, dtype=torch.long, device=device)),
            "tracked": tracked,
            "groups": groups,
            "tracked_names": [],
            "thresholds": [],
        }
        if groups is not None:
            for g, (_, c) in zip(groups.groups, groups.row_shapes):
                for k in g:
                    name = self.params[tracked[k]][0]
                    layout["tracked_names"].append(name)
                    layout["thresholds"].append((name, ADAMP_DELTA / math.sqrt(c)))
        if len(self._layout_cache) > 8:
            self._layout_cache.clear()
        self._layout_cache[present] = layout
        return layout

    def collect(self, step: int) -> Collected | None:
        if self.session.optimizer is None:
            self.capture()
        out, self._pending = self._pending, None
        return out

    def close(self) -> None:
        self._pending = None
        self._layout_cache.clear()
