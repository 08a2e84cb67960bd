"""The context manager that owns the probes, the step counter and the flushes.

``dynascope.probe(model, optimizer, run_dir, every=10)`` returns a
:class:`Session`. Step ``s`` (counted from 0, or from the last recorded step
+ 1 when resuming) records when ``s % every == 0``: its probes are armed before
that step's forward pass and disarmed at ``run.step()``. Scalars passed to
``run.step`` are recorded at every step. Recorded values stay on the device
until a flush (every ``flush_every`` recording steps or ``flush_seconds``),
which moves them to the host in one transfer and writes one SQLite
transaction.
"""

from __future__ import annotations

import itertools
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.checks import positive_int
from ..core.coverage import CoverageRow, coverage_frame, merge
from ..core.names import ModuleFilter, is_wrapped, named_parameters, select_modules
from ..core.version import __version__
from ..probes.activations import ActivationProbe
from ..probes.base import Collected, Probe, ProbeContext, StepOutcome
from ..probes.gradients import GradientProbe
from ..probes.optimizer import LearningRates, UpdateProbe
from ..probes.scheduled import Scheduled, ScheduledRunner
from ..probes.sentinel import Sentinel
from ..store import ResilientWriter, RunStore, now_iso
from .clipping import ClipWatch
from .distributed import RankReducer, is_active, is_sharded, rank, world_size
from .snapshot import ReplicatedSnapshotter, ShardedSnapshotter, Snapshotter

__all__ = ["Session", "probe", "PROBES"]

PROBES = ("activations", "gradients", "updates", "batchnorm")
OPT_IN_PROBES = ("distance", "spectral")


def _optimizer_hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    out = []
    for g in optimizer.param_groups:
        hp = {}
        for k, v in g.items():
            if k == "params":
                hp["n_params"] = sum(p.numel() for p in v)
                continue
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if isinstance(v, (int, float, str, bool, type(None), tuple, list)):
                hp[k] = list(v) if isinstance(v, tuple) else v
        out.append(hp)
    return out


def _optimizer_list(optimizer: Any) -> list[torch.optim.Optimizer]:
    """``optimizer=`` as a list: None, one optimizer, or a sequence of them."""
    if optimizer is None:
        return []
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not isinstance(opts, (list, tuple)):
        raise TypeError("optimizer must be a torch.optim.Optimizer, a sequence of them, or None, "
                        f"got {type(optimizer).__name__}")
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, a sequence of them, or None, "
                            f"got a {type(o).__name__} in the sequence")
    if len({id(o) for o in opts}) != len(opts):
        raise ValueError("the same optimizer is given twice")
    return list(opts)


