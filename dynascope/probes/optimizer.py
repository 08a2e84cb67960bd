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
  the lr is the group's current lr at this step. Not recorded for Muon (no
  published formula for its orthogonalised, shape-scaled update).

With several optimizers, each weight is measured around ITS optimizer's step.
Sufficient statistics per weight (summed across ranks; a replicated weight
counts on rank 0 only): <w,w>, <w,D>, <D,D> and the sum and count of its row
angles; ONE ``finish`` gives the four metrics.

Sources: metrics-reference section 2; rotational equilibrium: Kosson et al.
2024 (epfml/REQ).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..core.coverage import CoverageRow
from ._groups import CHUNK_ELEMENTS, ParamLayout, ShapeGroups, rowdot, stacked_weights
from ._steps import COPY_MAX_ELEMENTS, optimizer_steps, reads_state
from .base import Collected, Probe, ProbeContext, Stat, StepOutcome

__all__ = ["UpdateProbe", "LearningRates", "group_names", "is_adam_family", "lr_rule"]


def is_adam_family(optimizer: torch.optim.Optimizer | None, group: dict[str, Any] | None = None) -> bool:
    """Adam-like (update size independent of gradient scale): a group with ``betas``."""
    if group is None:
        if optimizer is None:
            return False
        group = optimizer.param_groups[0]
    return "betas" in group


def lr_rule(optimizer: torch.optim.Optimizer | None, group: dict[str, Any] | None) -> str | None:
    """Which effective-learning-rate formula applies to a parameter of this group:
    ``"adam"`` (lr / ||w||), ``"sgd"`` (lr / ||w||^2) or None where no published
    formula does (Muon's orthogonalised update: its size is set by the shape, not
    by ||w||; no parameter group)."""
    if group is None:
        return None
    if type(optimizer).__name__ == "Muon" or "ns_coefficients" in group or "ns_steps" in group:
        return None
    return "adam" if "betas" in group else "sgd"


def _lr_value(group: dict[str, Any]) -> float:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):  # a CUDA tensor lr would need a sync to read: not recorded
        return float(lr) if lr.device.type == "cpu" else float("nan")
    return float(lr)


