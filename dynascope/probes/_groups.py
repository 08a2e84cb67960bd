"""Batch per-parameter work: parameters of equal shape are stacked into one
tensor so that per-row and per-tensor reductions cost a few kernels per shape,
not a few per parameter (deep models repeat a handful of shapes).

Each tracked parameter is seen in its *row view* ``w.view(w.size(0), -1)``
(one row per output unit, the channel view of AdamP); a 1-D parameter is one
row (the layer view)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: elements of temporaries per chunk when per-parameter work is stacked or computed a few tensors at a time
#: (gradient cosines, steps from the optimizer's state): the transient memory stays small next to the model.
#: 256K, not 1M: peak RSS of the ~50M transformer with AdamW (bench_memory.py, median of 3) at the defaults
#: 1.070x -> 0.996x, sentinel alone 1.046x -> 0.998x, every=1 1.086x -> 1.056x (glibc keeps freed 4 MB blocks
#: in the heap, 1 MB ones it returns); time not worse (eager, sentinel alone 1.254x -> 1.247x, every=1
#: 2.123x -> 2.020x)
CHUNK_ELEMENTS = 1 << 18

__all__ = ["CHUNK_ELEMENTS", "shape_chunks", "index_tensor", "ShapeGroups", "rowdot", "stacked_weights", "ParamLayout",
           "rows_whole", "is_sharded", "local_tensor", "row_view_shape"]


def shape_chunks(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (shape, dtype, device), each group cut into chunks of at most
    CHUNK_ELEMENTS elements (at least one tensor): what is stacked and computed at once."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(k)
    out: list[list[int]] = []
    for ks in groups.values():
        per = max(1, CHUNK_ELEMENTS // max(tensors[ks[0]].numel(), 1))
        out += [ks[i:i + per] for i in range(0, len(ks), per)]
    return out


_INDEX: dict[tuple[Any, ...], torch.Tensor] = {}


def index_tensor(order: Sequence[int], device: torch.device, inverse: bool = False) -> torch.Tensor:
    """``order`` (or its inverse permutation) as a long tensor on ``device``, built once and kept (indexing
    with a Python list copies it to the device from pageable memory at every call: a host synchronisation on
    CUDA). The same tensor object comes back for the same arguments while it is kept."""
    key = (device, inverse, tuple(order))
    hit = _INDEX.get(key)
    if hit is None:
        idx = list(order)
        if inverse:
            for pos, k in enumerate(order):
                idx[k] = pos
        if len(_INDEX) > 64:
            _INDEX.clear()
        hit = _INDEX[key] = torch.tensor(idx, dtype=torch.long, device=device)
    return hit


def row_view_shape(shape: torch.Size) -> tuple[int, int]:
    if len(shape) >= 2:
        rows = int(shape[0])
        return rows, int(torch.Size(shape).numel() // max(rows, 1))
    return 1, int(torch.Size(shape).numel())


class ShapeGroups:
    """Groups of parameter indices with the same (shape, dtype, device).

    ``order`` is the concatenation of the groups, so per-group results
    concatenated follow ``[names[i] for i in order]``.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
        self.groups = list(buckets.values())
        self.order = [i for g in self.groups for i in g]
        self.row_shapes = [row_view_shape(params[g[0]].shape) for g in self.groups]

    def to_input_order(self, device: torch.device) -> torch.Tensor | None:
        """Index that puts per-parameter results concatenated in group order back in the order
        the parameters were given (None when it already is): ``cat(results)[perm]``."""
        if self.order == sorted(self.order):
            return None
        inv = [0] * len(self.order)
        for k, i in enumerate(self.order):
            inv[i] = k
        return torch.tensor(inv, dtype=torch.long, device=device)

    def stack(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One float tensor of shape (G, rows, row_dim) per group (a copy)."""
        out = []
        for g, (r, c) in zip(self.groups, self.row_shapes):
            t = torch.stack([tensors[i].detach().reshape(r, c) for i in g])
            out.append(t if t.dtype in (torch.float32, torch.float64) else t.float())
        return out


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products of (G, R, C) tensors -> (G, R) in float64.

    Each row is reduced by ``torch.linalg.vecdot`` (cascade summation in the
    input precision: measured 1e-8 relative to ||a|| ||b|| for 65536-long
    float32 rows, like float64 accumulation) and the rows are then summed in
    float64 by the callers. A float64 ``sum(dtype=...)`` of the product was 5-7x
    slower on CPU and needs a full-size temporary."""
    return torch.linalg.vecdot(a, b, dim=-1).double()


def stacked_weights(cache: dict[Any, Any], key: Any, groups: ShapeGroups,
                    params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stacked copies of ``params`` and their row squared norms ``<w, w>``, shared
    between the probes of one optimizer step (the gradient probe's weight-cosine
    and the update probe's ``w_t`` read the same weights): memoised in the
    context's per-step ``cache``, which the session clears around every
    optimizer step. ``key`` names the parameter set (ids of the parameters, not
    of the local views, which are new objects on every call)."""
    key = ("weights", key)
    hit = cache.get(key)
    if hit is not None:
        return hit
    ws = groups.stack(params)
    out = (ws, [rowdot(w, w) for w in ws])
    cache[key] = out
    return out


def rows_whole(p: torch.Tensor) -> bool:
    """True when this rank's piece of ``p`` holds whole rows of the row view
    (a plain or replicated tensor, or a >= 2-D tensor sharded on dim 0 as
    FSDP2's fully_shard does)."""
    placements = getattr(p, "placements", None)
    if not placements:
        return True
    shards = [q for q in placements if type(q).__name__ in ("Shard", "_StridedShard")]
    if not shards:
        return True
    return p.ndim >= 2 and all(getattr(q, "dim", None) == 0 for q in shards)


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor with a Shard placement (FSDP2 / fully_shard parameters)."""
    placements = getattr(t, "placements", None)
    return bool(placements) and any(type(p).__name__ in ("Shard", "_StridedShard") for p in placements)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class ParamLayout:
    """What a probe needs to know about each of its parameters under sharding:
    whether this rank counts it (a sharded tensor on every rank, a replicated one
    on rank 0 only, so nothing is counted twice), whether its local piece holds
    whole rows, and how to get the local piece."""

    def __init__(self, params: Sequence[torch.Tensor], rank: int) -> None:
        self.sharded = [is_sharded(p) for p in params]
        self.any_sharded = any(self.sharded)
        self.contributes = [s or rank == 0 for s in self.sharded]
        self.whole = [rows_whole(p) for p in params]
        self.one_d = [p.ndim < 2 for p in params]

    def local(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [local_tensor(t) for t in tensors] if self.any_sharded else list(tensors)
