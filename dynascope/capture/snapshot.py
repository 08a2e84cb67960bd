"""Replay state: the model, optimizer and RNG state of a recent step, kept in host memory and written
into the run when the sentinel raises an event.

With ``dynascope.probe(..., snapshot_every=K)`` the session copies, at the start of every K-th step
(and of the first), the model's ``state_dict``, each optimizer's ``state_dict`` and the random number
generators' states (torch CPU and CUDA, NumPy's global generator, Python's ``random``) to host memory,
keeping the last two (an event is read one or more steps late, so the newest copy may postdate it).
Cost: host memory for two copies of the parameters, buffers and optimizer state (Adam: about 3x the
parameters each), and one device-to-host copy of them every K steps. On an event the newest copy
taken at or before the event's step is written as ``artifacts/snapshot-<step>.pt`` (indexed as artifact ``snapshot``),
once per snapshot.

The files hold only tensors, numbers, strings, lists and dicts: :func:`load_snapshot` reads them with
``torch.load(weights_only=True)``. :meth:`Snapshot.restore` puts the state back into a model and its
optimizers; the training loop then replays steps ``snapshot.step, snapshot.step + 1, ...`` (with the
same batches: the data pipeline's position is the loop's own state) under a new probe with
``every=1``.

Under torch.distributed every rank takes its part at the same steps and writes it on an event (every rank
sees it at the same step): DDP (:class:`ReplicatedSnapshotter`) rank 0 writes one file with its replicated
state and every rank's generator states; FSDP2 (:class:`ShardedSnapshotter`) each rank writes a file of its
local shards and generators, rank 0 a manifest naming them (or, where the ranks share no file system, rank 0
writes every rank's part gathered into one file). :meth:`Snapshot.restore` on rank r puts back rank r's
part (FSDP2: reading rank r's file only).
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import describe
from ..store.schema import ARTIFACTS
from ..store.writer import write_atomic

__all__ = ["Snapshot", "Snapshotter", "ShardedSnapshotter", "ReplicatedSnapshotter", "load_snapshot", "snapshots",
           "rng_state", "set_rng_state"]

ARTIFACT = "snapshot"
FORMAT = 1


def _to_host(obj: Any, pinned: bool) -> Any:
    """A host copy of ``obj`` (tensors copied, containers rebuilt, other values kept)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        return out.copy_(t, non_blocking=pinned)
    if isinstance(obj, dict):
        return {k: _to_host(v, pinned) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v, pinned) for v in obj)
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def rng_state() -> dict[str, Any]:
    """The global random generators' states as tensors and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """Model, optimizer and RNG state at the start of training step ``step``."""
    step: int
    model: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    rng: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    #: FSDP2: every rank's ``{"model", "optimizers", "rng"}`` of its local shards, in rank order (the fields
    #: above are then empty); :meth:`restore` on rank r puts back rank r's
    shards: list[dict[str, Any]] | None = None
    #: DDP: every rank's random generators' states, in rank order (the model and optimizer state are rank 0's,
    #: replicated); :meth:`restore` on rank r puts back rank r's
    rngs: list[dict[str, Any]] | None = None
    #: FSDP2 written as one file per rank: the files' names in rank order (next to this manifest, in
    #: ``directory``); :meth:`restore` on rank r reads rank r's file only
    shard_files: list[str] | None = None
    directory: Path | None = None

    @property
    def nbytes(self) -> int:
        """Host memory the snapshot holds."""
        return _nbytes(self.model) + _nbytes(self.optimizers) + _nbytes(self.rng) + _nbytes(self.shards or [])

    def payload(self) -> dict[str, Any]:
        out = {"format": FORMAT, "step": self.step, "model": self.model, "optimizers": self.optimizers,
               "rng": self.rng, "meta": self.meta}
        if self.shards is not None:
            out["shards"] = self.shards
        if self.rngs is not None:
            out["rngs"] = self.rngs
        if self.shard_files is not None:
            out["shard_files"] = self.shard_files
        return out

    def restore(self, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                *, rng: bool = True) -> int:
        """Load the state into ``model`` and ``optimizer`` (one or a sequence, in the order the session
        had them) and, with ``rng``, the random generators. Returns ``step``: the training step to
        replay first."""
        opts = [] if optimizer is None else [optimizer] if isinstance(optimizer, torch.optim.Optimizer) \
            else list(optimizer)
        if self.shards is not None or self.shard_files is not None:
            return self._restore_shards(model, opts, rng)
        if opts and len(opts) != len(self.optimizers):
            raise ValueError(f"the snapshot holds {len(self.optimizers)} optimizer state(s), "
                             f"got {len(opts)} optimizer(s)")
        model.load_state_dict(self.model)
        for opt, state in zip(opts, self.optimizers):
            opt.load_state_dict(state)
        if rng:
            set_rng_state(self._rank_rng())
        return self.step

    def _rank_rng(self) -> dict[str, Any]:
        """DDP: this rank's generators' states when the snapshot holds every rank's (same world size), else
        ``rng``."""
        dist = torch.distributed
        if self.rngs is not None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() == len(self.rngs):
            return self.rngs[dist.get_rank()]
        return self.rng

    def _restore_shards(self, model: torch.nn.Module, opts: list[torch.optim.Optimizer], rng: bool) -> int:
        """FSDP2: this rank's local shards put back into the model's and the optimizers' DTensors (the same
        world size and sharding as when it was taken)."""
        dist = torch.distributed
        ranks = len(self.shards if self.shards is not None else self.shard_files or [])
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world != ranks:
            raise ValueError(f"the snapshot holds the shards of {ranks} ranks; restore it under the same "
                             f"world size (this one has {world})")
        mine = self.shards[dist.get_rank()] if self.shards is not None else self._shard_file(dist.get_rank())
        if opts and len(opts) != len(mine["optimizers"]):
            raise ValueError(f"the snapshot holds {len(mine['optimizers'])} optimizer state(s), got {len(opts)} "
                             "optimizer(s)")
        current = model.state_dict()
        model.load_state_dict({k: _as_like(v, current.get(k)) for k, v in mine["model"].items()})
        for opt, state in zip(opts, mine["optimizers"]):
            params = [p for g in opt.param_groups for p in g["params"]]
            st = {int(i): {k: _as_like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                           for k, v in entry.items()} for i, entry in state["state"].items()}
            opt.load_state_dict({"state": st, "param_groups": state["param_groups"]})
        if rng:
            set_rng_state(mine["rng"])
        return self.step

    def _shard_file(self, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s part, read from its own file (``torch.load(weights_only=True)``)."""
        assert self.shard_files is not None
        file = (self.directory or Path(".")) / self.shard_files[rank]
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # missing (another machine's disk?) or damaged: one line naming it
            raise ValueError(f"{file}: rank {rank}'s snapshot shard is not readable ({describe(exc)}); each rank "
                             "reads its own file next to the snapshot's manifest") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("step") != self.step \
                or obj.get("rank") != rank:
            raise ValueError(f"{file}: not rank {rank}'s shard of the snapshot of step {self.step}")
        return obj


