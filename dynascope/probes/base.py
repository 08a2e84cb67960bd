"""The instrument protocol: how every stateful collector plugs into a session.

Probes, the sentinel and the scheduled diagnostics are all instruments: subclasses
of :class:`Probe`, called by the session through one composed list. An instrument
sees a narrow :class:`ProbeContext` (the model, its optimizers, the selected
parameters and modules, a per-step cache, rank and world size), never the
session. A probe is called on recording steps; an instrument with
``every_step = True`` (the sentinel, the scheduled diagnostics' runners) at every
step. The lifecycle, in order:

* ``setup(ctx)`` once when the session starts;
* ``arm()`` before a recording step's forward pass (attach or switch on hooks);
* ``before_optimizer_step(optimizer)`` / ``after_optimizer_step(optimizer)``
  around each optimizer's ``step()`` (gradients are read before, updates
  around it; the per-step gradient norms are shared, :meth:`ProbeContext.grad_norms`);
* at ``run.step()``: ``end_step(step, loss)`` (returns a :class:`StepOutcome`:
  rows, marks, events, a burst of recording steps), then on a recording step
  ``collect(step)``, then ``disarm()``, then ``after_step(step)`` (work that runs
  the model, with the probes disarmed: the scheduled diagnostics);
* ``end_run(step)`` once at the normal end of the run, then ``close()``
  (also after an exception).

``collect`` returns the step's *sufficient statistics* as named device tensors,
each tagged with how it combines across processes (:class:`Stat`), and ONE
``finish(reduced) -> values`` that holds the probe's formulas. In one process
``finish`` runs on the local statistics (the trivial reduction); under
``torch.distributed`` it runs on the statistics reduced over the ranks by a
generic reducer that knows no probe (:mod:`dynascope.capture.distributed`). So every
formula exists once, and a custom probe works under DDP/FSDP for free::

    class WeightAbsMax(Probe):
        name = "weight_absmax"
        def collect(self, step):
            ps = [p.detach() for p in self.ctx.model.parameters()]
            m = torch.stack([p.abs().max() for p in ps]).max()
            return Collected([("weight.absmax", "")], stats={"m": Stat("max", m[None])},
                             finish=lambda r: r["m"])

A probe that needs no cross-rank reduction may return plain values,
``Collected(keys, values)``: they are taken as they are on the writing rank.
Nothing is copied to the host before the flush (one transfer per flush).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..core.coverage import CoverageRow
from ._groups import index_tensor, local_tensor, shape_chunks

__all__ = ["Probe", "Collected", "Row", "Stat", "ProbeContext", "StepOutcome", "REDUCTIONS", "gradient_norms"]

Row = tuple[str, str, float]  # metric, layer, value

#: How a statistic combines across ranks:
#: ``sum`` adds, ``max``/``min`` take the extremum, ``moments`` are rows
#: ``(n, mean, M2)`` merged with Chan et al.'s update, ``replicated`` is the same
#: on every rank and is taken once (the local value).
REDUCTIONS = ("sum", "max", "min", "moments", "replicated")
Reduction = Literal["sum", "max", "min", "moments", "replicated"]


@dataclass
class Stat:
    """A device tensor of sufficient statistics and how it combines across ranks.

    ``moments`` tensors have shape ``(K, 3)``: count, mean and sum of squared
    deviations per row; every other kind is any shape (kept as is)."""

    kind: Reduction
    value: torch.Tensor

    def __post_init__(self) -> None:
        if self.kind not in REDUCTIONS:
            raise ValueError(f"Stat kind must be one of {REDUCTIONS}, got {self.kind!r}")
        if self.kind == "moments" and (self.value.ndim != 2 or self.value.shape[-1] != 3):
            raise ValueError(f"a 'moments' Stat needs shape (K, 3) rows (n, mean, M2), got {tuple(self.value.shape)}")


Finish = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass
class Collected:
    """One recording step's output of a probe.

    ``keys[i]`` is the ``(metric, layer)`` of the i-th value. Either ``stats``
    (named :class:`Stat`) with ``finish`` (reduced statistics -> 1-D tensor of
    ``len(keys)`` values, on the statistics' device), or plain ``values`` (a
    1-D device tensor, taken as is). ``post``, if given, runs on the host at
    flush time with the values (``{(metric, layer): float}``) and returns extra
    rows computed from them and host-side data (e.g. learning rates).
    """

    keys: list[tuple[str, str]]
    values: torch.Tensor | None = None
    post: Callable[[Mapping[tuple[str, str], float]], list[Row]] | None = None
    stats: dict[str, Stat] | None = None
    finish: Finish | None = None

    def __post_init__(self) -> None:
        if (self.values is None) == (self.stats is None):
            raise ValueError("Collected needs either values or stats (with finish), not both")
        if self.stats is not None and self.finish is None:
            raise ValueError("Collected with stats needs a finish(reduced) -> values function")

    def local_values(self) -> torch.Tensor:
        """The values of this step in one process: ``finish`` of the local statistics."""
        if self.values is not None:
            return self.values.reshape(-1)
        assert self.stats is not None and self.finish is not None
        return checked_finish(self, {k: s.value for k, s in self.stats.items()})


def checked_finish(c: Collected, reduced: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run ``c.finish`` and check it returned one value per key."""
    assert c.finish is not None
    values = c.finish(reduced).reshape(-1)
    if values.numel() != len(c.keys):
        raise RuntimeError(f"a probe's finish() returned {values.numel()} values for {len(c.keys)} keys")
    return values


