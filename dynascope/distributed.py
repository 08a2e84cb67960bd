"""Statistics of the global model under ``torch.distributed`` (DDP, FSDP2).

Each rank's probes keep the sufficient statistics of ITS batch (or of ITS shard
of a parameter); at a flush the session combines them across ranks in one
payload collective, so the values written by rank 0 are those of the global
batch and the whole model:

* ``sums``    add across ranks: squared norms and inner products of sharded
  tensors (sum_r ||g_r||^2 = ||g||^2), zero counts, element counts;
* ``maxes``   max across ranks: absolute maxima;
* ``moments`` rows ``(n, mean, M2)`` per channel, combined with Chan et al.'s
  parallel update (1979), exactly, without raw sums of squares:
  ``n = sum n_r``, ``mean = sum n_r mean_r / n``,
  ``M2 = sum M2_r + sum n_r (mean_r - mean)^2``;
* values that are the same on every rank (DDP averages gradients before the
  optimizer step and keeps parameters replicated) are taken from the local
  rank and NOT summed, so replicated gradients are not counted twice;
* tensor scalars passed to ``run.step`` (the loss) are averaged over ranks:
  the mean loss of the global batch when ranks hold equal batches.

One flush = one all_gather of a fixed 2-number layout header (length and a
CRC of the keys, so ranks that recorded different layers fail with a clear
error instead of hanging or mixing numbers) and one all_gather of one stacked
float64 payload; then one copy to the host. Nothing is communicated per step
or per layer. Under NCCL the payload stays on the GPU; other backends (gloo)
get it on the CPU.

All ranks must flush together: under ``torch.distributed`` the session flushes
every ``flush_every`` recording steps and at close, never on a timer.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Reducible", "RankReducer", "is_active", "world_size", "rank", "chan_merge", "local_tensor",
           "LayoutMismatchError"]


def is_active() -> bool:
    """True inside an initialized process group with more than one rank."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def world_size() -> int:
    return torch.distributed.get_world_size() if is_active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_active() else 0


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor with a Shard placement (FSDP2 / fully_shard parameters)."""
    placements = getattr(t, "placements", None)
    return bool(placements) and any(type(p).__name__ in ("Shard", "_StridedShard") for p in placements)


class LayoutMismatchError(RuntimeError):
    """Ranks buffered different statistics for the same flush."""


@dataclass
class Reducible:
    """Sufficient statistics of one recording step that combine across ranks.

    ``finish(sums, maxes, moments)`` receives the combined statistics as
    float64 CPU tensors (None where absent) and returns the metric values, one
    per key of the owning :class:`~dynascope.probes.base.Collected`.
    """

    finish: Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
    sums: torch.Tensor | None = None
    maxes: torch.Tensor | None = None
    moments: torch.Tensor | None = None  # (K, 3): n, mean, M2

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for kind in ("sums", "maxes", "moments"):
            t = getattr(self, kind)
            if t is not None:
                out.append((kind, t.reshape(-1)))
        return out


def chan_merge(stats: torch.Tensor) -> torch.Tensor:
    """Combine ``(R, K, 3)`` rows ``(n, mean, M2)`` of R ranks into ``(K, 3)``
    (Chan, Golub and LeVeque 1979), in the dtype of ``stats``."""
    n = stats[..., 0]
    mean = stats[..., 1]
    m2 = stats[..., 2]
    total = n.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    gmean = (n * mean).sum(0) / safe
    gm2 = m2.sum(0) + (n * (mean - gmean) ** 2).sum(0)
    return torch.stack([total, gmean, gm2], dim=-1)


def _collective_device(sample: torch.device) -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and sample.type == "cuda":
        return sample
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RankReducer:
    """Gathers one flush's buffered statistics from all ranks and combines them."""

    def __init__(self, group: object | None = None) -> None:
        if not is_active():
            raise RuntimeError("RankReducer needs an initialized torch.distributed process group with >1 rank")
        self.group = group
        self.world = torch.distributed.get_world_size(group)
        self.rank = torch.distributed.get_rank(group)
        self.collectives = 0  # counted, for tests and benchmarks
        self._sharded: dict[tuple[int, ...], bool] = {}

    def sharded(self, named: Sequence[tuple[str, torch.Tensor]]) -> bool:
        """Whether any of these ``(name, parameter)`` pairs is sharded across ranks (cached)."""
        key = tuple(id(p) for _, p in named)
        hit = self._sharded.get(key)
        if hit is None:
            hit = self._sharded[key] = any(is_sharded(p) for _, p in named)
        return hit

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t, group=self.group)
        self.collectives += 1
        return torch.stack(out)

    def to_host(self, collected: Sequence[object], scalars: Sequence[torch.Tensor]) -> np.ndarray:
        """Values of every ``Collected`` (``len(keys)`` each, in order) then of every
        tensor scalar, combined over ranks, as one float64 host array."""
        segments: list[tuple[str, int]] = []
        parts: list[torch.Tensor] = []
        layout: list[object] = []
        for c in collected:
            red: Reducible | None = getattr(c, "reduce", None)
            layout.append(c.keys)  # type: ignore[attr-defined]
            if red is None:
                v = c.values.reshape(-1)  # type: ignore[attr-defined]
                segments.append(("local", v.numel()))
                parts.append(v)
            else:
                for kind, t in red.parts():
                    segments.append((kind, t.numel()))
                    parts.append(t)
        for v in scalars:
            segments.append(("mean", 1))
            parts.append(v.reshape(1))
        layout.append(segments)
        sample = next((p.device for p in parts), torch.device("cpu"))
        device = _collective_device(sample)
        crc = zlib.crc32(repr(layout).encode())
        length = sum(n for _, n in segments)
        header = torch.tensor([float(length), float(crc)], dtype=torch.float64, device=device)
        headers = self._all_gather(header).cpu()
        if not bool((headers == headers[0]).all()):
            raise LayoutMismatchError(
                "dynascope: ranks recorded different statistics for the same flush "
                f"(payload length, layout crc per rank: {headers.tolist()}); every rank must run the same "
                "model with the same probes and pass the same scalar names to run.step()")
        if length == 0:
            return np.zeros(0)
        flat = torch.cat([p.detach().to(device=device, dtype=torch.float64) for p in parts])
        gathered = self._all_gather(flat).cpu()  # (world, length): the one transfer to the host
        out: list[torch.Tensor] = []
        pos = 0
        seg_i = 0
        for c in collected:
            red = getattr(c, "reduce", None)
            if red is None:
                kind, n = segments[seg_i]
                seg_i += 1
                out.append(gathered[self.rank, pos:pos + n])
                pos += n
                continue
            got: dict[str, torch.Tensor] = {}
            for kind, t in red.parts():
                n = t.numel()
                block = gathered[:, pos:pos + n]
                pos += n
                seg_i += 1
                if kind == "sums":
                    got[kind] = block.sum(0)
                elif kind == "maxes":
                    got[kind] = block.amax(0)
                else:
                    got[kind] = chan_merge(block.reshape(self.world, -1, 3))
            values = red.finish(got.get("sums"), got.get("maxes"), got.get("moments")).reshape(-1)
            n_keys = len(c.keys)  # type: ignore[attr-defined]
            if values.numel() != n_keys:
                raise RuntimeError(f"a probe's finish() returned {values.numel()} values for {n_keys} keys")
            out.append(values.double())
        if scalars:  # contiguous at the end
            out.append(gathered[:, pos:pos + len(scalars)].mean(0))
        return torch.cat(out).numpy() if out else np.zeros(0)


