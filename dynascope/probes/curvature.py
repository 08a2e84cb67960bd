"""Scheduled curvature: sharpness, trace, spectrum and per-layer sharpness of a
fixed probe batch (or of each step's own batch, ``batch="step"``) during
training, beside the optimizer's stability threshold.

Recorded (see docs/curvature.md):

* ``hessian.eig`` (layer "1".."k"): top-k Hessian eigenvalues, descending;
* ``hessian.threshold``: 2/lr (SGD), (2 + 2 beta)/lr (heavy ball), ... from the
  optimizer's current hyper-parameters; for Adam/AdamW the threshold of the
  preconditioned sharpness (2 + 2 beta1)/((1 - beta1) lr);
* ``hessian.precond_eig`` (layer "1"): lambda_1(P^-1/2 H P^-1/2) with Adam's P;
* ``hessian.trace`` and ``hessian.trace_stderr`` when ``trace=True``, with
  ``hessian.trace_estimator`` (layer: "exact", "hutch++" or "hutchinson"; value:
  the Hessian-vector products the trace spent);
* ``hessian.layer_eig`` (layer = module name) when ``layers=True``;
* ``hessian.n_hvp``: Hessian-vector products spent at this step;
* artifact ``hessian.spectrum`` (arrays ``grid``, ``density``, ``nodes``,
  ``weights``) when ``spectrum=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..diagnostics._batch import Forward, LossFn
from ..diagnostics.hessian import (
    TRACE_METHODS,
    TraceMethod,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    layer_sharpness,
)
from ..diagnostics.stability import _adam_like, preconditioned_sharpness, stability_threshold
from .scheduled import Scheduled, ScheduledContext, step_batch

__all__ = ["Curvature"]


class Curvature(Scheduled):
    """Curvature of the loss on a fixed ``batch`` every ``every`` steps.

    ``batch``: a fixed ``(inputs, targets)`` pair (or a list of pairs), or ``"step"``:
    each due step's own batch, as handed to ``run.step(loss, batch=(inputs, targets))``
    (measured at the weights ``run.step`` sees, i.e. after that step's update when
    ``run.step`` follows ``optimizer.step()``; a due step without a batch records
    ``diagnostic.failed``).
    ``eigenvalues=False`` skips the top-k eigenvalues (e.g. only the trace).
    ``preconditioned``: "auto" (when the optimizer is Adam/AdamW and has
    state), True or False. ``tol`` is the eigenvalue residual tolerance.
    The trace (``trace=True``) by ``trace_method``: "auto" (default: "exact" when the
    selected parameters number at most ``trace_exact_max`` (2048), else "hutch++"),
    "exact" (the Hessian's diagonal from one product per unit vector), "hutch++"
    (Meyer et al. 2021: ``trace_rank`` deflation directions, then Hutchinson on the
    residual until the relative standard error is <= ``trace_rel_stderr``, default
    0.02) or "hutchinson" (Rademacher probes; stops only on ``trace_stderr`` or
    ``trace_rel_stderr`` when given: the results of dynascope <= 0.2).
    ``trace_samples`` is the budget of probe vectors (default 50 for Hutchinson, 200
    residual vectors for Hutch++). ``spectrum_iter``/``spectrum_runs`` the SLQ
    size. ``mode`` is the mode the operator is evaluated in (default "eval").
    """

    name = "curvature"

    def __init__(
        self,
        every: int | None = 200,
        *,
        batch: Any,
        loss_fn: LossFn,
        k: int = 3,
        eigenvalues: bool = True,
        trace: bool = False,
        spectrum: bool = False,
        layers: bool = False,
        preconditioned: bool | Literal["auto"] = "auto",
        at: Sequence[int] | str | None = None,
        tol: float = 1e-3,
        max_iter: int | None = None,
        trace_samples: int | None = None,
        trace_stderr: float | None = None,
        trace_method: TraceMethod = "auto",
        trace_rel_stderr: float | None = None,
        trace_rank: int | None = None,
        trace_exact_max: int = 2048,
        spectrum_iter: int = 60,
        spectrum_runs: int = 1,
        params: Any = None,
        forward: Forward | None = None,
        mode: Literal["eval", "train", "current"] = "eval",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every=every, at=at)
        if not callable(loss_fn):
            raise TypeError(f"Curvature: loss_fn must be callable, got {type(loss_fn).__name__}")
        if batch is None:
            raise ValueError("Curvature: give batch=(inputs, targets) (a fixed probe batch, or a list of pairs), or "
                             "batch='step' (each step's own, from run.step(loss, batch=...))")
        if isinstance(batch, str) and batch != "step":
            raise ValueError(f"Curvature: batch must be (inputs, targets), a list of pairs or 'step', got {batch!r}")
        if trace_method not in TRACE_METHODS:
            raise ValueError(f"Curvature: trace_method must be one of {', '.join(TRACE_METHODS)}, got "
                             f"{trace_method!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Curvature: k must be a positive integer, got {k!r}")
        if preconditioned not in (True, False, "auto"):
            raise ValueError(f"Curvature: preconditioned must be True, False or 'auto', got {preconditioned!r}")
        # a generator would be consumed by the first call: keep a list
        self.batch = batch if isinstance(batch, (tuple, list, str)) else list(batch)
        self.loss_fn = loss_fn
        self.k = k
        self.eigenvalues = eigenvalues
        self.trace = trace
        self.spectrum = spectrum
        self.layers = layers
        self.preconditioned = preconditioned
        self.tol = tol
        self.max_iter = max_iter
        self.trace_samples = trace_samples
        self.trace_stderr = trace_stderr
        self.trace_method = trace_method
        self.trace_rel_stderr = trace_rel_stderr
        self.trace_rank = trace_rank
        self.trace_exact_max = trace_exact_max
        self.spectrum_iter = spectrum_iter
        self.spectrum_runs = spectrum_runs
        self.params = params
        self.forward = forward
        self.mode = mode
        self.dtype = dtype
        self.seed = seed

    def _common(self) -> dict[str, Any]:
        return dict(params=self.params, forward=self.forward, dtype=self.dtype, mode=self.mode, progress=False)

    def run(self, ctx: ScheduledContext) -> None:
        model, opt = ctx.model, ctx.optimizer
        batch = step_batch(self, self.batch, ctx)
        seed = self.seed + int(ctx.step)
        n_hvp = 0
        if self.eigenvalues:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                eig = hessian_eigenvalues(model, self.loss_fn, batch, k=self.k, tol=self.tol,
                                          max_iter=self.max_iter, seed=seed, **self._common())
            if caught:
                warnings.warn(f"Curvature at step {ctx.step}: {caught[0].message}", RuntimeWarning, stacklevel=2)
            n_hvp += eig.n_hvp
            for i, v in enumerate(eig.eigenvalues, start=1):
                ctx.log("hessian.eig", float(v), str(i))
            ctx.log("hessian.eig_converged", float(eig.all_converged))
        several = len(ctx.optimizers) > 1
        adam = opt is not None and _adam_like(opt) and not several
        if opt is not None and not several:
            try:
                ctx.log("hessian.threshold", stability_threshold(opt))
            except TypeError:
                pass  # optimizer without a known threshold: nothing to draw
        # several optimizers: no whole-model threshold (each parameter follows its own optimizer); the
        # per-layer sharpness is compared with its own optimizer's threshold (hessian.layer_threshold below)
        want_pre = self.preconditioned is True or (self.preconditioned == "auto" and adam)
        if want_pre:
            if not adam:
                raise TypeError(f"Curvature(preconditioned=True) needs Adam or AdamW, got {type(opt).__name__}")
            try:
                pre = preconditioned_sharpness(model, self.loss_fn, batch, opt, k=1, tol=self.tol,
                                               max_iter=self.max_iter, seed=seed, forward=self.forward,
                                               dtype=self.dtype, mode=self.mode, progress=False)
            except ValueError:
                if self.preconditioned is True and ctx.step > 0:
                    raise
                pre = None  # no Adam state before the first step
            if pre is not None:
                n_hvp += pre.n_hvp
                ctx.log("hessian.precond_eig", float(pre.eigenvalues[0]), "1")
        if self.trace:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                budget = self.trace_samples
                if budget is None:
                    budget = 50 if self.trace_method == "hutchinson" else 200  # Hutchinson: dynascope <= 0.2's
                tr = hessian_trace(model, self.loss_fn, batch, n_samples=budget, target_stderr=self.trace_stderr,
                                   seed=seed, method=self.trace_method, target_rel_stderr=self.trace_rel_stderr,
                                   rank=self.trace_rank, exact_max_params=self.trace_exact_max, **self._common())
            if caught:
                warnings.warn(f"Curvature at step {ctx.step}: {caught[0].message}", RuntimeWarning, stacklevel=2)
            n_hvp += tr.n_hvp
            ctx.log("hessian.trace", tr.trace)
            ctx.log("hessian.trace_stderr", tr.stderr)
            ctx.log("hessian.trace_estimator", float(tr.n_hvp), tr.method)
        if self.layers:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ls = layer_sharpness(model, self.loss_fn, batch, tol=self.tol, max_iter=self.max_iter, seed=seed,
                                     **self._common())
            n_hvp += ls.n_hvp
            for name, v in zip(ls.names, ls.eigenvalues):
                ctx.log("hessian.layer_eig", float(v), name)
            if several:
                for name in ls.names:
                    thr = _own_threshold(model, name, ctx.optimizers)
                    if thr is not None:
                        ctx.log("hessian.layer_threshold", thr, name)
        if self.spectrum:
            sp = hessian_spectrum(model, self.loss_fn, batch, n_runs=self.spectrum_runs,
                                  n_iter=self.spectrum_iter, seed=seed, **self._common())
            n_hvp += sp.n_hvp
            ctx.save_artifact(
                "hessian.spectrum",
                {"grid": sp.grid, "density": sp.density, "nodes": sp.nodes, "weights": sp.weights},
                {"sigma_squared": sp.sigma_squared, "n_params": sp.n_params, "n_iter": int(sp.nodes.shape[1]),
                 "n_runs": int(sp.nodes.shape[0]), "mode": self.mode, "step": int(ctx.step)},
            )
        ctx.log("hessian.n_hvp", float(n_hvp))


def _own_threshold(model: Any, name: str, optimizers: list[Any]) -> float | None:
    """The stability threshold of the optimizer that owns every parameter of module (or parameter)
    ``name``; None when they belong to several optimizers, to none, or it has no known threshold."""
    try:
        ps = list(model.get_submodule(name).parameters())
    except AttributeError:
        ps = [model.get_parameter(name)]
    ids = {id(p) for p in ps}
    owners = [o for o in optimizers if ids & {id(p) for g in o.param_groups for p in g["params"]}]
    if len(owners) != 1:
        return None
    try:
        return float(stability_threshold(owners[0]))
    except TypeError:
        return None