@dataclass
class StepOutcome:
    """What an instrument's ``end_step`` hands the session: host rows ``(step, metric, layer, value)`` to
    write, marks ``(step, key, value)``, the events it raised (objects with ``step`` and ``kind``; on an
    event the session writes the snapshot, with ``snapshot_every``), the last step of a burst of
    recording steps it asks for (-1: none) and lines to print now (on the writing rank)."""

    rows: list[tuple[int, str, str, float]] = field(default_factory=list)
    marks: list[tuple[int, str, Any]] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    burst_until: int = -1
    messages: list[str] = field(default_factory=list)  # one line each, printed on stderr as they happen


_GRAD = operator.attrgetter("grad")


#: tensors up to this size are stacked by shape for their norms (a few calls for many small tensors); larger ones
#: go through one ``torch._foreach_norm`` (no copy). Measured (2 threads, gradients of bench_default_path's
#: models): Pre-LN transformer 206 us against 385 us stacking every shape, 40-block model 200 us (201), CNN 28 us
STACK_MAX_ELEMENTS = 4096


def gradient_norms(grads: Sequence[torch.Tensor], plan: Any = None) -> torch.Tensor:
    """||g||_2 of each tensor as one float32 tensor. With a ``plan`` (:func:`norm_plan` of tensors of the same
    shapes, dtypes and devices): small tensors of one shape stacked and reduced by rows, the others in one
    ``torch._foreach_norm`` (on the CPU a loop over the tensors: 0.35 ms for the 244 gradients of the 40-block
    model, 0.20 ms this way); else ``torch._foreach_norm`` (a stack of per-tensor norms where it fails, e.g.
    mixed devices on old torch versions)."""
    if plan is not None:
        chunks, single, inverse = plan
        parts = []
        try:
            for ks in chunks:
                rows = torch.stack([grads[k] for k in ks]).reshape(len(ks), -1)
                parts.append(torch.linalg.vector_norm(rows, dim=1))
            if single:
                norms = torch._foreach_norm([grads[k] for k in single])
                parts.append(torch.stack([n.float() for n in norms]) if norms[0].dtype != torch.float32
                             else torch.stack(norms))
        except RuntimeError:  # shapes or dtypes other than planned: the multi-tensor path
            return gradient_norms(grads)
        out = torch.cat([q.float() for q in parts]) if len(parts) > 1 else parts[0].float()
        return out if inverse is None else out[inverse]
    try:
        norms = torch._foreach_norm(list(grads))
        if any(n.dtype != torch.float32 for n in norms):
            norms = [n.float() for n in norms]
        return torch.stack(norms)
    except RuntimeError:
        return torch.stack([torch.linalg.vector_norm(g).float() for g in grads])


