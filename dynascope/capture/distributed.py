"""A generic cross-rank reducer for the probes' statistics (DDP, FSDP2).

Each rank's probes keep the sufficient statistics of ITS batch (or of ITS shard
of a parameter), each tagged with its reduction (:class:`~dynascope.probes.base.Stat`).
At a flush this module combines them across ranks, knowing nothing about any
probe, and each probe's ONE ``finish`` turns the result into values, exactly as
in one process:

* ``sum``        all_reduce(SUM): squared norms and inner products of shards,
  counts; a probe zeroes what another rank already counts (replicated values);
* ``max``/``min`` all_reduce(MAX) (minima travel negated in the same buffer);
* ``moments``    rows ``(n, mean, M2)`` merged exactly through a shared shift
  ``K`` (rank 0's means, broadcast): each rank sends ``n``,
  ``n (mean - K)`` and ``M2 + n (mean - K)^2``; the sums give
  ``mean = K + S1 / N`` and ``M2 = S2 - S1^2 / N`` without the cancellation of
  raw sums of squares (``mean - K`` is of the order of the spread);
* ``replicated`` the same on every rank: the local value, no communication;
* tensor scalars passed to ``run.step`` (the loss) are averaged over ranks.

Per flush: one all_reduce(MAX) of a 4-number layout header (length and a CRC of
the keys, so ranks that recorded different layouts fail together with a clear
error instead of hanging), one broadcast of the shifts (only when there are
moments), one all_reduce(SUM) and one all_reduce(MAX). Each carries a payload
the size of ONE rank's statistics: the bytes a rank moves per flush do not grow
with the world size (``bytes_per_flush`` counts them). Under NCCL everything
stays on the GPU until the session's one copy to the host.

All ranks must flush together: under ``torch.distributed`` the session flushes
every ``flush_every`` recording steps and at close, never on a timer.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from ..probes._groups import is_sharded, local_tensor
from ..probes.base import Collected, checked_finish

__all__ = ["RankReducer", "is_active", "world_size", "rank", "chan_merge", "local_tensor", "is_sharded",
           "LayoutMismatchError"]


def is_active() -> bool:
    """True inside an initialized process group with more than one rank."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def world_size() -> int:
    return torch.distributed.get_world_size() if is_active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_active() else 0


class LayoutMismatchError(RuntimeError):
    """Ranks buffered different statistics for the same flush."""


def chan_merge(stats: torch.Tensor) -> torch.Tensor:
    """Combine ``(R, K, 3)`` rows ``(n, mean, M2)`` of R parts into ``(K, 3)``
    (Chan, Golub and LeVeque 1979), in the dtype of ``stats``. The reference
    the shifted all-reduce of :class:`RankReducer` is tested against."""
    n = stats[..., 0]
    mean = stats[..., 1]
    m2 = stats[..., 2]
    total = n.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    gmean = (n * mean).sum(0) / safe
    gm2 = m2.sum(0) + (n * (mean - gmean) ** 2).sum(0)
    return torch.stack([total, gmean, gm2], dim=-1)


