"""Cockpit's per-example quantities (Schneider, Dangel and Hennig 2021, ``cockpit/quantities/*.py`` of
``cockpit-for-pytorch`` 1.0.2) as one pure function, :func:`gradient_tests`.

Notation: a batch of ``B`` examples, the mean loss ``L = (1/B) sum_i l_i``, per-example gradients
``g_i = grad l_i`` (:mod:`dynascope.diagnostics.per_example`; Cockpit's ``B * batch_grad``), the mean
gradient ``gbar = grad L``, per coordinate ``j`` the second moment ``m2_j = (1/B) sum_i g_ij^2``, the
Hessian diagonal ``h = diag(grad^2 L)``, and ``P`` the number of parameter coordinates. Each formula is
Cockpit's written with these (its ``sum_grad_squared`` is ``m2 / B``, its ``batch_l2`` is
``|g_i|^2 / B^2``, its ``batch_dot`` summed over one index is ``<g_i, gbar> / B``):

* ``gsnr`` (``MeanGSNR``, Liu et al. 2020): ``mean_j gbar_j^2 / (m2_j - gbar_j^2 + 1e-5)``.
* ``norm_test`` (``NormTest``, Byrd et al. 2012, eq. 3.9): ``sqrt(V / (B |gbar|^2))`` with
  ``V = (sum_i |g_i|^2 - B |gbar|^2) / (B - 1)``.
* ``inner_test`` (``InnerTest``, Bollapragada et al. 2018, eq. 2.6): ``sqrt(V_p / (B |gbar|^4))`` with
  ``V_p = (sum_i <g_i, gbar>^2 - B |gbar|^4) / (B - 1)``.
* ``ortho_test`` (``OrthoTest``, Bollapragada et al. 2018, eq. 3.3): ``sqrt(V_o / (B |gbar|^2))`` with
  ``V_o = (sum_i |g_i|^2 - sum_i <g_i, gbar>^2 / |gbar|^2) / (B - 1)``.
* ``cabs`` (``CABS``, Balles et al. 2017, eq. 22): ``lr * sum_j (m2_j - gbar_j^2) / L`` (needs ``lr``;
  Cockpit also requires plain SGD without momentum).
* ``eb_criterion`` (``EarlyStopping``, Mahsereci et al. 2017, eq. 7):
  ``1 - B mean_j gbar_j^2 / (s_j + 1e-5)`` with ``s_j = B (m2_j - gbar_j^2) / (B - 1)``.
* ``tic_diag`` (``TICDiag``, Thomas et al. 2020): ``sum_j m2_j / (h_j + 1e-7)``;
  ``tic_trace`` (``TICTrace``): ``sum_j m2_j / (sum_j h_j + 1e-7)``. Cockpit takes ``h`` from BackPACK's
  exact ``DiagHessian``; here ``h`` is exact too: one Hessian-vector product per coordinate (unit vectors,
  batched), so it is only computed up to ``tic_max_params`` coordinates (else NaN and a note).
* ``hist1d`` (``GradHist1d``): counts of the ``B P`` per-example gradient elements clipped into
  ``range`` (default ``(-2, 2)``, 100 bins, ``torch.histc``); ``hist2d`` (``GradHist2d``): per-example
  gradient elements (x, default ``(-1, 1)``, 40 bins) against the parameter's value (y, ``(-2, 2)``,
  50 bins), both clipped to half a bin inside the range, as Cockpit's ``histogram2d``.

Unused parameters count as zero gradients. Cockpit computes them on the training step's batch in
training mode; here on the batch given, in ``mode`` (default "eval"), with BatchNorm in training mode
handled as :mod:`~dynascope.diagnostics.per_example` says (``notes``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.checks import check_mode, one_of, set_mode
from ..core.guard import preserved_state
from . import _dist
from ._batch import Forward, LossFn, batch_size, default_forward, trainable_named_parameters
from .per_example import (
    MEMORY_BYTES,
    BatchNormFallback,
    Engine,
    HistSpec,
    PerExampleGrads,
    compute_per_example,
    prepare_batchnorm,
    single_pair,
)

__all__ = ["GradientTestsResult", "Histogram1d", "Histogram2d", "gradient_tests", "tests_from_statistics",
           "hessian_diagonal", "GSNR_EPS", "EB_EPS", "TIC_EPS"]

GSNR_EPS = 1e-5  # MeanGSNR's epsilon
EB_EPS = 1e-5  # EarlyStopping's epsilon (its code's default; its docstring says 0.0)
TIC_EPS = 1e-7  # TIC's epsilon


@dataclass(frozen=True)
class Histogram1d:
    """Counts per bin (``bins``) and the ``bins + 1`` edges."""

    counts: np.ndarray
    edges: np.ndarray


@dataclass(frozen=True)
class Histogram2d:
    """Counts (``x bins x y bins``: per-example gradient elements on x, parameter values on y) and the edges."""

    counts: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray


@dataclass(frozen=True)
class GradientTestsResult:
    """Cockpit's per-example quantities on one batch (formulas: :mod:`dynascope.diagnostics.gradient_tests`).
    ``cabs`` is NaN without ``lr``; ``tic_*`` are NaN when the Hessian diagonal was not computed;
    ``methods``: how each parameter's per-example gradients were obtained; ``notes``: fallbacks taken."""

    batch_size: int
    loss: float
    grad_norm: float
    gsnr: float
    norm_test: float
    inner_test: float
    ortho_test: float
    cabs: float
    eb_criterion: float
    tic_trace: float
    tic_diag: float
    hist1d: Histogram1d | None = field(repr=False)
    hist2d: Histogram2d | None = field(repr=False)
    methods: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def tests_from_statistics(stats: PerExampleGrads, hdiag: torch.Tensor | None = None, lr: float | None = None
                          ) -> dict[str, float]:
    """The scalar quantities from per-example statistics (and the Hessian diagonal, flat, for TIC)."""
    b = stats.batch_size
    gbar = torch.cat([g.reshape(-1) for g in stats.grad]).to(torch.float64)
    g2 = gbar.square()
    gsq = float(g2.sum())
    sq = stats.sq_norms.to(torch.float64)
    dots = stats.dots.to(torch.float64)
    v_norm = (float(sq.sum()) - b * gsq) / (b - 1)
    v_inner = (float(dots.square().sum()) - b * gsq**2) / (b - 1)
    v_ortho = (float(sq.sum()) - float(dots.square().sum()) / gsq) / (b - 1) if gsq > 0 else math.nan
    out = {
        "grad_norm": math.sqrt(gsq),
        "norm_test": _sqrt(v_norm / (b * gsq)) if gsq > 0 else math.nan,
        "inner_test": _sqrt(v_inner / (b * gsq**2)) if gsq > 0 else math.nan,
        "ortho_test": _sqrt(v_ortho / (b * gsq)) if gsq > 0 else math.nan,
    }
    if stats.second_moment is not None:
        m2 = torch.cat([m.reshape(-1) for m in stats.second_moment]).to(torch.float64)
        var = m2 - g2
        out["gsnr"] = float((g2 / (var + GSNR_EPS)).mean())
        out["eb_criterion"] = 1.0 - b * float((g2 / (b * var / (b - 1) + EB_EPS)).mean())
        out["cabs"] = float(lr) * float(var.sum()) / stats.loss if lr is not None else math.nan
        if hdiag is not None:
            h = hdiag.to(torch.float64)
            out["tic_diag"] = float((m2 / (h + TIC_EPS)).sum())
            out["tic_trace"] = float(m2.sum()) / (float(h.sum()) + TIC_EPS)
    return out