def norm_plan(tensors: Sequence[torch.Tensor]) -> Any:
    """How :func:`gradient_norms` reduces ``tensors`` (and tensors of the same shapes later): index chunks of
    small tensors per (shape, dtype, device) to stack, the indices of the others, and the permutation back to
    their order (None when in order); None when they are on several devices (the multi-tensor path then)."""
    if not tensors or len({t.device for t in tensors}) > 1:
        return None
    chunks = [ks for ks in shape_chunks(tensors) if len(ks) > 1 and tensors[ks[0]].numel() <= STACK_MAX_ELEMENTS]
    stacked = {k for ks in chunks for k in ks}
    single = [k for k in range(len(tensors)) if k not in stacked]
    if single and len({tensors[k].dtype for k in single}) > 1:
        return None  # one _foreach_norm needs one dtype for its outputs' stack
    order = [k for ks in chunks for k in ks] + single
    in_order = order == list(range(len(order)))
    return chunks, single, None if in_order else index_tensor(order, tensors[0].device, inverse=True)


@dataclass
class ProbeContext:
    """What a probe sees of the run: the (possibly wrapped) model, its optimizers,
    the named parameters and selected modules, a cache shared by the probes
    within one optimizer step (cleared around it), the process's rank and world
    size (1 outside ``torch.distributed``), and the run directory (whether it is
    resumed, whether this process writes it)."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    param_names: list[tuple[str, nn.Parameter]]
    module_filter: Any
    module_names: list[str]
    rank: int = 0
    world: int = 1
    cache: dict[Any, Any] = field(default_factory=dict)
    #: tables shared by the probes for the whole run (layouts of parameters per optimizer group)
    persistent: dict[Any, Any] = field(default_factory=dict)
    run_dir: str | None = None  # where the run is written (a probe may keep a file of its own there)
    resumed: bool = False  # the run continues an earlier one in run_dir
    writer: bool = True  # this process writes the run (rank 0)
    #: writes one host row (step, metric, layer, value) into the run (set by the session)
    log_row: Callable[[int, str, str, float], None] | None = None
    #: writes a named array artifact (name, step, arrays, meta) into the run (set by the session)
    write_artifact: Callable[[str, int, dict[str, Any], dict[str, Any]], None] | None = None
    #: the current step's batch as given to ``run.step(loss, batch=...)`` (None when not given)
    step_batch: Any = None
    #: the index of the step in progress (set by the session)
    step: int = 0

    def __post_init__(self) -> None:
        self._group_of: dict[int, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}
        self._owned: dict[tuple[int, int], tuple[Sequence[tuple[str, torch.Tensor]], list[int]]] = {}
        for opt in self.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    self._group_of.setdefault(id(p), (opt, g))

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The first optimizer (None without one)."""
        return self.optimizers[0] if self.optimizers else None

    def optimizer_of(self, p: torch.Tensor) -> torch.optim.Optimizer | None:
        """The optimizer that owns parameter ``p`` (None when no optimizer does)."""
        hit = self._group_of.get(id(p))
        return None if hit is None else hit[0]

    def group_of(self, p: torch.Tensor) -> dict[str, Any] | None:
        """The param group (of its optimizer) that holds ``p``."""
        hit = self._group_of.get(id(p))
        return None if hit is None else hit[1]

    def grad_norms(self, optimizer: torch.optim.Optimizer | None) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """The gradient norms of this optimizer step, computed once and shared by every instrument
        (architecture invariant 10): indices into ``param_names`` of the parameters ``optimizer`` owns
        (:meth:`owned_by`) that have a gradient, and their norms ||g||_2 (float32, one multi-tensor
        reduction of the local pieces: a shard's under FSDP2), or None when none has a gradient. Cached in
        :attr:`cache`, which the session clears around each optimizer step."""
        key = ("grad_norms", id(optimizer))
        hit = self.cache.get(key)
        if hit is None:
            owned = self.owned_by(optimizer, self.param_names)
            okey = ("owned_params", id(optimizer))
            known = self.persistent.get(okey)
            if known is None or known[0] is not owned:  # kept per run: no per-parameter lookups per step
                ps = [self.param_names[i][1] for i in owned]
                known = self.persistent[okey] = (owned, tuple(owned), ps,
                                                 any(callable(getattr(p, "to_local", None)) for p in ps))
            _, every, ps, dtensors = known
            grads = list(map(_GRAD, ps))  # one C-level loop
            if any(g is None for g in grads):
                present = tuple(i for i, g in zip(every, grads) if g is not None)
                grads = [g for g in grads if g is not None]
            else:
                present = every
            norms = None
            if present:
                if dtensors:  # DTensor parameters (FSDP2, tensor parallel): this rank's pieces
                    grads = [local_tensor(g) for g in grads]
                plan_key = ("norm_plan", id(optimizer), present)  # a parameter's gradient keeps its shape
                if plan_key not in self.persistent:
                    self.persistent[plan_key] = norm_plan(grads)
                with torch.no_grad():
                    norms = gradient_norms(grads, self.persistent[plan_key])
            hit = self.cache[key] = (present, norms)
        return hit

    def owned_by(self, optimizer: torch.optim.Optimizer | None,
                 named: Sequence[tuple[str, torch.Tensor]]) -> list[int]:
        """Indices into ``named`` of the parameters ``optimizer`` owns. Parameters no
        optimizer owns go with the first optimizer (they are read at its step); without
        any optimizer (``None``) every parameter. Computed once per optimizer and list
        (read-only: do not modify the returned list)."""
        key = (id(optimizer), id(named))
        hit = self._owned.get(key)
        if hit is not None and hit[0] is named:  # the list itself is kept: its id is not reused
            return hit[1]
        first = self.optimizer
        out = []
        for i, (_, p) in enumerate(named):
            o = self.optimizer_of(p)
            if o is optimizer or (o is None and optimizer is first):
                out.append(i)
        self._owned[key] = (named, out)
        return out