def _optimizer_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"class": type(optimizer).__name__, "hyperparameters": _optimizer_hparams(optimizer)}


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if is_wrapped(model) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class _ForwardCounter:
    """The root model's forward pre-hook: counts forward passes (outside compiled graphs: under torch.compile
    the count is skipped, never traced), so ``step`` can tell two ``run.step()`` calls without a forward pass
    between them. Changes nothing; holds only a count, so a model that carries it while the session is open
    still deep-copies and pickles (``copy.deepcopy(model)`` for an EMA or evaluation copy, ``torch.save``)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.count += 1


class Session:
    """A probed training run. Use through :func:`probe` as a context manager."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        every: int = 10,
        probes: Sequence[str | Probe] = PROBES,
        modules: ModuleFilter = None,
        all_params: bool = False,
        curvature: Scheduled | None = None,
        landscape: Scheduled | None = None,
        plasticity: Scheduled | None = None,
        scheduled: Iterable[Scheduled] = (),
        resume: bool = False,
        overwrite: bool = False,
        name: str | None = None,
        seed: int | None = None,
        blocks: Sequence[str] | str | None = None,
        branches: Sequence[str] | str | None = None,
        flush_every: int = 20,
        flush_seconds: float = 10.0,
        meta: dict[str, Any] | None = None,
        on_diagnostic_error: str = "warn",
        tensorboard: Any = None,
        sentinel: bool | Sentinel = True,
        snapshot_every: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _optimizer_list(optimizer)
        positive_int("every", every)
        positive_int("flush_every", flush_every)
        if on_diagnostic_error not in ("warn", "raise"):
            raise ValueError(f"on_diagnostic_error must be 'warn' or 'raise', got {on_diagnostic_error!r}")
        self.on_diagnostic_error = on_diagnostic_error
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True contradict each other; choose one")
        model_ids = {id(p) for p in model.parameters()}
        for k, opt in enumerate(optimizers):
            opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
            if opt_ids and not (opt_ids & model_ids):
                which = "the optimizer" if len(optimizers) == 1 else f"optimizer {k} ({type(opt).__name__})"
                raise ValueError(f"{which} holds none of the model's parameters: was it built for another model?")
        self.model = model
        self.optimizers = optimizers
        self.optimizer = optimizers[0] if optimizers else None
        self.every = every
        self.module_filter = modules
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.param_names = named_parameters(model)
        self.module_names = [n for n, _ in select_modules(model, modules)]
        self.probes: list[Probe] = [self._make_probe(p, all_params) for p in probes]
        self.scheduled: list[Scheduled] = [s for s in (curvature, landscape, plasticity) if s is not None]
        self.scheduled += list(scheduled)
        runners = [ScheduledRunner(s, on_diagnostic_error) for s in self.scheduled]  # checks each one's type
        if not isinstance(sentinel, (bool, Sentinel)):
            raise TypeError(f"sentinel must be True, False or a dynascope.Sentinel, got {type(sentinel).__name__}")
        # under torch.distributed the sentinel's row is all-reduced (every rank holds the same row and detects
        # the same events at the same step): the recording schedule its bursts change stays shared
        self.sentinel: Sentinel | None = None if sentinel is False else (
            sentinel if isinstance(sentinel, Sentinel) else Sentinel())
        # every instrument in one list, called through one protocol (dynascope.probes.base): the probes on
        # recording steps, the sentinel and the scheduled diagnostics' runners at every step
        self.instruments: list[Probe] = [*self.probes, *([self.sentinel] if self.sentinel else []), *runners,
                                         *([LearningRates()] if optimizers else [])]
        self._burst_until = -1
        self.snapshotter: Snapshotter | None = None
        if snapshot_every is not None:
            if sentinel is False:
                raise ValueError("snapshot_every needs the sentinel (a snapshot is written on the sentinel's events); "
                                 "drop sentinel=False or snapshot_every")
            self.snapshotter = Snapshotter(snapshot_every)  # checks the value on every rank
            if is_active() and any(is_sharded(p) for p in model.parameters()):
                # FSDP2: every rank keeps its shards; on an event each rank writes its own, rank 0 a manifest
                self.snapshotter = ShardedSnapshotter(snapshot_every)
            elif is_active():  # DDP: the state is replicated: rank 0 keeps it, every rank its generators' states
                self.snapshotter = ReplicatedSnapshotter(snapshot_every)
        self.writer = rank() == 0
        # under torch.distributed: combines the ranks' statistics at each flush (dynascope.capture.distributed)
        self.reducer: RankReducer | None = RankReducer() if is_active() else None
        self._listeners: list[Any] = []
        if tensorboard is not None and self.writer:
            from .listeners import TensorBoardMirror

            self.add_listener(TensorBoardMirror(tensorboard))
        if run_dir is None:
            run_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if not isinstance(run_dir, (str, os.PathLike)) or not isinstance(os.fspath(run_dir), str):
            got = type(run_dir).__name__ if not isinstance(run_dir, os.PathLike) else \
                f"a {type(run_dir).__name__} whose path is {type(os.fspath(run_dir)).__name__}"
            raise TypeError(f"run_dir must be a str or os.PathLike, got {got}")
        self.run_dir = os.fspath(run_dir)
        if isinstance(self.snapshotter, ShardedSnapshotter):  # FSDP2: each rank writes its shards there
            self.snapshotter.directory = self.run_dir
        self._mode = "resume" if resume else "overwrite" if overwrite else "new"
        self._name = name
        self._seed = seed
        self._blocks = self._resolve(blocks)
        self._branches = self._resolve(branches)
        self._user_meta = dict(meta or {})
        self.store: ResilientWriter | None = None  # a storage fault never reaches the training loop
        self.step_index = 0
        self._recording = False
        self._hooks: list[Any] = []
        self._dynamo_patch: Any = None
        self._read_early: set[int] = set()  # optimizers (ids) whose gradients were read before clipping this step
        self._forward_counter = _ForwardCounter()
        self.ctx = ProbeContext(model, list(optimizers), self.param_names, modules, self.module_names,
                                rank=rank(), world=world_size())
        self._device_buf: list[tuple[int, torch.Tensor | None, Collected]] = []
        self._host_rows: list[tuple[int, str, str, float]] = []
        self._scalar_buf: list[tuple[int, str, Any]] = []
        self._recorded_since_flush = 0
        self._last_flush = time.monotonic()
        self._t0 = 0.0
        self._open = False

    # -- set-up ------------------------------------------------------------------
    def _make_probe(self, spec: str | Probe, all_params: bool) -> Probe:
        if isinstance(spec, Probe):
            return spec
        if spec == "activations":
            return ActivationProbe(self.module_filter)
        if spec == "gradients":
            return GradientProbe(all_params)
        if spec == "updates":
            return UpdateProbe(all_params)
        if spec == "batchnorm":
            from ..probes.batchnorm import BatchNormProbe
            return BatchNormProbe()
        if spec == "distance":
            from ..probes.distance import DistanceProbe
            return DistanceProbe(all_params)
        if spec == "spectral":
            from ..probes.spectral import SpectralProbe
            return SpectralProbe()
        raise ValueError(f"unknown probe {spec!r}; known probes: {', '.join(PROBES + OPT_IN_PROBES)} "
                         "(or a dynascope Probe instance)")

    def _resolve(self, spec: Sequence[str] | str | None) -> list[str] | None:
        if spec is None:
            return None
        names = select_modules(self.model, spec)
        if not names:
            raise ValueError(f"no module matches {spec!r}")
        return [n for n, _ in names]

    def _meta(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        summary = repr(self.model)
        device = next((str(p.device) for p in self.model.parameters()), "cpu")
        meta: dict[str, Any] = {
            "name": self._name or os.path.basename(os.path.normpath(os.path.abspath(self.run_dir))),
            "name_given": bool(self._name),  # else the reader names the run after the folder it lives in
            "model": {"class": type(_unwrapped(self.model)).__name__, "n_parameters": n_params, "n_trainable": n_train,
                      "summary": summary[:20000]},
            "optimizer": None if self.optimizer is None else _optimizer_meta(self.optimizer),
            "optimizers": [_optimizer_meta(o) for o in self.optimizers],
            "torch_version": torch.__version__,
            "dynascope_version": __version__,
            "python_version": platform.python_version(),
            "seed": self._seed,
            "every": self.every,
            "sentinel": None if self.sentinel is None else {
                "window": self.sentinel.window, "burst": self.sentinel.burst, "updates": self.sentinel.updates,
                "drift": self.sentinel.drift, "announce": self.sentinel.announce},
            "snapshot_every": None if self.snapshotter is None else self.snapshotter.every,
            "probes": [p.name for p in self.probes],
            "scheduled": [type(s).__name__ for s in self.scheduled],
            "modules": self.module_names,
            "module_types": {n: type(m).__name__ for n, m in select_modules(self.model, self.module_filter)},
            "parameters": [n for n, _ in self.param_names],
            "parameter_shapes": {n: list(p.shape) for n, p in self.param_names},
            "device": device,
            "status": "running",
            "argv": sys.argv[:20],
        }
        if self._blocks is not None:
            meta["blocks"] = self._blocks
        if self._branches is not None:
            meta["branches"] = self._branches
        if self._user_meta:
            meta["user"] = self._user_meta
        return meta

    # -- context manager ---------------------------------------------------------
    def __enter__(self) -> Session:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None, error=exc)

    def start(self) -> None:
        if self._open:
            raise RuntimeError("this probe session is already running")
        if self.writer:
            self.store = ResilientWriter(RunStore(self.run_dir, self._mode))
            meta = self._meta()
            if self.store.resumed:
                self._check_resumed_model(meta)
                last = self.store.last_step()
                self.step_index = 0 if last is None else last + 1
                self.ctx.step = self.step_index
                meta["start_time"] = self.store.meta.get("start_time", now_iso())
                meta["resumed_at"] = [*self.store.meta.get("resumed_at", []), self.step_index]
            else:
                meta["start_time"] = now_iso()
            self.store.write_meta(meta)
        self._t0 = time.monotonic()
        self.ctx.run_dir = self.run_dir
        self.ctx.resumed = bool(self.store is not None and self.store.resumed)
        self.ctx.writer = self.writer
        self.ctx.log_row = self._log_row
        self.ctx.write_artifact = self._write_artifact
        for inst in self.instruments:
            inst.setup(self.ctx)
        if self.store is not None:
            self.store.write_meta({"coverage": [r.as_dict() for r in self._coverage_rows()]})
        for opt in self.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))
        # forward passes counted (eagerly: not inside a compiled graph) to tell a doubled run.step() call
        self._forwards_at_step = self._step_calls = self._doubled = 0
        self._forward_in_last_step = self._doubled_off = False
        self._forward_counter = _ForwardCounter()
        self._hooks.append(self.model.register_forward_pre_hook(self._forward_counter))
        ClipWatch.add(self._on_clip)
        self._open = True
        if self.snapshotter is not None:
            self._snapshot(lambda keeper: keeper.take(self.step_index, self.model, self.optimizers))
        self._set_recording(self._records(self.step_index))

    def _check_resumed_model(self, meta: dict[str, Any]) -> None:
        """``resume=True`` continues the run only with the model it recorded: the same parameter names (and
        shapes, for runs that stored them); else one ValueError naming the first differences."""
        assert self.store is not None
        old = self.store.meta
        names = old.get("parameters")
        if not isinstance(names, list):
            return  # a run from before parameter names were stored
        shapes = old.get("parameter_shapes") if isinstance(old.get("parameter_shapes"), dict) else {}
        now = meta["parameter_shapes"]
        known = set(names)
        kinds = ([f"missing {n!r}" for n in names if n not in now], [f"new {n!r}" for n in now if n not in known],
                 [f"{n!r} shape {tuple(shapes[n])} vs {tuple(now[n])}" for n in names
                  if n in now and n in shapes and list(shapes[n]) != now[n]])
        diffs = [d for trio in itertools.zip_longest(*kinds) for d in trio if d]  # the first of each kind first
        if diffs:
            self.store.close()
            self.store = None
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise ValueError(f"resume: the run at {self.run_dir} recorded parameters that differ from this model's: "
                             f"{', '.join(diffs[:3])}{more} (resume it with the model it recorded, or record a new "
                             "run)")

    @property
    def _forwards(self) -> int:
        return self._forward_counter.count

    def coverage(self) -> pd.DataFrame:
        """What this run records and what it cannot, and why: one row per module,
        parameter or metric (columns ``kind, name, recorded, reason, probe``). Before
        the first recording step it lists what is hooked; afterwards also what
        the run revealed (outputs that are not floating tensors, parameters that
        never had a gradient)."""
        return coverage_frame(self._coverage_rows())

    def _coverage_rows(self) -> list[CoverageRow]:
        rows: list[CoverageRow] = []
        for p in self.probes:
            rows += p.coverage()
        if self.optimizers:
            for name, p in self.param_names:
                if p.requires_grad and self.ctx.optimizer_of(p) is None:
                    rows.append(CoverageRow("parameter", name, True, "no optimizer owns it: read with the "
                                            "first optimizer's step", "session"))
        return merge(rows)

    def _records(self, step: int) -> bool:
        return step % self.every == 0 or step <= self._burst_until

    def _scope_dynamo(self) -> None:
        """Under torch.compile, let Dynamo guard on module hooks for this session, so a
        graph traced without the recording hooks is not reused when they are attached
        (``torch._dynamo.config.skip_nnmodule_hook_guards``, True by default). Scoped:
        restored at close. Only when Dynamo is loaded (importing it costs seconds).

        The switch only reaches graphs traced from now on: a graph compiled before it has no
        guard on hooks, and Dynamo does not guard a module's identity either (it inlines
        ``nn.Module`` calls and guards their type and structure), so a graph compiled for an
        EARLIER model of the same architecture, or for this model before the session, is
        reused for this model with its hooks ignored: no ``act.*`` at all. So when the switch
        is flipped, the compiled code caches are dropped too
        (``torch._dynamo.reset_code_caches``): each model compiled so far retraces once (its
        next call), this time guarded on the hooks."""
        if self._dynamo_patch is not None or "torch._dynamo" not in sys.modules:
            return
        dynamo = sys.modules["torch._dynamo"]
        config = dynamo.config
        if getattr(config, "skip_nnmodule_hook_guards", False):
            self._dynamo_patch = config.patch(skip_nnmodule_hook_guards=False)
            self._dynamo_patch.__enter__()
            reset = getattr(dynamo, "reset_code_caches", None) or dynamo.reset
            reset()

    def _set_recording(self, on: bool) -> None:
        if on:
            self._scope_dynamo()
        if on and not self._recording:
            for inst in self.instruments:
                inst.arm()
        elif not on and self._recording:
            for inst in self.instruments:
                inst.disarm()
        self._recording = on

    def _active(self) -> list[Probe]:
        """The instruments called at this step: all of them on a recording step, else the every-step ones."""
        return self.instruments if self._recording else [i for i in self.instruments if i.every_step]

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._read_early:  # read before clipping: the gradients as the loss produced them
            self._read_early.discard(id(optimizer))
            return
        self.before_optimizer_step(optimizer)

    def _on_clip(self, parameters: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        """Gradient clipping is about to scale this model's gradients (``dynascope.capture.clipping``): read
        them now, for every optimizer that owns some of them, and record the clipping coefficient
        ``grad.clip_coef`` = min(1, max_norm / (total_norm + 1e-6)) (torch's formula; 1: not clipped)."""
        ids = {id(p) for p in parameters}
        mine = [p for _, p in self.param_names if id(p) in ids]
        if not mine:
            return  # another model's gradients
        # one pass: each parameter's optimizer (one no optimizer owns is read with the first; None without any)
        owners = {id(o): o for o in (self.ctx.optimizer_of(p) or self.optimizer for p in mine)}
        for opt in owners.values():
            self.before_optimizer_step(opt)
            self._read_early.add(id(opt))
        with torch.no_grad():
            total = total_norm.detach()
            if hasattr(total, "full_tensor"):  # FSDP2: clip_grad_norm_'s norm is a replicated DTensor
                total = total.full_tensor()
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        self._scalar_buf.append((self.step_index, "grad.clip_coef", coef.reshape(()).float()))

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.after_optimizer_step(optimizer)

    @property
    def recording(self) -> bool:
        """Whether the current step records the probes."""
        return self._recording

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Tell the probes that ``optimizer`` is about to step (gradients are final).
        Called by each optimizer's step pre-hook; an integration whose gradients
        appear only inside ``optimizer.step(closure)`` (Lightning) calls it again
        once they exist: the later reading replaces the earlier one."""
        self.ctx.cache.clear()  # per-step work shared between instruments (gradient norms, stacked weights)
        for inst in self._active():
            inst.before_optimizer_step(optimizer)
        self.ctx.cache.clear()

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the instruments that ``optimizer`` has stepped (called by its post-hook)."""
        for inst in self._active():
            inst.after_optimizer_step(optimizer)

    # -- the loop ------------------------------------------------------------------
    def step(self, loss: Any = None, *, batch: Any = None, **scalars: Any) -> None:
        """End of one training step: record ``loss`` and any named scalars
        (tensors stay on the device until the flush), collect the probes on
        recording steps, and run due scheduled diagnostics. ``batch``: this step's
        ``(inputs, targets)``, for scheduled diagnostics built with ``batch="step"``
        (e.g. ``Curvature(batch="step")``); held until the next ``run.step()`` or the
        end of the run, never copied."""
        if not self._open:
            raise RuntimeError("run.step() called outside the `with dynascope.probe(...)` block")
        self._check_doubled_step()
        s = self.step_index
        self.ctx.step_batch = batch  # this step's batch (None: not given), read by the scheduled diagnostics
        if loss is not None:
            scalars = {"loss": loss, **scalars}
        for key, value in scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"scalar {key!r} must have one element, got shape {tuple(value.shape)}")
                value = value.detach().reshape(())
            elif not isinstance(value, (int, float, np.number)):
                raise TypeError(f"scalar {key!r} must be a number or a one-element tensor, got {type(value).__name__}")
            self._scalar_buf.append((s, key, value))
        if not self.optimizers and id(None) not in self._read_early:  # no optimizer step to hook: read now
            self.before_optimizer_step(None)
        self._read_early.clear()
        active = self._active()
        for inst in active:
            outcome = inst.end_step(s, loss)
            if outcome is not None:
                self._take(outcome)
        if self._recording:
            for inst in active:
                got = inst.collect(s)
                if got is not None:
                    self._buffer(s, got)
            self._recorded_since_flush += 1
        if any(inst.runs_model(s) for inst in active):
            self._set_recording(False)  # the probes do not record a diagnostic's forward passes
        for inst in active:
            inst.after_step(s)
        self.step_index = s + 1
        self.ctx.step = self.step_index
        if self.snapshotter is not None and self.snapshotter.due(self.step_index):
            self._snapshot(lambda keeper: keeper.take(self.step_index, self.model, self.optimizers))
        self._set_recording(self._records(self.step_index))
        if self._recorded_since_flush >= self.flush_every or (
            self.reducer is None  # ranks must flush together: no timer under torch.distributed
            and time.monotonic() - self._last_flush > self.flush_seconds and (self._device_buf or self._scalar_buf)
        ):
            self.flush()

    def _check_doubled_step(self) -> None:
        """Warn once when ``run.step()`` is called twice per training step. The sign: twice in a row, a step with
        a forward pass followed by one without. Two steps in a row without one turn the check off (a loop whose
        forward passes the hook does not see: a compiled copy of the model, steps without training); two steps
        in a row with one start the count again (a skipped batch)."""
        self._step_calls += 1
        forward = self._forwards != self._forwards_at_step
        self._forwards_at_step = self._forwards
        if forward and self._forward_in_last_step:
            self._doubled = 0
        elif not forward and not self._doubled_off:
            if self._forward_in_last_step:
                self._doubled += 1
            elif self._forwards:
                self._doubled_off = True
            if self._doubled == 2 and not self._doubled_off:
                self._doubled_off = True
                warnings.warn(f"dynascope: run.step() is called twice per training step (at step {self.step_index} "
                              "and before, no forward pass of the model since the previous run.step()): the step "
                              "axis counts every call; call run.step() once per training step",
                              RuntimeWarning, stacklevel=3)
        self._forward_in_last_step = forward

    def _take(self, outcome: StepOutcome) -> None:
        """An instrument's rows, marks and events of this step; on an event, a burst of recording steps and
        the snapshot."""
        self._host_rows.extend(outcome.rows)
        self._burst_until = max(self._burst_until, outcome.burst_until)
        if self.writer:
            for line in outcome.messages:
                print(line, file=sys.stderr, flush=True)
        if self.store is not None:
            for mark in outcome.marks:
                self.store.mark(*mark)
        if outcome.events and self.snapshotter is not None:
            first = min(outcome.events, key=lambda e: e.step)
            self._snapshot(lambda keeper: keeper.write(self.store, first.kind, first.step))

    def _snapshot(self, work: Any) -> None:
        """Take or write a snapshot; a failure (a state that does not copy or pickle) turns snapshots off
        with one warning instead of stopping training."""
        keeper = self.snapshotter
        assert keeper is not None
        try:
            work(keeper)
        except Exception as exc:  # noqa: BLE001 - probing never stops training
            self.snapshotter = None
            self._host_rows.append((self.step_index, "diagnostic.failed", "snapshot", 1.0))
            warnings.warn(f"dynascope: snapshot_every is off from step {self.step_index} ({type(exc).__name__}: "
                          f"{exc}); training goes on unchanged", RuntimeWarning, stacklevel=4)

    def _buffer(self, step: int, c: Collected) -> None:
        """Keep a step's statistics on the device until the flush; in one process finish them at once
        (no reduction to wait for), under torch.distributed keep the statistics for the reducer."""
        self._device_buf.append((step, c.local_values() if self.reducer is None else None, c))

    def add_listener(self, listener: Any) -> None:
        """Call ``listener(rows)`` with the ``(step, metric, layer, value)`` rows of every
        flush on the writing rank (e.g. a TensorBoard mirror); its ``close()``, if it
        has one, runs when the session closes."""
        self._listeners.append(listener)

    def log(self, metric: str, value: float, layer: str = "", step: int | None = None) -> None:
        """Record one extra scalar row (host value) at ``step`` (default: current)."""
        self._host_rows.append((self.step_index if step is None else step, metric, layer, float(value)))

    def mark(self, key: str, value: Any) -> None:
        """Mark an event at the current step, e.g. ``run.mark("task", 3)`` at a task boundary."""
        if self.store is not None:
            self.store.mark(self.step_index, key, value)

    def _log_row(self, step: int, metric: str, layer: str, value: float) -> None:
        self._host_rows.append((step, metric, layer, float(value)))

    def _write_artifact(self, name: str, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.write_artifact(name, step, arrays, meta)

    # -- flushing ------------------------------------------------------------------
    def flush(self) -> None:
        """Move every buffered value to the host in one transfer and write it."""
        rows: list[tuple[int, str, str, float]] = list(self._host_rows)
        scalar_tensors = [v for _, _, v in self._scalar_buf if isinstance(v, torch.Tensor)]
        if self.reducer is not None:  # statistics reduced over the ranks, then each probe's finish
            device_parts = self.reducer.values([c for _, _, c in self._device_buf], scalar_tensors)
        else:
            device_parts = [v for _, v, _ in self._device_buf if v is not None] + [v.reshape(1) for v in scalar_tensors]
        host = _to_host([p.reshape(-1).float() for p in device_parts])
        pos = 0
        for s, _, c in self._device_buf:
            n = len(c.keys)
            vals = host[pos:pos + n]
            pos += n
            fvals = vals.tolist()  # Python floats in one call
            rows.extend([(s, m, lay, v) for (m, lay), v in zip(c.keys, fvals)])
            if c.post is not None:
                lookup = dict(zip(c.keys, fvals))
                rows.extend((s, m, lay, float(v)) for m, lay, v in c.post(lookup))
        for s, k, v in self._scalar_buf:
            if isinstance(v, torch.Tensor):
                rows.append((s, k, "", float(host[pos])))
                pos += 1
            else:
                rows.append((s, k, "", float(v)))
        if self.store is not None and rows:
            self.store.write_scalars(rows)
            for listener in self._listeners:
                listener(rows)
        self._device_buf.clear()
        self._scalar_buf.clear()
        self._host_rows.clear()
        self._recorded_since_flush = 0
        self._last_flush = time.monotonic()

    def close(self, failed: bool = False, error: BaseException | None = None) -> None:
        """Detach everything, run end-of-run diagnostics, flush and finish the metadata."""
        if not self._open:
            return
        self._open = False
        if not failed and self._step_calls == 0:
            warnings.warn(f"dynascope: run.step() was never called: nothing was recorded in {self.run_dir} (call "
                          "run.step(loss=loss) once per training step inside the `with dynascope.probe(...)` "
                          "block)", RuntimeWarning, stacklevel=3)
        self._set_recording(False)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        ClipWatch.remove(self._on_clip)
        if self._dynamo_patch is not None:
            self._dynamo_patch.__exit__(None, None, None)
            self._dynamo_patch = None
        try:
            if not failed:
                for inst in self.instruments:
                    inst.end_run(max(self.step_index - 1, 0))
        finally:
            for inst in self.instruments:
                inst.close()
            self.ctx.step_batch = None
            try:
                self.flush()
            finally:
                if self.store is not None:
                    meta: dict[str, Any] = {
                        "end_time": now_iso(),
                        "wall_time_s": time.monotonic() - self._t0 + float(self.store.meta.get("wall_time_s", 0.0)
                                                                          if self.store.resumed else 0.0),
                        "steps": self.step_index,
                        "status": ("interrupted" if isinstance(error, KeyboardInterrupt) else "failed") if failed
                        else "finished",
                        "coverage": [r.as_dict() for r in self._coverage_rows()],
                    }
                    if error is not None:
                        meta["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()[:2000]
                    self.store.write_meta(meta)
                    self.store.close()
                for listener in self._listeners:
                    if callable(getattr(listener, "close", None)):
                        listener.close()


def _to_host(parts: list[torch.Tensor]) -> np.ndarray:
    """Concatenate device tensors and copy them to the host: one transfer per device."""
    if not parts:
        return np.zeros(0)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(parts):
        by_device.setdefault(t.device, []).append(i)
    if len(by_device) == 1:
        return torch.cat(parts).cpu().numpy().astype(np.float64)
    out: list[np.ndarray | None] = [None] * len(parts)
    for _, idx in by_device.items():
        flat = torch.cat([parts[i] for i in idx]).cpu().numpy()
        pos = 0
        for i in idx:
            n = parts[i].numel()
            out[i] = flat[pos:pos + n]
            pos += n
    return np.concatenate(out).astype(np.float64)  # type: ignore[arg-type]


def probe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    every: int = 10,
    **options: Any,
) -> Session:
    """Record a training run. Use as ``with dynascope.probe(model, opt, "runs/x") as run: ... run.step(loss=loss)``.

    ``optimizer``: one optimizer, a sequence of them, or None.
    Options (keywords): ``probes`` (subset of ``("activations", "gradients",
    "updates", "batchnorm")`` (the default), the opt-in ``"distance"`` and
    ``"spectral"``, and/or Probe instances), ``sentinel`` (True: every-step norms,
    events and early warnings, see :class:`dynascope.Sentinel`; False: off),
    ``snapshot_every`` (K: keep the model, optimizer and RNG state of every K-th
    step in host memory and write it into the run on an event, see
    :mod:`dynascope.capture.snapshot`), ``modules`` (type, glob pattern,
    list or predicate selecting modules), ``all_params`` (also 1-D
    parameters in weight/update metrics), ``curvature`` / ``landscape`` /
    ``plasticity`` / ``scheduled`` (periodic diagnostics), ``resume`` /
    ``overwrite`` (an existing run directory is otherwise refused), ``name``,
    ``seed``, ``blocks`` / ``branches`` (modules that form the depth axis of
    the signal propagation plot and the residual branches), ``flush_every``,
    ``flush_seconds``, ``meta`` (extra JSON-able metadata), ``tensorboard`` (a log
    directory or a ``SummaryWriter``: every flushed scalar is mirrored there too).
    Under ``torch.distributed`` the statistics are those of the global batch and
    model and only rank 0 writes (see ``dynascope.capture.distributed``).
    """
    return Session(model, optimizer, run_dir, every=every, **options)