def _local_host(obj: Any) -> Any:
    """A host copy of ``obj`` with every DTensor replaced by a copy of this rank's local shard."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _local_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local_host(v) for v in obj)
    return obj


def _as_like(local: torch.Tensor, like: Any) -> torch.Tensor:
    """``local`` as a shard of a DTensor placed like ``like`` (a DTensor of the same global shape), else as it
    is."""
    if like is None or not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


class Snapshotter:
    """Keeps the snapshots of the last two snapshot steps in host memory (an event is seen one or more
    steps late: the newer one may postdate it) and writes the newest one that precedes an event."""

    def __init__(self, every: int) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"snapshot_every must be a positive integer, got {every!r}")
        self.every = every
        self.kept: deque[tuple[Snapshot, Any]] = deque(maxlen=2)  # (snapshot, CUDA event: its copies landed)
        self._written: set[int] = set()

    @property
    def last(self) -> Snapshot | None:
        return self.kept[-1][0] if self.kept else None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or not self.kept

    def take(self, step: int, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        on_cuda = any(p.is_cuda for p in model.parameters())
        with torch.no_grad():
            snap = Snapshot(step, _to_host(model.state_dict(), on_cuda),
                            [_to_host(o.state_dict(), on_cuda) for o in optimizers], rng_state())
        ready = None
        if on_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self.kept.append((snap, ready))

    def write(self, store: Any, reason: str, event_step: int) -> Path | None:
        """Write the newest snapshot taken at or before ``event_step`` into the run (once per snapshot);
        None when there is none, it was written already or the store dropped it."""
        hit = next(((s, r) for s, r in reversed(self.kept) if s.step <= event_step), None)
        if hit is None or hit[0].step in self._written or store is None:
            return None
        snap, ready = hit
        if ready is not None:
            ready.synchronize()
        self._written.add(snap.step)
        return _store(store, snap, {"event": reason, "event_step": int(event_step), "nbytes": snap.nbytes})


class ShardedSnapshotter(Snapshotter):
    """FSDP2: every rank keeps the host copies of its local shards (model, optimizer state; DTensors as their
    local tensors) and its random generators' states, the last two snapshot steps. On an event (every rank sees
    it at the same step: the sentinel's row is shared) each rank writes its own part as
    ``artifacts/snapshot-<step>.rank<r>.pt`` into the run directory (``directory``, set by the session on every
    rank: a file system the ranks share), then, once every rank has written (one checkpoint), rank 0 writes the
    manifest (the indexed ``snapshot`` artifact naming the files). No rank holds another's shards, writing or
    restoring. Where a rank cannot write there (the run directory is on rank 0's machine only) the shards are
    gathered on rank 0 instead (one ``gather_object``), which writes them into one file. A failure on one rank
    to take a snapshot is brought to a checkpoint: every rank turns snapshots off together."""

    directory: str | None = None

    def take(self, step: int, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        from ..diagnostics._dist import attempt

        def local() -> Snapshot:
            with torch.no_grad():
                return Snapshot(step, {}, [], {}, shards=[{
                    "model": _local_host(model.state_dict()),
                    "optimizers": [_local_host(o.state_dict()) for o in optimizers], "rng": rng_state()}])

        self.kept.append((attempt(local), None))

    def write(self, store: Any, reason: str, event_step: int) -> Path | None:
        from ..diagnostics._dist import RanksFailed, attempt, sum_number

        dist = torch.distributed
        hit = next((s for s, _ in reversed(self.kept) if s.step <= event_step), None)
        if hit is None or hit.step in self._written:  # the same on every rank
            return None
        self._written.add(hit.step)
        assert hit.shards is not None
        mine = hit.shards[0]
        rank, world = dist.get_rank(), dist.get_world_size()
        names = [f"{ARTIFACT}-{hit.step}.rank{r}.pt" for r in range(world)]
        own = Path(self.directory or ".") / ARTIFACTS / names[rank]
        part = {"format": FORMAT, "step": hit.step, "rank": rank, "world": world, **mine}
        try:  # (the folder must exist: a rank never creates the run directory on its own machine)
            attempt(lambda: write_atomic(own, lambda f: torch.save(part, f)))
        except RanksFailed:  # a rank could not write into the run directory: gathered on rank 0 instead
            own.unlink(missing_ok=True)
            return self._gather(store, reason, event_step, hit.step, mine)
        nbytes = int(sum_number(_nbytes(mine)))
        if store is None:
            return None
        return _store(store, Snapshot(hit.step, {}, [], {}, shard_files=names),
                      {"event": reason, "event_step": int(event_step), "nbytes": nbytes, "world": world,
                       "layout": "files"})

    def _gather(self, store: Any, reason: str, event_step: int, step: int, mine: dict[str, Any]) -> Path | None:
        """Every rank's part gathered on rank 0 and written there into one file."""
        dist = torch.distributed
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)  # every rank holds its shards: none fails before it
        if gathered is None or store is None:
            return None
        snap = Snapshot(step, {}, [], {}, shards=gathered)
        return _store(store, snap, {"event": reason, "event_step": int(event_step), "nbytes": snap.nbytes,
                                    "world": len(gathered), "layout": "gathered"})