class UpdateProbe(Probe):
    name = "updates"
    #: see :data:`dynascope.probes._steps.COPY_MAX_ELEMENTS`
    COPY_MAX_ELEMENTS = COPY_MAX_ELEMENTS

    def __init__(self, all_params: bool = False) -> None:
        self.all_params = all_params
        self._before: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[float, str | None]]]] = {}
        self._parts: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def setup(self, ctx: ProbeContext) -> None:
        super().setup(ctx)
        self.tracked = [(n, p) for n, p in ctx.param_names if p.requires_grad and (p.ndim >= 2 or self.all_params)]
        self.layout = ParamLayout([p for _, p in self.tracked], ctx.rank)
        self._plans: dict[int, dict[str, Any]] = {}
        self._finish_cache: dict[tuple[int, ...], Any] = {}
        self._lrs = {}
        self._no_state: set[int] = set()  # optimizers whose state did not give their step: copied instead

    def _plan(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The tracked weights ``optimizer`` owns, their shape groups (group order)
        and contribution mask (cached per optimizer)."""
        key = id(optimizer)
        if key in self._plans:
            return self._plans[key]
        idx = self.ctx.owned_by(optimizer, self.tracked)  # weights no optimizer owns: with the first (D = 0)
        plan = None
        if idx:
            lay = self.layout
            groups = ShapeGroups(lay.local([self.tracked[i][1] for i in idx]))
            ordered = list(idx)  # parameter order, the same on every rank (local shapes and groups may differ)
            device = lay.local([self.tracked[idx[0]][1]])[0].device
            perm = groups.to_input_order(device)
            mask = [lay.contributes[i] for i in ordered]
            row_ok = [lay.contributes[i] and lay.whole[i] for i in ordered]
            plan = {"idx": tuple(idx), "ordered": tuple(ordered), "groups": groups, "perm": perm,
                    "mask": None if all(mask) and all(row_ok) else torch.tensor(
                        [[float(m)] * 3 + [float(r)] * 2 for m, r in zip(mask, row_ok)], dtype=torch.float64,
                        device=device)}
        self._plans[key] = plan
        return plan

    def _from_state(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this optimizer's step is read from its state after the step (no copy of w_t): SGD, Adam,
        AdamW with more than COPY_MAX_ELEMENTS weights (below, the copy is cheaper and small)."""
        if id(optimizer) in self._no_state or self.layout.any_sharded:
            return False
        return reads_state(self.ctx, optimizer, self.COPY_MAX_ELEMENTS)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Snapshot w_t of the weights ``optimizer`` owns (one stacked copy per shape), unless its step is read
        from its state afterwards (SGD, Adam, AdamW: :mod:`dynascope.probes._steps`)."""
        plan = None if optimizer is None else self._plan(optimizer)
        if plan is None:
            return
        lrs = []
        for i in plan["ordered"]:
            p = self.tracked[i][1]
            g = self.ctx.group_of(p)
            lrs.append((_lr_value(g) if g is not None else float("nan"), lr_rule(self.ctx.optimizer_of(p), g)))
        if self._from_state(optimizer):
            self._before[id(optimizer)] = (None, None, lrs)
            return
        ps = [self.tracked[i][1] for i in plan["idx"]]
        ws, wws = stacked_weights(self.ctx.cache, tuple(id(p) for p in ps), plan["groups"], self.layout.local(ps))
        self._before[id(optimizer)] = (ws, wws, lrs)

    def _state_sums(self, optimizer: torch.optim.Optimizer, plan: dict[str, Any]) -> torch.Tensor:
        """Per weight, in shape-group order: <w_t,w_t>, <w_t,D>, <D,D>, the sum and count of row angles, with
        D from the optimizer's state and w_t = w_{t+1} - D, a chunk of at most CHUNK_ELEMENTS elements at a
        time: several weights of a shape group stacked, or rows of one weight larger than that (no copy of
        the model; the temporaries are a few chunks)."""
        groups: ShapeGroups = plan["groups"]
        ps = [self.tracked[i][1] for i in plan["idx"]]
        parts = []
        for members, (r, c) in zip(groups.groups, groups.row_shapes):
            if r * c > CHUNK_ELEMENTS and r > 1:  # a large weight: row blocks of it, the row products joined
                rows = max(1, CHUNK_ELEMENTS // max(c, 1))
                for j in members:
                    dots = []
                    for a in range(0, r, rows):
                        b = min(r, a + rows)
                        ((d, w),) = optimizer_steps(self.ctx, optimizer, [ps[j]], span=(a * c, b * c))
                        d, w = _float(d.view(1, b - a, c)), _float(w.view(1, b - a, c))
                        dots.append(torch.stack([rowdot(w, w), rowdot(w, d), rowdot(d, d)]))
                        del d, w
                    aa, ad, dd = torch.cat(dots, dim=2).unbind(0)
                    parts.append(_row_sums(aa, ad, dd))
                continue
            per = max(1, CHUNK_ELEMENTS // max(r * c, 1))
            for k in range(0, len(members), per):
                chunk = [ps[j] for j in members[k:k + per]]
                pairs = optimizer_steps(self.ctx, optimizer, chunk)
                d = _float(torch.stack([x.reshape(r, c) for x, _ in pairs]))
                a = _float(torch.stack([w.reshape(r, c) for _, w in pairs]))  # w_t
                del pairs
                aa, ad, dd = rowdot(a, a), rowdot(a, d), rowdot(d, d)
                parts.append(_row_sums(aa, ad, dd))
        return torch.cat(parts)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Compare with w_{t+1} on the device: sums of <w,w>, <w,D>, <D,D> and of the row angles."""
        got = self._before.pop(id(optimizer), None)
        plan = self._plan(optimizer)
        if got is None or plan is None:
            return
        before, before_aa, lrs = got
        with torch.no_grad():
            if before is None:  # the step from the optimizer's state
                try:
                    sums = self._state_sums(optimizer, plan)
                except Exception as exc:  # noqa: BLE001 - probing never stops training: copy from the next step
                    self._no_state.add(id(optimizer))
                    warnings.warn(f"dynascope: the update probe could not read {type(optimizer).__name__}'s step "
                                  f"from its state ({type(exc).__name__}: {exc}); it copies the weights from the "
                                  "next recording step on", RuntimeWarning, stacklevel=4)
                    return
            else:
                ps = [self.tracked[i][1] for i in plan["idx"]]
                after = plan["groups"].stack(self.layout.local(ps))
                parts = []
                for a, aa, d in zip(before, before_aa, after):
                    d.sub_(a)  # in place: the stacked copy of w_{t+1} becomes D = w_{t+1} - w_t
                    parts.append(_row_sums(aa, rowdot(a, d), rowdot(d, d)))
                sums = torch.cat(parts)
            if plan["perm"] is not None:
                sums = sums[plan["perm"]]
            if plan["mask"] is not None:
                sums = sums * plan["mask"].to(sums.device)
        self._parts = [p for p in self._parts if p[0] != plan["ordered"]]
        self._parts.append((plan["ordered"], sums))
        self._lrs.update(zip(plan["ordered"], lrs))

    def arm(self) -> None:
        self._parts = []
        self._lrs: dict[int, tuple[float, str | None]] = {}

    def collect(self, step: int) -> Collected | None:
        parts, self._parts = self._parts, []
        self._before.clear()
        if not parts:
            return None
        order = tuple(i for p in parts for i in p[0])
        sums = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        keys, finish = self._finisher(order)
        lrs = {self.tracked[i][0]: self._lrs[i] for i in order}

        def post(vals: Mapping[tuple[str, str], float]) -> list[tuple[str, str, float]]:
            rows = []
            for name, (lr, rule) in lrs.items():
                if rule is None:
                    continue
                w = vals[("weight.norm", name)]
                denom = w if rule == "adam" else w * w
                rows.append(("lr.effective", name, lr / denom if denom else float("inf")))
            return rows

        return Collected(keys, stats={"sums": Stat("sum", sums)}, finish=finish, post=post)

    def _finisher(self, order: tuple[int, ...]) -> Any:
        hit = self._finish_cache.get(order)
        if hit is not None:
            return hit
        one_d = [self.layout.one_d[i] for i in order]
        consts: dict[torch.device, torch.Tensor] = {}

        def finish(r: Mapping[str, torch.Tensor]) -> torch.Tensor:
            sums = r["sums"]
            flag = consts.get(sums.device)
            if flag is None:
                flag = consts[sums.device] = torch.tensor(one_d, dtype=torch.bool, device=sums.device)
            aa, ad, dd, row_sum, row_n = sums.unbind(1)
            angle = _angle(aa, ad, dd)
            # the mean over rows of non-zero weight; a 1-D weight is one row: its angle
            angle_row = torch.where(flag, angle, row_sum / row_n)
            return torch.cat([aa.sqrt(), (dd / aa).sqrt(), angle, angle_row]).float()

        names = [self.tracked[i][0] for i in order]
        keys = [(m, n) for m in ("weight.norm", "update.relative", "update.angle", "update.angle_row")
                for n in names]
        out = (keys, finish)
        if len(self._finish_cache) > 8:
            self._finish_cache.clear()
        self._finish_cache[order] = out
        return out

    def coverage(self) -> list[CoverageRow]:
        if not self.ctx.optimizers:
            return [CoverageRow("metric", "update.*", False, "no optimizer given: no weight/update metrics",
                                self.name)]
        tracked = {id(p) for _, p in self.tracked}
        rows = []
        for name, p in self.ctx.param_names:
            if not p.requires_grad:
                continue
            if id(p) not in tracked:
                rows.append(CoverageRow("metric", f"update.*@{name}", False,
                                        "1-D parameter: not tracked by the weight/update metrics "
                                        "(all_params=True tracks it)", self.name))
                continue
            opt = self.ctx.optimizer_of(p)
            if opt is None:
                rows.append(CoverageRow("metric", f"update.*@{name}", True,
                                        "no optimizer owns it: its update is 0 (measured at the first "
                                        "optimizer's step)", self.name))
            elif lr_rule(opt, self.ctx.group_of(p)) is None:
                rows.append(CoverageRow("metric", f"lr.effective@{name}", False,
                                        f"no published effective-learning-rate formula for {type(opt).__name__}",
                                        self.name))
        return rows

    def close(self) -> None:
        self._before.clear()
        self._parts = []
        self._finish_cache.clear()


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _row_sums(aa: torch.Tensor, ad: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """(G, R) row inner products -> (G, 5): sums of <w,w>, <w,D>, <D,D>, of the row angles and their count."""
    row_angle = _angle(aa, ad, dd)
    ok = ~torch.isnan(row_angle)  # rows of zero weight have no angle (a padding embedding row)
    return torch.stack([aa.sum(1), ad.sum(1), dd.sum(1),
                        torch.where(ok, row_angle, torch.zeros_like(row_angle)).sum(1), ok.sum(1).to(aa.dtype)], dim=1)


def _angle(aa: torch.Tensor, ad: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """Angle between w and w + D from <w,w>, <w,D>, <D,D>; NaN where w = 0."""
    perp = (dd - ad * ad / aa).clamp_min(0)
    theta = torch.atan2((aa * perp).sqrt(), aa + ad)
    return torch.where(aa > 0, theta, torch.full_like(theta, float("nan")))


def group_names(ctx: ProbeContext) -> list[list[str]]:
    """A name for each param group of each optimizer: its own ``"name"`` entry when it has one (a string),
    else the module that holds all of its parameters when that module holds no other group's (one group per
    block: the block's name), else ``group<k>`` (``opt<i>.group<k>`` with several optimizers)."""
    name_of = {id(p): n for n, p in ctx.param_names}
    several = len(ctx.optimizers) > 1
    common: list[list[str]] = []
    for o in ctx.optimizers:
        row = []
        for g in o.param_groups:
            mods = [name_of[id(p)].rsplit(".", 1)[0] if "." in name_of.get(id(p), "") else ""
                    for p in g["params"] if id(p) in name_of]
            parts = [m.split(".") for m in mods]
            prefix = []
            for level in zip(*parts) if parts else ():
                if len(set(level)) != 1:
                    break
                prefix.append(level[0])
            row.append(".".join(prefix))
        common.append(row)
    flat = [c for row in common for c in row if c]
    out = [[c if c and flat.count(c) == 1 else (f"opt{i}.group{k}" if several else f"group{k}")
            for k, c in enumerate(row)] for i, row in enumerate(common)]
    given = [g.get("name") for o in ctx.optimizers for g in o.param_groups]
    if all(isinstance(n, str) and n for n in given) and len(set(given)) == len(given):
        it = iter(given)
        out = [[next(it) for _ in row] for row in out]
    return out


class LearningRates(Probe):
    """The learning rate of every param group at every step: ``optim.lr``, layer = the group's name
    (:func:`group_names`: the module that holds the group, or ``group<k>``), read from the param groups in
    the optimizer's step post-hook: the lr this step's update used (a scheduler stepped after
    ``optimizer.step()`` sets the next step's; a loop that sets the lr after clipping is seen too). Host
    floats; a tensor lr on an accelerator is not read (it would synchronise): NaN. What forensics and the
    ``learning_rate_jumps`` finding compare a change of the update size with."""

    name = "lr"
    every_step = True

    def setup(self, ctx: ProbeContext) -> None:
        super().setup(ctx)
        self.names = group_names(ctx)
        self._rows: dict[tuple[int, int], float] = {}

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        i = next((k for k, o in enumerate(self.ctx.optimizers) if o is optimizer), None)
        if i is None:
            return
        for k, group in enumerate(optimizer.param_groups):
            self._rows[(i, k)] = _lr_value(group)

    def collect(self, step: int) -> Collected | None:
        return None

    def end_step(self, step: int, loss: Any) -> StepOutcome | None:
        if not self._rows:
            return None
        rows = []
        for (i, k), lr in self._rows.items():
            names = self.names[i]
            name = names[k] if k < len(names) else f"group{k}"  # a param group added during training
            rows.append((step, "optim.lr", name, lr))
        self._rows.clear()
        return StepOutcome(rows=rows)