def shifted_moments(moments: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(n, n (mean - K), M2 + n (mean - K)^2)``: rows that add across parts."""
    n, mean, m2 = moments.unbind(-1)
    d = mean - shift
    return torch.stack([n, n * d, m2 + n * d * d], dim=-1)


def unshifted_moments(sums: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shifted_moments` for summed rows: ``(N, K + S1/N, S2 - S1^2/N)``."""
    n, s1, s2 = sums.unbind(-1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    d = s1 / safe
    return torch.stack([n, shift + d, (s2 - s1 * d).clamp_min(0)], dim=-1)


def _collective_device(sample: torch.device) -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and sample.type == "cuda":
        return sample
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RankReducer:
    """Reduces one flush's buffered statistics over all ranks and finishes them."""

    def __init__(self, group: object | None = None) -> None:
        if not is_active():
            raise RuntimeError("RankReducer needs an initialized torch.distributed process group with >1 rank")
        self.group = group
        self.world = torch.distributed.get_world_size(group)
        self.rank = torch.distributed.get_rank(group)
        self.collectives = 0  # counted, for tests and benchmarks
        self.bytes_per_flush = 0  # payload bytes this rank passed to collectives at the last flush

    def _reduce(self, t: torch.Tensor, op: object) -> torch.Tensor:
        torch.distributed.all_reduce(t, op=op, group=self.group)
        self.collectives += 1
        self.bytes_per_flush += t.numel() * t.element_size()
        return t

    def values(self, collected: Sequence[Collected], scalars: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Values of every ``Collected`` (``len(keys)`` each) and then the tensor
        scalars averaged over ranks, as device tensors (the session copies them
        to the host in one transfer)."""
        dist = torch.distributed
        self.bytes_per_flush = 0
        kinds: dict[str, list[torch.Tensor]] = {"sum": [], "max": [], "moments": []}
        layout: list[object] = []
        for c in collected:
            layout.append(c.keys)
            if c.stats is None:
                continue
            for name, s in c.stats.items():
                layout.append((name, s.kind, tuple(s.value.shape)))
                v = s.value.detach().double()
                if s.kind == "sum":
                    kinds["sum"].append(v.reshape(-1))
                elif s.kind == "max":
                    kinds["max"].append(v.reshape(-1))
                elif s.kind == "min":
                    kinds["max"].append(-v.reshape(-1))
                elif s.kind == "moments":
                    kinds["moments"].append(v)
        kinds["sum"] += [v.detach().double().reshape(1) for v in scalars]
        layout.append(len(scalars))
        sample = next((t.device for ts in kinds.values() for t in ts), torch.device("cpu"))
        device = _collective_device(sample)
        n_sum = sum(t.numel() for t in kinds["sum"])
        n_max = sum(t.numel() for t in kinds["max"])
        n_mom = sum(t.shape[0] for t in kinds["moments"])
        crc = float(zlib.crc32(repr(layout).encode()))
        length = float(n_sum + n_max + 3 * n_mom)
        header = torch.tensor([length, crc, -length, -crc], dtype=torch.float64, device=device)
        self._reduce(header, dist.ReduceOp.MAX)
        h = header.cpu()  # a 4-number check, once per flush
        if not (h[0] == -h[2] and h[1] == -h[3]):
            raise LayoutMismatchError(
                "dynascope: ranks recorded different statistics for the same flush "
                f"(payload length {length:.0f}, layout crc {crc:.0f} on rank {self.rank}); every rank must run the "
                "same model with the same probes and pass the same scalar names to run.step()")
        shift = sums = maxes = None
        if n_mom:
            local = torch.cat(kinds["moments"]).to(device)
            shift = local[:, 1].clone()
            torch.distributed.broadcast(shift, src=0, group=self.group)
            self.collectives += 1
            self.bytes_per_flush += shift.numel() * shift.element_size()
            kinds["sum"].append(shifted_moments(local, shift).reshape(-1))
        if kinds["sum"]:
            sums = self._reduce(torch.cat([t.to(device) for t in kinds["sum"]]), dist.ReduceOp.SUM)
        if kinds["max"]:
            maxes = self._reduce(torch.cat([t.to(device) for t in kinds["max"]]), dist.ReduceOp.MAX)
        moments = unshifted_moments(sums[n_sum:].reshape(-1, 3), shift) if shift is not None else None
        pos = {"sum": 0, "max": 0, "moments": 0}
        out: list[torch.Tensor] = []
        for c in collected:
            if c.stats is None:
                assert c.values is not None
                out.append(c.values.reshape(-1).to(device=device, dtype=torch.float64))
                continue
            reduced: dict[str, torch.Tensor] = {}
            for name, s in c.stats.items():
                shape = s.value.shape
                if s.kind == "replicated":
                    reduced[name] = s.value.detach().to(device=device, dtype=torch.float64)
                    continue
                if s.kind == "moments":
                    k, store = shape[0], moments
                    key = "moments"
                else:
                    k, key = s.value.numel(), "sum" if s.kind == "sum" else "max"
                    store = sums if key == "sum" else maxes
                assert store is not None
                block = store[pos[key]:pos[key] + k]
                pos[key] += k
                reduced[name] = -block.reshape(shape) if s.kind == "min" else block.reshape(shape)
            out.append(checked_finish(c, reduced).double())
        if scalars:
            assert sums is not None
            out.append(sums[pos["sum"]:pos["sum"] + len(scalars)] / self.world)
        return out