class ReplicatedSnapshotter(Snapshotter):
    """DDP: rank 0 keeps the replicated model and optimizer state, every rank its random generators' states
    (a rank's dropout masks and augmentations are its own). On an event (seen at the same step on every rank)
    the ranks' generator states are gathered on rank 0, which writes them with the state. A failure to take a
    snapshot on one rank is brought to a checkpoint: every rank turns snapshots off together."""

    def take(self, step: int, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        from ..diagnostics._dist import attempt

        def local() -> None:
            if torch.distributed.get_rank() == 0:
                super(ReplicatedSnapshotter, self).take(step, model, optimizers)
            else:
                self.kept.append((Snapshot(step, {}, [], rng_state()), None))

        attempt(local)

    def write(self, store: Any, reason: str, event_step: int) -> Path | None:
        dist = torch.distributed
        hit = next((s for s, _ in reversed(self.kept) if s.step <= event_step), None)
        if hit is None or hit.step in self._written:  # the same on every rank
            return None
        rngs: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(hit.rng, rngs, dst=0)
        if rngs is None:
            self._written.add(hit.step)
            return None
        hit.rngs = rngs
        return super().write(store, reason, event_step)


def _store(store: Any, snap: Snapshot, meta: dict[str, Any]) -> Path | None:
    """``snap`` with ``meta`` written into the run as the ``snapshot`` artifact of its step (a torch file read
    back with ``weights_only=True``); None when the store dropped it."""
    snap.meta = meta
    payload = snap.payload()
    return store.write_file(ARTIFACT, snap.step, lambda f: torch.save(payload, f), ".pt", dict(meta))


def snapshots(run: str | os.PathLike[str] | Any) -> Any:
    """The snapshots a run wrote: a DataFrame with columns step, event, event_step, nbytes, file."""
    import pandas as pd

    from ..store import ARTIFACTS, RunData

    data = run if isinstance(run, RunData) else RunData(run)
    df = data.artifacts(ARTIFACT)
    return pd.DataFrame({"step": df["step"].astype(int),
                         "event": [m.get("event", "") for m in df["meta"]],
                         "event_step": [int(m.get("event_step", -1)) for m in df["meta"]],
                         "nbytes": [int(m.get("nbytes", 0)) for m in df["meta"]],
                         "file": [str(data.path / ARTIFACTS / f) for f in df["file"]]})


def load_snapshot(run: str | os.PathLike[str] | Any, step: int | None = None, *,
                  map_location: str | torch.device | None = "cpu") -> Snapshot:
    """The snapshot a run wrote at ``step`` (default: the last one), read with
    ``torch.load(weights_only=True)``. ``run``: a run directory, a ``RunData`` or a snapshot file."""
    path = Path(run) if isinstance(run, (str, os.PathLike)) else None
    if path is not None and path.is_file():
        file = path
    else:
        table = snapshots(run)
        if table.empty:
            raise FileNotFoundError(f"{run!s}: the run wrote no snapshot (record with snapshot_every=K; a snapshot "
                                    "is written when the sentinel raises an event)")
        rows = table if step is None else table[table["step"] == step]
        if rows.empty:
            raise KeyError(f"no snapshot at step {step}; the run has snapshots at steps "
                           f"{', '.join(map(str, table['step']))}")
        file = Path(rows["file"].iloc[-1])
    try:
        obj = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # a damaged or foreign file: one line naming it
        raise ValueError(f"{file}: not a readable dynascope snapshot ({describe(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{file}: not a dynascope snapshot (format {FORMAT})")
    return Snapshot(int(obj["step"]), obj["model"], list(obj["optimizers"]), obj["rng"], dict(obj.get("meta", {})),
                    shards=obj.get("shards"), rngs=obj.get("rngs"), shard_files=obj.get("shard_files"),
                    directory=file.parent)