_SEGMENT_CACHE: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _segments(sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id of every channel and channels per module (host tensors, cached per layout)."""
    hit = _SEGMENT_CACHE.get(sizes)
    if hit is None:
        if len(_SEGMENT_CACHE) > 16:
            _SEGMENT_CACHE.clear()
        hit = _SEGMENT_CACHE[sizes] = (torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
                                       torch.tensor(sizes, dtype=torch.float64))
    return hit


def activation_reducible(names: Sequence[str], states: Sequence[object]) -> tuple[list[tuple[str, str]], Reducible]:
    """Keys and cross-rank statistics of one step's activation states
    (``ActivationProbe._State``: n, per-channel mean and M2, absmax, zero
    fraction, element count). ``finish`` applies the formulas of
    :mod:`dynascope.probes.activations` to the merged per-channel moments."""
    from .probes.activations import ACT_METRICS

    with torch.no_grad():
        device = states[0].mean.device  # type: ignore[attr-defined]
        moments = torch.cat([
            torch.stack([torch.full_like(s.mean.reshape(-1), float(s.n), dtype=torch.float64),  # type: ignore[attr-defined]
                         s.mean.reshape(-1).double(), s.m2.reshape(-1).double()], dim=1).to(device)  # type: ignore[attr-defined]
            for s in states])
        maxes = torch.stack([s.absmax.reshape(()).double().to(device) for s in states])  # type: ignore[attr-defined]
        sums = torch.stack([
            torch.stack([s.zeros.reshape(()).double().to(device) * s.numel,  # type: ignore[attr-defined]
                         torch.tensor(float(s.numel), dtype=torch.float64, device=device)])  # type: ignore[attr-defined]
            for s in states]).reshape(-1)
    sizes = [s.mean.numel() for s in states]  # type: ignore[attr-defined]

    def finish(sums: torch.Tensor | None, maxes: torch.Tensor | None, moments: torch.Tensor | None) -> torch.Tensor:
        assert sums is not None and maxes is not None and moments is not None
        mu = moments[:, 1]
        var_c = (moments[:, 2] / moments[:, 0]).clamp_min(0)  # shifted sums can round a hair below 0
        seg, counts = _segments(tuple(sizes))
        per = torch.zeros(len(sizes), 3, dtype=torch.float64).index_add_(0, seg, torch.stack([mu, mu * mu, var_c], 1))
        mean, sq_mean, ch_var = (per / counts[:, None]).unbind(1)
        zeros, numel = sums.reshape(-1, 2).unbind(1)
        zero_frac = torch.where(torch.isnan(maxes), torch.full_like(maxes, float("nan")), zeros / numel)  # as collect
        return torch.stack([mean, ch_var + sq_mean - mean * mean, sq_mean, ch_var, maxes, zero_frac], 1).reshape(-1)

    keys = [(m, n) for n in names for m in ACT_METRICS]
    return keys, Reducible(finish, sums=sums, maxes=maxes, moments=moments)


# -- sharded parameters (FSDP2 / fully_shard): sums of squares, inner products, maxima ------
def _rows_whole(p: torch.Tensor) -> bool:
    """True when this rank's piece of ``p`` holds whole rows of the row view
    (replicated, or a >= 2-D tensor sharded on dim 0 as fully_shard does)."""
    placements = getattr(p, "placements", None)
    if not placements:
        return True
    shards = [q for q in placements if type(q).__name__ in ("Shard", "_StridedShard")]
    if not shards:
        return True
    return p.ndim >= 2 and all(getattr(q, "dim", None) == 0 for q in shards)


def _contributes(p: torch.Tensor, rank_: int) -> bool:
    """A sharded tensor counts on every rank; a replicated one only on rank 0 (no double counting)."""
    return is_sharded(p) or rank_ == 0


def _dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, dtype=torch.float64)


def sharded_gradients(probe: object, rank_: int) -> object | None:
    """:class:`~dynascope.probes.gradients.GradientProbe` statistics of this rank's
    gradient shards, to be summed (squared norms, <g, w>, ||g||^2, ||w||^2) and
    maxed (row-wise |cos|) across ranks; ``finish`` applies the probe's formulas."""
    from .probes._groups import row_view_shape
    from .probes.base import Collected
    from .probes.gradients import ADAMP_DELTA, COS_EPS

    params: list[tuple[str, torch.Tensor]] = probe.params  # type: ignore[attr-defined]
    present = [i for i, (_, p) in enumerate(params) if p.grad is not None]
    if not present:
        return None
    present_set = set(present)
    tracked = [i for i in probe.tracked if i in present_set]  # type: ignore[attr-defined]
    device = local_tensor(params[present[0]][1]).device
    with torch.no_grad():
        sq = []
        for i in present:
            p = params[i][1]
            g = local_tensor(p.grad).detach()  # type: ignore[arg-type]
            v = _dot_rows(g.reshape(-1), g.reshape(-1)) if g.numel() else torch.zeros((), dtype=torch.float64,
                                                                                          device=device)
            sq.append(v if _contributes(p, rank_) else torch.zeros_like(v))
        dots, rowmax = [], []
        for i in tracked:
            p = params[i][1]
            r, c = row_view_shape(p.shape)
            g, w = local_tensor(p.grad).detach(), local_tensor(p).detach()  # type: ignore[arg-type]
            whole = _rows_whole(p) and p.ndim >= 2
            g2, w2 = (g.reshape(-1, c), w.reshape(-1, c)) if whole else (g.reshape(1, -1), w.reshape(1, -1))
            gw, gg, ww = _dot_rows(g2, w2), _dot_rows(g2, g2), _dot_rows(w2, w2)
            tot = torch.stack([gw.sum(), gg.sum(), ww.sum()])
            dots.append(tot if _contributes(p, rank_) else torch.zeros_like(tot))
            if whole:  # this rank's whole rows (possibly none)
                row_cos = (gw / (gg.sqrt().clamp_min(COS_EPS) * ww.sqrt().clamp_min(COS_EPS))).abs()
                rowmax.append(torch.cat([row_cos, row_cos.new_zeros(1)]).amax())  # |cos| >= 0: 0 is neutral
            else:  # 1-D (one row: its |cos| comes from the summed dots) or rows split across ranks
                rowmax.append(torch.full((), 0.0 if p.ndim < 2 else float("nan"), dtype=torch.float64,
                                         device=device))
        sums = torch.cat([torch.stack(sq), torch.cat(dots) if dots else torch.zeros(0, dtype=torch.float64,
                                                                                     device=device)])
        maxes = torch.stack(rowmax) if rowmax else None

    names = [params[i][0] for i in present]
    pos = {i: k for k, i in enumerate(present)}
    modules = [(n, [pos[i] for i in ids if i in pos]) for n, ids in probe.module_params]  # type: ignore[attr-defined]
    modules = [(n, ks) for n, ks in modules if ks]
    tracked_names = [params[i][0] for i in tracked]
    shapes = [row_view_shape(params[i][1].shape) for i in tracked]
    one_d = [params[i][1].ndim < 2 for i in tracked]
    n_present = len(present)

    def finish(sums: torch.Tensor | None, maxes: torch.Tensor | None, moments: torch.Tensor | None) -> torch.Tensor:
        assert sums is not None
        sqn = sums[:n_present]
        out = [sqn.sqrt()]
        out += [torch.stack([sqn[ks].sum().sqrt() for _, ks in modules])] if modules else []
        out.append(sqn.sum().sqrt()[None])
        if tracked_names:
            gw, gg, ww = sums[n_present:].reshape(-1, 3).unbind(1)
            cos = gw / (gg.sqrt().clamp_min(COS_EPS) * ww.sqrt().clamp_min(COS_EPS))
            assert maxes is not None
            rmax = torch.where(torch.tensor(one_d), cos.abs(), maxes)
            rows = torch.tensor([float(r) for r, _ in shapes], dtype=torch.float64)
            cols = torch.tensor([float(c) for _, c in shapes], dtype=torch.float64)
            inv = (rmax < ADAMP_DELTA / cols.sqrt()) | (cos.abs() < ADAMP_DELTA / (rows * cols).sqrt())
            out += [cos, rmax, inv.double()]
        return torch.cat(out)

    keys = [("grad.norm", n) for n in names] + [("grad.norm", n) for n, _ in modules] + [("grad.global_norm", "")]
    for metric in ("grad.weight_cos", "grad.weight_cos_rowmax", "scale_invariant"):
        keys += [(metric, n) for n in tracked_names]
    thresholds = [(n, ADAMP_DELTA / float(c) ** 0.5) for n, (_, c) in zip(tracked_names, shapes)]

    def post(_: object) -> list[tuple[str, str, float]]:
        return [("grad.weight_cos_threshold", n, t) for n, t in thresholds]

    return Collected(keys, torch.empty(0), post if thresholds else None,
                     reduce=Reducible(finish, sums=sums, maxes=maxes))


def sharded_snapshot(probe: object) -> tuple[list[torch.Tensor], dict[str, tuple[float, bool]]]:
    """``w_t`` of this rank's shards of the update probe's tracked weights (a copy),
    and per weight its group's current lr and whether the group is Adam-like."""
    before = [local_tensor(p).detach().clone() for _, p in probe.tracked]  # type: ignore[attr-defined]
    lrs: dict[str, tuple[float, bool]] = {}
    for name, p in probe.tracked:  # type: ignore[attr-defined]
        g = probe._group_of.get(id(p))  # type: ignore[attr-defined]
        lr = float("nan") if g is None else g["lr"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr) if lr.device.type == "cpu" else float("nan")
        lrs[name] = (float(lr), g is not None and "betas" in g)
    return before, lrs


def sharded_updates(probe: object, before: list[torch.Tensor], lrs: dict[str, tuple[float, bool]],
                    rank_: int) -> object:
    """:class:`~dynascope.probes.optimizer.UpdateProbe` statistics of this rank's
    shards: <w,w>, <w,D>, <D,D> summed across ranks; row angles (whole rows
    only) summed with their count, so ``update.angle_row`` is the mean over all
    rows of the global weight."""
    from .probes._groups import row_view_shape
    from .probes.base import Collected
    from .probes.optimizer import _angle

    tracked: list[tuple[str, torch.Tensor]] = probe.tracked  # type: ignore[attr-defined]
    with torch.no_grad():
        parts = []
        for (_, p), a in zip(tracked, before):
            _, c = row_view_shape(p.shape)
            b = local_tensor(p).detach()
            whole = _rows_whole(p) and p.ndim >= 2
            a2 = a.reshape(-1, c) if whole else a.reshape(1, -1)
            d2 = (b.reshape(-1, c) if whole else b.reshape(1, -1)) - a2
            aa, ad, dd = _dot_rows(a2, a2), _dot_rows(a2, d2), _dot_rows(d2, d2)
            if whole:
                ang = _angle(aa, ad, dd)
                ok = ~torch.isnan(ang)
                row = torch.stack([torch.where(ok, ang, torch.zeros_like(ang)).sum(), ok.sum().double()])
            else:  # 1-D: one row, the tensor angle; rows split across ranks: not available
                row = torch.full((2,), 0.0 if p.ndim < 2 else float("nan"), dtype=torch.float64, device=aa.device)
            v = torch.cat([torch.stack([aa.sum(), ad.sum(), dd.sum()]), row])
            parts.append(v if _contributes(p, rank_) else torch.zeros_like(v))
        sums = torch.stack(parts).reshape(-1)
    names = [n for n, _ in tracked]
    one_d = torch.tensor([p.ndim < 2 for _, p in tracked])

    def finish(sums: torch.Tensor | None, maxes: torch.Tensor | None, moments: torch.Tensor | None) -> torch.Tensor:
        assert sums is not None
        aa, ad, dd, row_sum, row_n = sums.reshape(-1, 5).unbind(1)
        angle = _angle(aa, ad, dd)
        angle_row = torch.where(one_d, angle, row_sum / row_n)
        return torch.cat([aa.sqrt(), (dd / aa).sqrt(), angle, angle_row])

    keys = [(m, n) for m in ("weight.norm", "update.relative", "update.angle", "update.angle_row") for n in names]

    def post(vals: object) -> list[tuple[str, str, float]]:
        rows = []
        for name, (lr, adam) in lrs.items():
            w = vals[("weight.norm", name)]  # type: ignore[index]
            denom = w if adam else w * w
            rows.append(("lr.effective", name, lr / denom if denom else float("inf")))
        return rows

    return Collected(keys, torch.empty(0), post, reduce=Reducible(finish, sums=sums))