class Probe:
    """Base class of instruments (probes, the sentinel, scheduled runners). Override what you need;
    every method is optional except ``collect``."""

    name: str = "probe"
    #: called at every step (the sentinel), not only on recording steps
    every_step: bool = False
    ctx: ProbeContext

    @property
    def session(self) -> ProbeContext:
        """The probe's context (the name dynascope 0.1 probes used)."""
        return self.ctx

    def setup(self, ctx: ProbeContext) -> None:
        """Called once when the session starts."""
        self.ctx = ctx

    def arm(self) -> None:
        """Switch on before a recording step's forward pass."""

    def disarm(self) -> None:
        """Switch off after the recording step."""

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Before ``optimizer.step()`` on a recording step (``None``: the run has no
        optimizer and this is called at ``run.step()``)."""

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()`` on a recording step."""

    def end_step(self, step: int, loss: Any) -> StepOutcome | None:
        """At ``run.step(loss)``, before ``collect``: this step's rows, marks and events, if any."""
        return None

    def collect(self, step: int) -> Collected | None:
        """Return this recording step's statistics, or None when there is nothing."""
        raise NotImplementedError

    def runs_model(self, step: int) -> bool:
        """Whether ``after_step(step)`` runs the model (the session disarms the probes before it)."""
        return False

    def after_step(self, step: int) -> None:
        """At the end of ``run.step()``, after ``collect`` and with the probes disarmed: work that runs
        the model (the scheduled diagnostics)."""

    def end_run(self, step: int) -> None:
        """Once at the normal end of the run (not after an exception), before ``close``; ``step`` is the
        last step."""

    def coverage(self) -> list[CoverageRow]:
        """What this probe records and what it cannot, and why (the coverage report);
        asked at start and again at close."""
        return []

    def close(self) -> None:
        """Release everything (hooks, references); also called on exceptions."""
        self.disarm()