class _Share:
    """Under torch.distributed: this rank's ``n`` examples of the global batch of ``total`` (one all_reduce),
    and the global statistics from every rank's (the per-example rows gathered in rank order, the means
    weighted ``n / total`` and summed, the histogram counts summed), each through diagnostics/_dist.py's
    checkpointed collectives. The per-example dot products are taken with the global mean gradient
    (``mean``, the ``combine`` of :func:`~dynascope.diagnostics.per_example.compute_per_example`), so the
    quantities are one process's on the concatenated batch."""

    def __init__(self, n: int, owner: str) -> None:
        self.n, self.total = int(n), int(_dist.sum_number(n))
        if self.total < 2:
            raise ValueError(f"{owner}: the per-example statistics need a batch of at least 2 examples, got "
                             f"{self.total}")

    def mean(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``sum_r (n_r / N) t_r`` of each tensor (every rank's, weighted by its share of the batch)."""
        w = self.n / self.total
        flat = _dist.reduce_sum(lambda: torch.cat([t.reshape(-1) * w for t in parts]))
        return [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in parts]), parts)]

    def global_statistics(self, stats: PerExampleGrads) -> PerExampleGrads:
        """``stats`` of this rank's examples (its dot products already with the global mean gradient, ``grad``
        the global one) made the global batch's."""
        rows = torch.stack([stats.sq_norms.to(torch.float64), stats.dots.to(torch.float64)], 1)
        (rows,) = _dist.gather_rows(rows)
        loss = float(self.mean([torch.tensor([stats.loss], dtype=torch.float64)])[0])
        m2 = tuple(self.mean(list(stats.second_moment))) if stats.second_moment is not None else None
        h1 = h2 = None
        if stats.hist1d is not None:
            counts, edges = stats.hist1d
            h1 = (_dist.reduce_sum(counts.clone), edges)
        if stats.hist2d is not None:
            counts2, x_edges, y_edges = stats.hist2d
            h2 = (_dist.reduce_sum(counts2.clone), x_edges, y_edges)
        return replace(stats, batch_size=self.total, loss=loss, sq_norms=rows[:, 0], dots=rows[:, 1],
                       second_moment=m2, hist1d=h1, hist2d=h2)


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


