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

Gradients are read in each optimizer's step pre-hook, for the parameters that
optimizer owns (so a loop that zeroes gradients after ``optimizer.step()``
still records them, and with several optimizers each parameter is read at ITS
optimizer's step; parameters no optimizer owns are read with the first), or at
``run.step()`` when no optimizer is given.

Sufficient statistics (summed across ranks; a replicated parameter counts on
rank 0 only): ||g||^2 per parameter, <g, w>, ||g||^2, ||w||^2 per tracked
weight; the row maximum of |cos| per tracked weight (max across ranks; rows of
an FSDP2 shard on dim 0 are whole). ONE ``finish`` turns them into the values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..core.coverage import CoverageRow
from ..core.names import select_modules
from ._groups import CHUNK_ELEMENTS, ParamLayout, ShapeGroups, row_view_shape, rowdot
from .base import Collected, Probe, ProbeContext, Stat

__all__ = ["GradientProbe", "ADAMP_DELTA", "COS_EPS"]

ADAMP_DELTA = 0.1
COS_EPS = 1e-8


def _dots(g: torch.Tensor, w: torch.Tensor, r: int, c: int, a: int, b: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row products <g,w>, <g,g>, <w,w> of rows a:b of the (r, c) row views, each (1, b - a)."""
    g = g.detach().reshape(r, c)[a:b][None]
    w = w.detach().reshape(r, c)[a:b][None]
    if g.dtype not in (torch.float32, torch.float64):
        g, w = g.float(), w.float()
    return rowdot(g, w), rowdot(g, g), rowdot(w, w)


class GradientProbe(Probe):
    name = "gradients"

    def __init__(self, all_params: bool = False) -> None:
        self.all_params = all_params
        self._parts: list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor | None,
                                torch.Tensor | None]] = []
        self._plans: dict[tuple[int, ...], dict[str, Any]] = {}
        self._finish_cache: dict[tuple[tuple[int, ...], tuple[int, ...]], Any] = {}

    def setup(self, ctx: ProbeContext) -> None:
        super().setup(ctx)
        self.params = ctx.param_names  # list[(name, param)]
        index = {id(p): i for i, (_, p) in enumerate(self.params)}
        self.module_params: list[tuple[str, list[int]]] = []
        for name, module in select_modules(ctx.model, ctx.module_filter):
            ids = sorted({index[id(p)] for p in module.parameters() if id(p) in index})
            if ids:
                self.module_params.append((name, ids))
        self.is_tracked = [p.ndim >= 2 or self.all_params for _, p in self.params]
        self.layout = ParamLayout([p for _, p in self.params], ctx.rank)
        self._seen: set[tuple[int, ...]] = set()

    def arm(self) -> None:
        self._parts.clear()

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Read the gradients of the parameters ``optimizer`` owns (a later call for
        the same optimizer in the same step replaces the earlier reading)."""
        owned = self.ctx.owned_by(optimizer, self.params)
        present, norms = self.ctx.grad_norms(optimizer)  # computed once per step, shared with the sentinel
        self._parts = [p for p in self._parts if not set(p[0]) & set(owned)]
        if norms is None:
            return
        plan = self._plan(present)
        with torch.no_grad():
            sq = norms.double() ** 2
            if plan["sq_mask"] is not None:
                sq = sq * plan["sq_mask"].to(sq.device)
            tracked: tuple[int, ...] = plan["tracked"]
            dots = rowmax = None
            if tracked:
                dots, rowmax = self._weight_stats(plan)
        self._parts.append((present, tracked, sq, dots, rowmax))
        self._seen.add(present)

    def _plan(self, present: tuple[int, ...]) -> dict[str, Any]:
        """Per set of present parameters (cached): the tracked ones, their shape
        groups, the permutation from group order back to parameter order, and the
        contribution masks (device tensors)."""
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        lay = self.layout
        device = lay.local([self.params[present[0]][1]])[0].device
        tracked = [i for i in present if self.is_tracked[i]]
        groups = ShapeGroups(lay.local([self.params[i][1] for i in tracked])) if tracked else None
        # tracked stays in parameter order, the same on every rank; results come out in shape-group order,
        # put back in parameter order (local shapes, and so the groups, can differ between ranks: uneven FSDP2
        # shards)
        perm = groups.to_input_order(device) if groups is not None else None
        contributes = [lay.contributes[i] for i in tracked]
        keep_row = [lay.contributes[i] and lay.whole[i] for i in tracked]
        plan = {
            "tracked": tuple(tracked),
            "groups": groups,
            "perm": perm,
            "sq_mask": None if all(lay.contributes[i] for i in present) else torch.tensor(
                [float(lay.contributes[i]) for i in present], dtype=torch.float64, device=device),
            "dot_mask": None if all(contributes) else torch.tensor(
                [float(c) for c in contributes], dtype=torch.float64, device=device)[:, None],
            "row_mask": None if all(keep_row) else torch.tensor(
                [float(c) for c in keep_row], dtype=torch.float64, device=device),
        }
        if len(self._plans) > 8:
            self._plans.clear()
        self._plans[present] = plan
        return plan

    def _weight_stats(self, plan: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(<g,w>, ||g||^2, ||w||^2) per tracked weight and the row max of |cos(g, w)|."""
        lay = self.layout
        groups: ShapeGroups = plan["groups"]
        ps = [self.params[i][1] for i in plan["tracked"]]
        local_w = lay.local(ps)
        local_g = lay.local([p.grad for p in ps])  # type: ignore[misc]
        dots, rmaxes = [], []
        # each shape group stacked a chunk of at most CHUNK_ELEMENTS elements at a time: no copy of the model
        for members, (r, c) in zip(groups.groups, groups.row_shapes):
            per = max(1, CHUNK_ELEMENTS // max(r * c, 1))
            for k in range(0, len(members), per):
                part = members[k:k + per]
                if r * c > CHUNK_ELEMENTS and r > 1:  # one large weight: views of blocks of its rows, no copy
                    gw, gg, ww = torch.cat([torch.stack(_dots(local_g[part[0]], local_w[part[0]], r, c, a,
                                                              min(r, a + max(1, CHUNK_ELEMENTS // c))))
                                            for a in range(0, r, max(1, CHUNK_ELEMENTS // c))], dim=2).unbind(0)
                else:
                    g = torch.stack([local_g[j].detach().reshape(r, c) for j in part])
                    w = torch.stack([local_w[j].detach().reshape(r, c) for j in part])
                    if g.dtype not in (torch.float32, torch.float64):
                        g, w = g.float(), w.float()
                    gw, gg, ww = rowdot(g, w), rowdot(g, g), rowdot(w, w)
                    del g, w
                dots.append(torch.stack([gw.sum(1), gg.sum(1), ww.sum(1)], dim=1))
                if gw.shape[1]:
                    row_cos = gw / (gg.sqrt().clamp_min(COS_EPS) * ww.sqrt().clamp_min(COS_EPS))
                    rmaxes.append(row_cos.abs().amax(dim=1))
                else:  # an empty shard: |cos| >= 0, so 0 is neutral for the max over ranks
                    rmaxes.append(gw.new_zeros(gw.shape[0]))
        dots_t = torch.cat(dots)
        rmax = torch.cat(rmaxes)
        if plan["perm"] is not None:
            dots_t, rmax = dots_t[plan["perm"]], rmax[plan["perm"]]
        if plan["dot_mask"] is not None:
            dots_t = dots_t * plan["dot_mask"].to(dots_t.device)
        if plan["row_mask"] is not None:
            rmax = rmax * plan["row_mask"].to(rmax.device)
        return dots_t, rmax

    def collect(self, step: int) -> Collected | None:
        parts, self._parts = self._parts, []
        if not parts:
            return None
        present = tuple(i for p in parts for i in p[0])
        tracked = tuple(i for p in parts for i in p[1])
        sq = torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
        stats = {"sq": Stat("sum", sq)}
        if tracked:
            dots = [p[3] for p in parts if p[3] is not None]
            rmax = [p[4] for p in parts if p[4] is not None]
            stats["dots"] = Stat("sum", torch.cat(dots) if len(dots) > 1 else dots[0])
            stats["rowmax"] = Stat("max", torch.cat(rmax) if len(rmax) > 1 else rmax[0])
        keys, finish, post = self._finisher(present, tracked)
        return Collected(keys, stats=stats, finish=finish, post=post)

    def _finisher(self, present: tuple[int, ...], tracked: tuple[int, ...]) -> Any:
        """Keys, ``finish`` and ``post`` for one layout of present/tracked parameters (cached)."""
        hit = self._finish_cache.get((present, tracked))
        if hit is not None:
            return hit
        pos = {i: k for k, i in enumerate(present)}
        mod_names, mod_idx, par_idx = [], [], []
        for name, ids in self.module_params:
            got = [pos[i] for i in ids if i in pos]
            if got:
                mod_idx += [len(mod_names)] * len(got)
                par_idx += got
                mod_names.append(name)
        shapes = [row_view_shape(self.params[i][1].shape) for i in tracked]
        one_d = [self.layout.one_d[i] for i in tracked]
        split = [not self.layout.whole[i] and not self.layout.one_d[i] for i in tracked]
        consts: dict[torch.device, tuple[torch.Tensor, ...]] = {}

        def tables(device: torch.device) -> tuple[torch.Tensor, ...]:
            t = consts.get(device)
            if t is None:
                t = consts[device] = (
                    torch.tensor(mod_idx, dtype=torch.long, device=device),
                    torch.tensor(par_idx, dtype=torch.long, device=device),
                    torch.tensor(one_d, dtype=torch.bool, device=device),
                    torch.tensor(split, dtype=torch.bool, device=device),
                    torch.tensor([float(c) for _, c in shapes], dtype=torch.float64, device=device),
                    torch.tensor([float(r * c) for r, c in shapes], dtype=torch.float64, device=device))
            return t

        def finish(r: Mapping[str, torch.Tensor]) -> torch.Tensor:
            sq = r["sq"]
            m_idx, p_idx, one_d_t, split_t, cols, numel = tables(sq.device)
            out = [sq.sqrt()]
            if mod_names:
                msq = torch.zeros(len(mod_names), dtype=sq.dtype, device=sq.device).index_add_(0, m_idx, sq[p_idx])
                out.append(msq.sqrt())
            out.append(sq.sum().sqrt()[None])
            if tracked:
                gw, gg, ww = r["dots"].unbind(1)
                cos = gw / (gg.sqrt().clamp_min(COS_EPS) * ww.sqrt().clamp_min(COS_EPS))
                rmax = torch.where(one_d_t, cos.abs(), r["rowmax"])
                rmax = torch.where(split_t, torch.full_like(rmax, float("nan")), rmax)
                inv = (rmax < ADAMP_DELTA / cols.sqrt()) | (cos.abs() < ADAMP_DELTA / numel.sqrt())
                out += [cos, rmax, inv.to(cos.dtype)]
            return torch.cat([o.float() for o in out])

        names = [self.params[i][0] for i in present]
        tracked_names = [self.params[i][0] for i in tracked]
        keys = [("grad.norm", n) for n in names] + [("grad.norm", n) for n in mod_names] + [("grad.global_norm", "")]
        for metric in ("grad.weight_cos", "grad.weight_cos_rowmax", "scale_invariant"):
            keys += [(metric, n) for n in tracked_names]
        thresholds = [(n, ADAMP_DELTA / math.sqrt(c)) for n, (_, c) in zip(tracked_names, shapes)]

        def post(_: Any) -> list[tuple[str, str, float]]:
            return [("grad.weight_cos_threshold", n, t) for n, t in thresholds]

        out = (keys, finish, post if thresholds else None)
        if len(self._finish_cache) > 8:
            self._finish_cache.clear()
        self._finish_cache[(present, tracked)] = out
        return out

    def coverage(self) -> list[CoverageRow]:
        seen = {i for t in self._seen for i in t}
        rows = []
        for i, (name, p) in enumerate(self.params):
            if not p.requires_grad:
                rows.append(CoverageRow("parameter", name, False, "frozen (requires_grad=False): no gradient",
                                        self.name))
            elif self._seen and i not in seen:
                rows.append(CoverageRow("parameter", name, False,
                                        "no gradient at any recording step (unused in the forward pass?)", self.name))
            else:
                rows.append(CoverageRow("parameter", name, True, "", self.name))
        return rows

    def close(self) -> None:
        self._parts = []
        self._plans.clear()
        self._finish_cache.clear()
