"""The sentinel: cheap norms at EVERY step, a device-side ring buffer, events read late.

Whatever ``every`` is, at each step the sentinel keeps on the device, in a ring
buffer of the last ``window`` steps (default 64): the loss, the global gradient
norm and, per module that owns parameters, the gradient norm ``grad.norm`` and
the update norm ``update.norm`` = ||w_{t+1} - w_t|| (the same names and module
names the probes use). Norms come from multi-tensor reductions
(``torch._foreach_norm``). For SGD, Adam and AdamW with more than COPY_MAX_ELEMENTS weights (4M, 16 MB
in float32) the update follows from the optimizer's state after its step (:mod:`dynascope.probes._steps`:
no copy of the weights; temporaries of at most CHUNK_ELEMENTS elements); for smaller models and for
other optimizers it copies the trainable weights before each optimizer step (``torch._foreach_copy_``:
one extra copy of them in memory; below the threshold the copy is also the faster way on the CPU).

Nothing synchronises with the host per step: each step's row is copied to the
host without blocking (pinned memory and an event on CUDA) and read one step
later. Events are detected on the host from those late values: a loss spike
(the rule of :func:`dynascope.core.robust.spike_threshold`: above twice the running
median of the previous values, by more than 6 robust SDs, and by at least 25%
of the starting loss, the median of the first 3 losses: minibatch losses near
zero jump by 10% of it), a global-gradient-norm spike (the same rule, 10x the
running median: minibatch gradient norms move 2-2.5x from step to step, and above the running
median by at least the starting gradient norm, the median of the first 3: near zero loss a BatchNorm
net's minibatch gradient norms jump 10x while staying below where they started), a non-finite loss or
gradient norm, and an early ``warning`` (:mod:`dynascope.core.drift`: a CUSUM on the loss and on most
modules' gradient and update norms creeping upward). The sentinel judges a value only once
SPIKE_WINDOW (20) finite values precede it: the first steps of training are not compared with an
immature band. On an event the ring buffer's window up to the event is written at full resolution,
the session records the full probes at every step for the next ``burst`` steps (and writes its
snapshot, with ``snapshot_every``), and ``event.<kind>`` / ``event.<kind>.threshold`` rows (one per
episode: an event within ``burst`` steps of the last one of its kind belongs to it; a warning within
``burst`` steps of any event is left out) record it, with a mark ``event.warning`` holding what
drifted (:func:`dynascope.analysis.forensics.run_events` reads them back). In normal operation the sentinel
writes ``update.norm`` per module at the recording steps only, so the store does not grow per step.

Under ``torch.distributed`` (DDP, FSDP2) every rank holds the same row: each rank adds its part of the squared
norms (a replicated DDP parameter on rank 0 only, an FSDP2 shard on its own rank: local tensors, never a
DTensor operation) and its loss divided by the world size, and one asynchronous ``all_reduce(SUM)`` of that
row of ``2 + 2 x modules`` float32 numbers runs per step; the square roots are taken after the sum. The row is
read ``lag`` steps after its step: 0 on the CPU (gloo reduces on the host; waiting for the small row at its own
step is what one process does when it reads its row), 1 on CUDA (NCCL's reduction, the square roots and the
copy to pinned host memory are queued at step s, the host reads the row at s + 1 once its event has passed).
Every rank reads the same rows, bit for bit, at the same step, detects the same events and asks for the same
burst, so the recording schedule stays shared; on the CPU the event's step, the burst and the forensics are
one process's. The ``update.norm`` of a recording step goes to the flush's reduction as this rank's squared
sums.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.drift import DriftDetector
from ..core.names import select_modules
from ..core.robust import (
    GRAD_MIN_RISE,
    GRAD_SPIKE_FACTOR,
    JUMP_FACTOR,
    JUMP_MIN_HISTORY,
    SENTINEL_MIN_RISE,
    SPIKE_WINDOW,
    spike_threshold,
)
from ._fused import FusedKernels, resolve_mode
from ._groups import ParamLayout, index_tensor, local_tensor
from ._steps import COPY_MAX_ELEMENTS, optimizer_update_norms, reads_state
from .base import Collected, Probe, ProbeContext, Stat, StepOutcome, gradient_norms, norm_plan

__all__ = ["Sentinel", "SentinelEvent"]

_HOST_SLOTS = 8  # pinned host rows in flight (CUDA)
START_LOSSES = 3  # the starting loss of the min-rise floor: the median of the first 3 finite losses


def _starting(first: list[float], value: float, current: float) -> float:
    """The level at the start of a series: the median of its first START_LOSSES values (``first`` collects
    them); ``current`` once they are in."""
    if len(first) >= START_LOSSES:
        return current
    first.append(value)
    return statistics.median(first)


@dataclass
class SentinelEvent:
    step: int
    kind: str  # loss_spike, loss_nonfinite, grad_spike, grad_nonfinite, grad_jump, update_jump, warning
    value: float
    threshold: float
    detail: dict[str, Any] | None = None  # warning: the signals that drifted and the modules that moved most;
    # a jump: the metric, the modules that jumped (largest first) and their ratios to their recent maximum

    def describe(self) -> str:
        """One line for the console."""
        if self.kind.endswith("_jump") and self.detail:
            mods = self.detail["modules"]
            more = f" (+{len(mods) - 1} more)" if len(mods) > 1 else ""
            return (f"{self.detail['metric']} of {mods[0]!r}{more} jumped to {self.detail['ratios'][0]:.3g}x its "
                    "recent maximum")
        if self.kind == "warning" and self.detail:
            return f"early warning: {', '.join(self.detail.get('signals', []))} drifting upward"
        what = self.kind.replace("_", " ")
        if self.kind.endswith("nonfinite"):
            return f"{what} ({self.value})"
        return f"{what}: {self.value:.4g} above {self.threshold:.4g}"


class Sentinel(Probe):
    """Every-step norms in a device ring buffer and online event detection.

    ``window``: steps kept in the ring buffer (written at full resolution on an
    event); ``burst``: steps recorded with every probe after an event;
    ``updates``: also the per-module update norm (a copy of the trainable weights below
    ``COPY_MAX_ELEMENTS``, other optimizers than SGD/Adam/AdamW at any size; above it SGD, Adam and
    AdamW's step is read from their state); ``drift``: the early warning, a CUSUM drift
    detector on the loss and the norms (:mod:`dynascope.core.drift`) that raises a
    ``warning`` event; ``announce``: print one line on stderr for each event as it is found (module,
    metric, ratio, step); ``fused`` (default: ``DYNASCOPE_FUSED``, else ``"auto"``): Adam/AdamW's update
    norms from their state by one compiled kernel per parameter layout once their eager cost reaches a
    compile's (``"on"``: at once, ``"off"``: never; see :mod:`dynascope.probes._fused`).

    An instrument like the probes (:class:`dynascope.Probe`) that the session calls at every step; it
    reads the step's gradient norms from the per-step context (:meth:`ProbeContext.grad_norms`), the
    same computation the gradient probe uses on a recording step."""

    name = "sentinel"
    every_step = True
    #: weights up to this many elements (per optimizer) are copied to measure the update (16 MB in float32);
    #: above, SGD/Adam/AdamW's step is read from the optimizer's state
    COPY_MAX_ELEMENTS = COPY_MAX_ELEMENTS

    def __init__(self, window: int = 64, burst: int = 20, updates: bool = True, drift: bool = True,
                 announce: bool = True, fused: str | None = None) -> None:
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"Sentinel: window must be an integer >= 2, got {window!r}")
        if not isinstance(burst, int) or burst < 0:
            raise ValueError(f"Sentinel: burst must be an integer >= 0, got {burst!r}")
        self.window, self.burst, self.updates, self.drift = window, burst, updates, drift
        self.announce = bool(announce)
        self.fused = FusedKernels(resolve_mode(fused))  # Adam/AdamW update norms from the state: compiled kernels

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        keep = [i for i, (_, p) in enumerate(ctx.param_names) if p.requires_grad]
        self.params = [ctx.param_names[i] for i in keep]
        self._pos = {i: k for k, i in enumerate(keep)}  # index in ctx.param_names -> index here
        index = {id(p): i for i, (_, p) in enumerate(self.params)}
        self.modules: list[str] = []
        mod_idx, par_idx = [], []
        for name, module in select_modules(ctx.model, ctx.module_filter):
            ids = sorted({index[id(p)] for p in module.parameters() if id(p) in index})
            if ids and name:
                mod_idx += [len(self.modules)] * len(ids)
                par_idx += ids
                self.modules.append(name)
        device = self.params[0][1].device if self.params else torch.device("cpu")
        self.device = device
        n, m = len(self.params), len(self.modules)
        # one gather and one index_add per step: bin 0 sums every parameter's squared gradient norm (the
        # global norm), bins 1..m each module's, bins m+1..2m each module's squared update norm
        gather = list(range(n)) + par_idx + ([n + i for i in par_idx] if self.updates else [])
        bins = [0] * n + [1 + j for j in mod_idx] + ([1 + m + j for j in mod_idx] if self.updates else [])
        self._gather = torch.tensor(gather, dtype=torch.long, device=device)
        self._bins = torch.tensor(bins, dtype=torch.long, device=device)
        # under torch.distributed each rank adds its part of every squared norm: a replicated (DDP) parameter on
        # rank 0 only, a sharded (FSDP2) one's local shard on every rank; the row is all-reduced before the sqrt
        self.distributed = ctx.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        layout = ParamLayout([p for _, p in self.params], ctx.rank)
        self._sharded = layout.any_sharded
        self._weight: torch.Tensor | None = None
        if self.distributed and not all(layout.contributes):
            self._weight = torch.tensor([1.0 if layout.contributes[i % n] else 0.0 for i in gather],
                                        dtype=torch.float32, device=device)
        self._coll_device = torch.device("cpu")  # gloo reduces on the host, NCCL on the GPU
        if self.distributed and "nccl" in str(torch.distributed.get_backend()).lower():
            self._coll_device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        self._send = [torch.zeros(2 + 2 * m, dtype=torch.float32, device=self._coll_device)
                      for _ in range(_HOST_SLOTS)] if self.distributed else []
        # rows are read a fixed number of steps late under torch.distributed, so that every rank reads (and
        # detects events in) the same rows at the same step: 0 on the CPU (gloo reduces on the host: the row is
        # waited for and read at its own step, as one process reads it), 1 on CUDA (the reduction and the copy
        # to the host are queued on the device at step s and read at s + 1, without waiting on the current
        # step's work)
        self.lag = 1 if device.type == "cuda" or self._coll_device.type == "cuda" else 0
        self.collective_bytes = (2 + 2 * m) * 4 if self.distributed else 0  # payload of the per-step all_reduce
        self._acc = torch.zeros(1 + 2 * m, dtype=torch.float32, device=device)
        self.width = 2 + 2 * m  # loss, global grad norm, module grad norms, module update norms
        self.ring = torch.full((self.window, self.width), float("nan"), dtype=torch.float32, device=device)
        self._nrm = torch.zeros(2 * n, dtype=torch.float32, device=device)  # per-parameter norms: gradients, updates
        self._gn, self._un = self._nrm[:n], self._nrm[n:]
        # (optimizer, the subset stepped or None for all it owns) -> (parameters, their copies, device indices)
        self._snap: dict[tuple[int, tuple[int, ...] | None], tuple[list[torch.Tensor], list[torch.Tensor],
                                                                     torch.Tensor]] = {}
        self._last_snap: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
        self._last_state: dict[int, tuple[list[int], torch.Tensor]] = {}
        self._no_state: set[int] = set()  # optimizers whose state did not give their step: copied instead
        self._state_params: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        pinned = device.type == "cuda"
        self._host = [torch.empty(self.width, dtype=torch.float32, pin_memory=pinned) for _ in range(_HOST_SLOTS)]
        self._host_np = [h.numpy() for h in self._host]  # views: read without a torch call per step
        self._pending: deque[tuple[int, np.ndarray, Any, bool]] = deque()
        self._inflight: deque[list[Any]] = deque()  # torch.distributed: [step, send buffer, work, has_loss, ready]
        self._losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._gnorms: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._start_loss = math.nan
        self._first_losses: list[float] = []
        self._start_gnorm = math.nan
        self._first_gnorms: list[float] = []
        self._steps: deque[int] = deque(maxlen=self.window)
        self.events: list[SentinelEvent] = []
        self._last_event: dict[str, int] = {}
        self._drift = DriftDetector(self.modules, start=SPIKE_WINDOW) if self.drift else None
        # per-module norms of the last SPIKE_WINDOW steps (host): the recent band of the jump rule
        self._mod_hist = np.full((SPIKE_WINDOW, 2 * m), np.nan)
        self._mod_first: list[np.ndarray] = []
        self._mod_start = np.full(2 * m, np.nan)
        self._mod_seen = np.zeros(2 * m, dtype=np.int64)

    # -- every step ------------------------------------------------------------------------------
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        present, norms = self.ctx.grad_norms(optimizer)  # shared with the gradient probe
        if norms is None:
            return
        idx = [self._pos[i] for i in present if i in self._pos]
        if len(idx) != len(present):  # a gradient on a frozen parameter: not the sentinel's
            keep = torch.tensor([k for k, i in enumerate(present) if i in self._pos], dtype=torch.long,
                                device=norms.device)
            norms = norms[keep]
            if not idx:
                return
        index = index_tensor(idx, self.device)
        with torch.no_grad():
            if len(idx) == len(self.params):  # every parameter, in order (present is in parameter order)
                self._gn.copy_(norms)
            else:
                self._gn.index_copy_(0, index, norms.to(self._gn.device))
            if self.updates and optimizer is not None \
                    and id(optimizer) not in self._no_state \
                    and reads_state(self.ctx, optimizer, self.COPY_MAX_ELEMENTS):
                # the step follows from the optimizer's state after it: no copy of the weights
                self._last_state[id(optimizer)] = (idx, index)
            elif self.updates and optimizer is not None:
                key = (id(optimizer), tuple(idx))
                hit = self._snap.get(key)
                if hit is None:
                    if len(self._snap) > 8:
                        self._snap.clear()
                    ps = [self.params[i][1] for i in idx]
                    snaps = [torch.empty_like(local_tensor(p)) for p in ps]
                    hit = self._snap[key] = (ps, snaps, index, norm_plan(snaps))
                torch._foreach_copy_(hit[1], self._local(hit[0]))
                self._last_snap[id(optimizer)] = hit

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        state = self._last_state.pop(id(optimizer), None)
        if state is not None:
            self._state_update_norms(optimizer, *state)
            return
        hit = self._last_snap.pop(id(optimizer), None)
        if hit is None:
            return
        ps, snap, index, plan = hit
        with torch.no_grad():
            torch._foreach_sub_(snap, self._local(ps))  # w_t - w_{t+1} (this rank's shards under FSDP2)
            norms = gradient_norms(snap, plan)  # small tensors stacked by shape: 202 us against 351 us (40 blocks)
            if len(snap) == len(self._un):
                self._un.copy_(norms)  # one optimizer stepping every parameter
            else:
                self._un.index_copy_(0, index, norms)

    def _local(self, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shards of ``ps`` under FSDP2 (no DTensor operation, whose reductions are collectives),
        else ``ps``."""
        return [local_tensor(p) for p in ps] if self._sharded else ps

    def _state_update_norms(self, optimizer: torch.optim.Optimizer, idx: list[int], index: torch.Tensor) -> None:
        """||w_{t+1} - w_t|| of the parameters ``optimizer`` stepped, from its state
        (:func:`dynascope.probes._steps.optimizer_update_norms`: multi-tensor operations over chunks of at
        most CHUNK_ELEMENTS elements of temporaries)."""
        key = (id(optimizer), len(idx))
        ps = self._state_params.get(key)
        if ps is None or ps[0] is not index:
            ps = self._state_params[key] = (index, [self.params[i][1] for i in idx])
        with torch.no_grad():
            try:
                norms = optimizer_update_norms(self.ctx, optimizer, ps[1], self.fused)
            except Exception as exc:  # noqa: BLE001 - probing never stops training: copy from the next step on
                self._no_state.add(id(optimizer))
                warnings.warn(f"dynascope: the sentinel could not read {type(optimizer).__name__}'s step from its "
                              f"state ({type(exc).__name__}: {exc}); it copies the weights from the next step on",
                              RuntimeWarning, stacklevel=4)
                return
            if len(idx) == len(self._un):  # every parameter, in order
                self._un.copy_(norms)
            else:
                self._un.index_copy_(0, index, norms)

    def end_step(self, step: int, loss: Any) -> StepOutcome | None:
        """Write this step's row into the ring buffer and detect events from the values of earlier steps
        that have reached the host. On new events: their rows, the ring buffer's window up to them at full
        resolution, the warnings' marks and a burst of ``burst`` recording steps."""
        events = self.step_events(step, loss)
        if not events:
            return None
        return StepOutcome(rows=self.window_rows(max(e.step for e in events)) + self.event_rows(events),
                           marks=self.event_marks(events), events=events, burst_until=step + self.burst,
                           messages=[f"dynascope: step {e.step}: {e.describe()}" for e in events]
                           if self.announce else [])

    def step_events(self, step: int, loss: Any) -> list[SentinelEvent]:
        """Write this step's row into the ring buffer and detect events from the values of earlier
        steps that have reached the host. Returns the new events."""
        if self.distributed:
            return self._fresh(self._distributed_events(step, loss))
        with torch.no_grad():
            row = self.ring[step % self.window]
            if isinstance(loss, torch.Tensor):
                row[0].copy_(loss.detach().reshape(()))
            else:
                row[0].fill_(float("nan") if loss is None else float(loss))
            torch.sqrt(self._acc.zero_().index_add_(0, self._bins, self._nrm[self._gather].square_()), out=row[1:])
            self._nrm.zero_()
            if len(self._pending) >= _HOST_SLOTS - 1:  # the device is many steps behind: wait for the oldest
                self._pending[0][2].synchronize()
            host = self._host[step % _HOST_SLOTS]
            if self.device.type == "cuda":
                host.copy_(row, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
            else:
                host.copy_(row)
                ev = None
        self._steps.append(step)
        self._pending.append((step, self._host_np[step % _HOST_SLOTS], ev, loss is not None))
        new: list[SentinelEvent] = []
        # read what has arrived, never the row just written (no wait on the device)
        while self._pending and (len(self._pending) > 1 or self._pending[0][2] is None):
            s, buf, e, has_loss = self._pending[0]
            if e is not None and not e.query():
                break
            self._pending.popleft()
            new += self._read(s, buf, has_loss)
        return self._fresh(new)

    def _read(self, s: int, buf: np.ndarray, has_loss: bool) -> list[SentinelEvent]:
        """The events of step ``s``'s row ``buf`` (on the host)."""
        new = self._detect(s, float(buf[0]) if has_loss else None, float(buf[1]))
        new += self._jumps(s, buf)
        if self._drift is not None:
            row = buf.astype(np.float64)
            if not has_loss:
                row[0] = np.nan
            d = self._drift.update(s, row)
            if d is not None:
                new.append(SentinelEvent(s, "warning", d.statistic, d.threshold,
                                         {"signals": d.signals, "modules": d.modules}))
        return new

    def _distributed_events(self, step: int, loss: Any) -> list[SentinelEvent]:
        """Under torch.distributed: this rank's part of the step's row (squared norms: a replicated parameter
        counted on rank 0 only, a shard's on its rank; the loss divided by the world size) goes into an
        asynchronous all_reduce(SUM); a row is waited for ``max(lag - 1, 0)`` steps later (its square roots
        written into the ring buffer and copied to the host), read ``lag`` steps later. Every rank reads the same
        rows (bit for bit: an all-reduce hands every rank the same sums) at the same step, so every rank
        detects the same events and asks for the same burst."""
        dist = torch.distributed
        m = len(self.modules)
        with torch.no_grad():
            sq = self._nrm[self._gather].square_()
            if self._weight is not None:
                sq.mul_(self._weight)
            self._acc.zero_().index_add_(0, self._bins, sq)  # this rank's squared sums (read by collect)
            self._nrm.zero_()
            slot = step % _HOST_SLOTS
            send = self._send[slot]
            if isinstance(loss, torch.Tensor):
                send[0].copy_(loss.detach().reshape(()))
            else:
                send[0].fill_(0.0 if loss is None else float(loss))
            send[0].div_(self.ctx.world)
            send[1:1 + len(self._acc)].copy_(self._acc)
            work = dist.all_reduce(send, op=dist.ReduceOp.SUM, async_op=True)
        self._steps.append(step)
        self._inflight.append([step, send, work, loss is not None, None])
        cuda = self.device.type == "cuda"
        wait_until = step - max(self.lag - 1, 0)  # lag 0 and 1: this step's row; lag 2: the previous step's
        for entry in self._inflight:  # wait (NCCL: the stream waits, not the host), square roots, to the host
            s, sent, w, _, ready = entry
            if s > wait_until:
                break
            if ready is None:
                w.wait()
                with torch.no_grad():
                    row = self.ring[s % self.window]
                    row[0].copy_(sent[0])
                    torch.sqrt(sent[1:1 + 1 + 2 * m], out=row[1:])
                    host = self._host[s % _HOST_SLOTS]
                    if cuda:
                        host.copy_(row, non_blocking=True)
                        entry[4] = torch.cuda.Event()
                        entry[4].record()
                    else:
                        host.copy_(row)
                        entry[4] = True
        new: list[SentinelEvent] = []
        while self._inflight and self._inflight[0][0] <= step - self.lag:
            s, _, _, has_loss, ready = self._inflight.popleft()
            if ready is not True:
                ready.synchronize()  # recorded a step ago: its work is done on the device
            new += self._read(s, self._host_np[s % _HOST_SLOTS], has_loss)
        return new

    def _fresh(self, new: list[SentinelEvent]) -> list[SentinelEvent]:
        """The events that open a new episode."""
        # one episode per kind: an event within `burst` steps of the last one of its kind is part of it;
        # a warning within `burst` steps of any event says nothing new
        fresh = []
        for e in new:
            kinds = self._last_event.values() if e.kind == "warning" else [self._last_event.get(e.kind)]
            last = max((k for k in kinds if k is not None), default=None)
            if last is None or e.step - last > max(self.burst, 1):
                fresh.append(e)
            self._last_event[e.kind] = e.step
        self.events += fresh
        return fresh

    def _detect(self, step: int, loss: float | None, gnorm: float) -> list[SentinelEvent]:
        out = []
        if loss is not None:
            if not math.isfinite(loss):
                out.append(SentinelEvent(step, "loss_nonfinite", loss, math.nan))
                self._losses.append(loss)  # in the window, as in the report's rule (then left out)
            else:
                self._start_loss = _starting(self._first_losses, loss, self._start_loss)
                thr = spike_threshold(self._losses, self._start_loss, SENTINEL_MIN_RISE, SPIKE_WINDOW)
                if loss > thr:
                    out.append(SentinelEvent(step, "loss_spike", loss, thr))
                self._losses.append(loss)
        if not math.isfinite(gnorm):
            out.append(SentinelEvent(step, "grad_nonfinite", gnorm, math.nan))
        elif gnorm > 0:  # 0: no gradient this step
            self._start_gnorm = _starting(self._first_gnorms, gnorm, self._start_gnorm)
            thr = spike_threshold(self._gnorms, self._start_gnorm, GRAD_MIN_RISE, min_history=SPIKE_WINDOW,
                                  factor=GRAD_SPIKE_FACTOR)
            if gnorm > thr:
                out.append(SentinelEvent(step, "grad_spike", gnorm, thr))
            self._gnorms.append(gnorm)
        return out

    def _jumps(self, step: int, buf: np.ndarray) -> list[SentinelEvent]:
        """Modules whose gradient or update norm left its recent band by JUMP_FACTOR: above JUMP_FACTOR x the
        largest of its last SPIKE_WINDOW values (at least JUMP_MIN_HISTORY of them; the median is not enough:
        near zero loss a BatchNorm net's per-module minibatch gradient norms jump 20-40x their median), and
        above it by at least its starting level (the median of its first 3 values). One event per kind and
        step, the modules largest ratio first."""
        m = len(self.modules)
        if not m:
            return []
        x = buf[2:2 + 2 * m].astype(np.float64)
        x = np.where(x > 0, x, np.nan)  # 0: no gradient / no update this step
        out = []
        hist = self._mod_hist
        judged = self._mod_seen >= JUMP_MIN_HISTORY
        if judged.any():
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (no updates)
                top = np.nanmax(hist, axis=0)
                ratio = x / top
                hit = judged & np.isfinite(ratio) & (ratio >= JUMP_FACTOR) & (x - top >= self._mod_start)
            for kind, metric, part in (("grad_jump", "grad.norm", slice(0, m)),
                                       ("update_jump", "update.norm", slice(m, 2 * m))):
                idx = np.flatnonzero(hit[part])
                if len(idx):
                    r = ratio[part][idx]
                    order = idx[np.argsort(-r, kind="stable")]
                    ratios = [float(ratio[part][i]) for i in order]
                    out.append(SentinelEvent(step, kind, ratios[0], JUMP_FACTOR, {
                        "metric": metric, "modules": [self.modules[i] for i in order], "ratios": ratios}))
        ok = np.isfinite(x)
        hist[step % SPIKE_WINDOW] = x
        if len(self._mod_first) < START_LOSSES:
            self._mod_first.append(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._mod_start = np.nan_to_num(np.nanmedian(np.stack(self._mod_first), axis=0), nan=0.0)
        self._mod_seen += ok
        return out

    # -- what is written -------------------------------------------------------------------------
    def window_rows(self, upto: int) -> list[tuple[int, str, str, float]]:
        """The ring buffer's steps up to ``upto`` at full resolution (one copy to the host)."""
        ring = self.ring.cpu().numpy()
        rows: list[tuple[int, str, str, float]] = []
        m = len(self.modules)
        for s in self._steps:
            if s > upto or s <= upto - self.window:
                continue
            r = ring[s % self.window]
            rows.append((s, "grad.global_norm", "", float(r[1])))
            rows += [(s, "grad.norm", name, float(v)) for name, v in zip(self.modules, r[2:2 + m])]
            if self.updates and self.ctx.optimizers:
                rows += [(s, "update.norm", name, float(v)) for name, v in zip(self.modules, r[2 + m:])]
        return rows

    def collect(self, step: int) -> Collected | None:
        """The decimated summary of a recording step: ``update.norm`` per module (a copy of the ring
        buffer's row, which the next ``window`` steps overwrite)."""
        if not self.updates or not self.modules or not self.ctx.optimizers:  # no optimizer: no update to measure
            return None
        m = len(self.modules)
        keys = [("update.norm", name) for name in self.modules]
        if self.distributed:  # this rank's squared sums (the ring's row is reduced later): summed at the flush
            return Collected(keys, stats={"sq": Stat("sum", self._acc[1 + m:].clone())},
                             finish=lambda r: r["sq"].sqrt())
        return Collected(keys, values=self.ring[step % self.window, 2 + m:].clone())

    def close(self) -> None:
        """Wait for the collectives still in flight (before the process group can go)."""
        while getattr(self, "_inflight", None):
            work = self._inflight.popleft()[2]
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - a process group already gone: nothing to wait for
                pass

    @staticmethod
    def event_marks(events: Sequence[SentinelEvent]) -> list[tuple[int, str, Any]]:
        """``(step, "event.<kind>", detail)`` marks of the events that carry a detail (warnings)."""
        return [(e.step, f"event.{e.kind}", e.detail) for e in events if e.detail]

    @staticmethod
    def event_rows(events: Sequence[SentinelEvent]) -> list[tuple[int, str, str, float]]:
        rows = []
        for e in events:
            rows.append((e.step, f"event.{e.kind}", "", e.value))
            rows.append((e.step, f"event.{e.kind}.threshold", "", e.threshold))
        return rows