def hessian_diagonal(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: list[nn.Parameter],
                     forward: Forward, memory_bytes: int = MEMORY_BYTES) -> torch.Tensor:
    """The exact diagonal of the Hessian of the mean loss (flat, over ``params`` in order): ``(H e_j)_j`` for
    every unit vector ``e_j``, a batch of unit vectors per double backward pass (``is_grads_batched``) or one
    at a time, whichever the first two chunks time faster (one at a time where an operation has no batching
    rule). On the model as it is (the caller guards it); attention
    through ``scaled_dot_product_attention`` uses its math kernel (the fused CPU kernels have no double
    backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        return _hessian_diagonal(model, loss_fn, inputs, targets, params, forward, memory_bytes)


def _hessian_diagonal(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, params: list[nn.Parameter],
                      forward: Forward, memory_bytes: int) -> torch.Tensor:
    loss = loss_fn(forward(model, inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    total = int(offsets[-1])
    device, dtype = params[0].device, params[0].dtype
    diag = torch.zeros(total, dtype=dtype, device=device)
    if not live:
        return diag
    outs = [g for _, g in live]
    k = max(1, min(64, memory_bytes // max(1, 16 * total * params[0].element_size())))

    def hvp_rows(start: int, stop: int, batched: bool) -> torch.Tensor:
        """Rows ``j = start..stop-1`` of ``H``'s diagonal."""
        m = stop - start
        cols = torch.arange(start, stop, device=device)
        vecs = []
        for i, g in live:
            e = torch.zeros(m, g.numel(), dtype=dtype, device=device)
            lo = int(offsets[i])
            inside = (cols >= lo) & (cols < lo + g.numel())
            e[inside.nonzero().squeeze(1), (cols[inside] - lo)] = 1.0
            vecs.append(e.reshape(m, *g.shape))
        if batched:
            hv = torch.autograd.grad(outs, params, grad_outputs=vecs, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
            flat = torch.cat([torch.zeros(m, p.numel(), dtype=dtype, device=device) if h is None
                              else h.reshape(m, -1) for p, h in zip(params, hv)], 1)
        else:
            rows = []
            for r in range(m):
                hv = torch.autograd.grad(outs, params, grad_outputs=[v[r] for v in vecs], retain_graph=True,
                                         allow_unused=True)
                rows.append(torch.cat([torch.zeros(p.numel(), dtype=dtype, device=device) if h is None
                                       else h.reshape(-1) for p, h in zip(params, hv)]))
            flat = torch.stack(rows)
        return flat[torch.arange(m, device=device), cols]

    # the batched double backward (vmap) is faster on some models and several times slower on others (e.g.
    # pooling layers): the first two chunks time both ways and the faster one does the rest
    batched: bool | None = None
    spent: dict[bool, float] = {}
    for s in range(0, total, k):
        e = min(total, s + k)
        way = batched if batched is not None else (True not in spent)
        t0 = time.perf_counter()
        if way:
            try:
                diag[s:e] = hvp_rows(s, e, True)
            except RuntimeError:  # an operation without a batching rule: one product at a time
                batched, way = False, False
                diag[s:e] = hvp_rows(s, e, False)
        else:
            diag[s:e] = hvp_rows(s, e, False)
        if batched is None:
            spent[way] = (time.perf_counter() - t0) / (e - s)
            if len(spent) == 2:
                batched = spent[True] <= spent[False]
    return diag


def gradient_tests(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    lr: float | None = None,
    params: Any = None,
    forward: Forward | None = None,
    mode: Literal["eval", "train", "current"] = "eval",
    engine: Engine = "auto",
    batchnorm: BatchNormFallback = "eval",
    hist1d: bool = True,
    hist2d: bool = True,
    hist1d_bins: int = 100,
    hist1d_range: tuple[float, float] = (-2.0, 2.0),
    hist2d_bins: tuple[int, int] = (40, 50),
    hist2d_range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0)),
    tic: bool = True,
    tic_max_params: int = 20_000,
    memory_bytes: int = MEMORY_BYTES,
) -> GradientTestsResult:
    """Cockpit's per-example quantities on one ``(inputs, targets)`` batch with ``loss_fn`` the MEAN loss.

    ``lr``: the learning rate CABS needs (NaN without it). ``hist1d`` / ``hist2d``: build the histograms
    (they need the per-example gradient elements: the expensive part for large layers; bins and ranges as
    Cockpit's defaults). ``tic``: compute TIC from the exact Hessian diagonal (one Hessian-vector product per
    coordinate) when the selection has at most ``tic_max_params`` coordinates, else NaN with a note.
    ``engine``, ``batchnorm``, ``mode``, ``params``, ``forward``, ``memory_bytes``: as
    :func:`dynascope.diagnostics.per_example.per_example_gradients`. The model, ``.grad``, buffers, modes
    and the RNG are restored.

    Under torch.distributed (DDP, FSDP2) each rank passes its shard of the batch (at least one example; the
    global batch at least two) and every rank gets the quantities of the concatenated batch: the mean
    gradient, the second moments and the Hessian diagonal are every rank's weighted by its share and summed,
    the dot products ``<g_i, gbar>`` are taken with that global mean, the per-example rows gathered and the
    histogram counts summed (FSDP2: on the whole parameters, gathered for the call).
    """
    owner = "gradient_tests"
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable, got {type(loss_fn).__name__}")
    check_mode(mode, owner)
    one_of("engine", engine, ("auto", "func", "loop"), owner)
    one_of("batchnorm", batchnorm, ("eval", "loop"), owner)
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)):
        raise ValueError(f"{owner}: lr must be a finite number or None, got {lr!r}")
    distributed = _dist.active()
    model = _dist.unwrap(model)  # DDP, torch.compile: the module itself (diagnostics/_dist.py)
    inputs, targets = single_pair(batch, owner, min_examples=1 if distributed else 2)
    share = _Share(batch_size(inputs), owner)  # this rank's part of the global batch (one process: all of it)
    with _dist.gathered(model):  # FSDP2: the whole parameters, plain, for the call
        named = trainable_named_parameters(model, params)
        fwd = forward or default_forward
        h1 = HistSpec(int(hist1d_bins), tuple(hist1d_range)) if hist1d else None
        h2 = HistSpec(tuple(hist2d_bins), tuple(tuple(r) for r in hist2d_range)) if hist2d else None
        with preserved_state(model, params=False), torch.enable_grad():
            set_mode(model, mode)
            eng, notes = prepare_batchnorm(model, batchnorm, engine, owner)
            stats = compute_per_example(model, loss_fn, inputs, targets, named, forward=fwd, engine=eng,
                                        second_moment=True, hist1d=h1, hist2d=h2, memory_bytes=memory_bytes,
                                        owner=owner, notes=notes, combine=share.mean if distributed else None)
            hdiag = None
            n_params = sum(p.numel() for _, p in named)
            if tic and n_params <= tic_max_params:
                if eng == "loop":
                    notes.append("TIC: the Hessian diagonal of the batch loss with BatchNorm in training mode is "
                                 "not the per-example loop's: TIC left out")
                else:
                    hdiag = hessian_diagonal(model, loss_fn, inputs, targets, [p for _, p in named], fwd,
                                             memory_bytes)
                    if distributed:
                        hdiag = share.mean([hdiag])[0]
            elif tic:
                notes.append(f"TIC: {n_params} parameter coordinates > tic_max_params={tic_max_params} (the exact "
                             "Hessian diagonal takes one Hessian-vector product per coordinate): TIC left out")
        if distributed:
            stats = share.global_statistics(stats)
    q = tests_from_statistics(stats, hdiag, lr)
    nan = math.nan
    hist_1 = Histogram1d(stats.hist1d[0].cpu().numpy(), stats.hist1d[1].cpu().numpy()) if stats.hist1d else None
    hist_2 = Histogram2d(*(t.cpu().numpy() for t in stats.hist2d)) if stats.hist2d else None
    return GradientTestsResult(stats.batch_size, stats.loss, q["grad_norm"], q.get("gsnr", nan), q["norm_test"],
                               q["inner_test"], q["ortho_test"], q.get("cabs", nan), q.get("eb_criterion", nan),
                               q.get("tic_trace", nan), q.get("tic_diag", nan), hist_1, hist_2,
                               dict(stats.methods), tuple(notes))
