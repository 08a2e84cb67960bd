"""Weight norms, updates and the effective learning rate, measured around
``optimizer.step()`` (step pre- and post-hooks).

For a tracked weight (ndim >= 2 by default), ``w_t`` before and ``w_{t+1}``
after the step, ``D = w_{t+1} - w_t`` (per tensor, and per row of the row
view for ``update.angle_row``):

* ``weight.norm``     = ||w_t||
* ``update.relative`` = ||D|| / ||w_t||
* ``update.angle``    = arccos(<w_t, w_{t+1}> / (||w_t|| ||w_{t+1}||)), radians,
  evaluated stably as atan2(||w_t|| ||D_perp||, ||w_t||^2 + <w_t, D>) with
  ||D_perp||^2 = ||D||^2 - <w_t, D>^2 / ||w_t||^2 (no cancellation for the
  1e-3-rad angles of rotational equilibrium), sums in float64
* ``update.angle_row`` = mean over rows (of non-zero weight) of the row angles
* ``lr.effective``    = lr / ||w_t||^2 for SGD-family optimizers (van Laarhoven
  2017), lr / ||w_t|| for Adam-family ones (their param group has ``betas``);
  the lr is the group's current lr at this step.

Sources: metrics-reference section 2; rotational equilibrium: Kosson et al.
2024 (epfml/REQ).
"""

from __future__ import annotations

from typing import Any

import torch

from ._groups import ShapeGroups, rowdot, stacked_weights
from .base import Collected, Probe

__all__ = ["UpdateProbe", "is_adam_family"]


def is_adam_family(optimizer: torch.optim.Optimizer, group: dict[str, Any] | None = None) -> bool:
    """Adam-like (update size independent of gradient scale): a group with ``betas``."""
    group = group if group is not None else optimizer.param_groups[0]
    return "betas" in group


class UpdateProbe(Probe):
    name = "updates"

    def __init__(self, all_params: bool = False) -> None:
        self.all_params = all_params
        self._before: list[torch.Tensor] | None = None
        self._before_aa: list[torch.Tensor] | None = None
        self._lrs: list[tuple[float, bool]] = []
        self._pending: Collected | None = None

    def setup(self, session: Any) -> None:
        super().setup(session)
        params = session.param_names
        self.tracked = [(n, p) for n, p in params if p.requires_grad and (p.ndim >= 2 or self.all_params)]
        self.groups = ShapeGroups([p for _, p in self.tracked]) if self.tracked else None
        self.names = [self.tracked[i][0] for i in self.groups.order] if self.groups else []
        opt = session.optimizer
        self._group_of: dict[int, dict[str, Any]] = {}
        if opt is not None:
            for g in opt.param_groups:
                for p in g["params"]:
                    self._group_of[id(p)] = g

    def before_step(self) -> None:
        """Optimizer pre-hook on recording steps: snapshot w_t (one stacked copy per shape)."""
        reducer = getattr(self.session, "reducer", None)
        if reducer is not None and reducer.sharded(self.tracked):  # FSDP2 shards: summed across ranks at the flush
            from ..distributed import sharded_snapshot

            self._sharded_before = sharded_snapshot(self)
            return
        if self.groups is None:
            return
        self._before, self._before_aa = stacked_weights(self.session, self.groups, [p for _, p in self.tracked])
        self._lrs = []
        for i in self.groups.order:
            p = self.tracked[i][1]
            g = self._group_of.get(id(p))
            if g is None:
                self._lrs.append((float("nan"), False))
                continue
            lr = g["lr"]
            lr = float(lr) if not isinstance(lr, torch.Tensor) or lr.device.type == "cpu" else float("nan")
            self._lrs.append((lr, "betas" in g))

    def after_step(self) -> None:
        """Optimizer post-hook: compare with w_{t+1} on the device."""
        if getattr(self, "_sharded_before", None) is not None:
            from ..distributed import sharded_updates

            (before, lrs), self._sharded_before = self._sharded_before, None
            self._pending = sharded_updates(self, before, lrs, self.session.reducer.rank)
            return
        if self._before is None or self.groups is None:
            return
        after = self.groups.stack([p for _, p in self.tracked])
        norm, rel, angle, angle_row = [], [], [], []
        with torch.no_grad():
            for a, aa, d in zip(self._before, self._before_aa, after):
                d.sub_(a)  # in place: the stacked copy of w_{t+1} becomes D = w_{t+1} - w_t
                ad, dd = rowdot(a, d), rowdot(d, d)
                row_angle = _angle(aa, ad, dd)
                taa, tad, tdd = aa.sum(1), ad.sum(1), dd.sum(1)
                norm.append(taa.sqrt())
                rel.append((tdd / taa).sqrt())
                angle.append(_angle(taa, tad, tdd))
                angle_row.append(torch.nanmean(row_angle, dim=1))
            values = torch.cat([torch.cat(x).float() for x in (norm, rel, angle, angle_row)])
        keys = [(m, n) for m in ("weight.norm", "update.relative", "update.angle", "update.angle_row")
                for n in self.names]
        lrs = dict(zip(self.names, self._lrs))

        def post(vals: Any) -> list[tuple[str, str, float]]:
            rows = []
            for name, (lr, adam) in lrs.items():
                w = vals[("weight.norm", name)]
                denom = w if adam else w * w
                rows.append(("lr.effective", name, lr / denom if denom else float("inf")))
            return rows

        self._pending = Collected(keys, values, post)
        self._before = self._before_aa = None

    def collect(self, step: int) -> Collected | None:
        out, self._pending = self._pending, None
        return out

    def close(self) -> None:
        self._before = None
        self._pending = None


def _angle(aa: torch.Tensor, ad: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """Angle between w and w + D from <w,w>, <w,D>, <D,D>; NaN where w = 0."""
    perp = (dd - ad * ad / aa).clamp_min(0)
    theta = torch.atan2((aa * perp).sqrt(), aa + ad)
    return torch.where(aa > 0, theta, torch.full_like(theta, float("nan")))
