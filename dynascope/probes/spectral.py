"""Spectral norms of the weights and of their updates (opt-in probe
``"spectral"``; Miyato et al. 2018, Spectral Normalization; Bernstein and
Newhouse 2024, Old Optimizer, New Norm).

For every trainable weight with ndim >= 2, viewed as the matrix
``W = w.flatten(1)`` of shape (fan_out, fan_in), and the step's update
``D = W_{t+1} - W_t`` (optimizer step pre- and post-hooks):

* ``weight.spectral_norm`` = sigma_max(W_t) (before the step, as ``weight.norm``);
* ``update.spectral_norm`` = sigma_max(D);
* ``update.rms_to_rms``    = sqrt(fan_in / fan_out) * sigma_max(D), the
  RMS-to-RMS operator norm of the update that modular-norm optimizers (Muon)
  control (Bernstein and Newhouse; Large et al. 2024, Scalable Optimization in
  the Modular Norm).

sigma_max by block power (subspace) iteration on W^T W with ``block`` = 12
orthonormal right vectors and the Ritz value (:func:`power_iteration`),
batched over the weights of one shape (one ``bmm`` per product: reading W once
for 12 vectors costs about what one matrix-vector product does on an
accelerator), warm-started from the previous recording step's block (weights
and updates keep separate blocks). A single vector is not enough: the top
singular values of random-like weights are close, and the top direction swaps
between near-equal ones from step to step (measured: 3-14% error with one
vector and 2-6 iterations). The first recording step starts from random
vectors (a private generator: the global RNG is not touched) with
``cold_iters`` = 30 iterations; later steps run ``iters`` = 3 (weights) and
``update_iters`` = 2 (updates). The weights' block is extended for the
iteration by the ``follow`` = 2 leading vectors of the previous recorded
update's block: a new dominant direction of W is built by the updates, and a
block warm-started from the old top directions alone lags behind it
(``bench_spectral.py --cnn``: a BatchNorm CNN, AdamW, recorded every 2 steps,
worst error over steps 2-28: 2.3e-2 without, 1.3e-3 with, both in the first
10 steps while a dominant direction emerges; below 1e-5 from step 20 in a
run of the same CNN on another batch). The estimate never exceeds sigma_max
(up to rounding).

Defaults from ``benchmarks/bench_spectral.py`` (an MLP trained with SGD and
with AdamW, recording every step and every 10 steps; worst relative error over
layers and warm recording steps against ``torch.linalg.matrix_norm(W, 2)`` in
float64): weights 6.3e-5 (without following the updates 1.1e-4; block 8 needs
5 iterations for 4.6e-4, block 4 stays at 3e-3 after 4), updates 3e-5
(updates are low-rank: 2 iterations are plenty; the 2% target holds from
block 4). Each extra iteration costs two reads of the weights.

Under FSDP2 each rank stacks its rows of the weights and the products are summed over the ranks (one
all_reduce per product; see :func:`power_iteration`).

Cost on a recording step: a stacked copy of the weights before the step and
one after it (transient: two copies of the matrices), and 2 (iters +
update_iters) + 2 batched products with 12 (weights: 14) vectors per shape
(plus a QR of each block and a 12 x 12 top eigenvalue by repeated squaring); state
between recording steps: two blocks of 12 right vectors per matrix. Without
an optimizer only ``weight.spectral_norm`` is recorded (at ``run.step``).
When ``optimizer.step`` runs several times in one recording step, the first
call's update is measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..core.checks import positive_int
from ..diagnostics._dist import all_sum
from ._groups import is_sharded, local_tensor
from .base import Collected, Probe

__all__ = ["SpectralProbe", "power_iteration"]

_TINY = 1e-30


def _orthonormal(v: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning (at least) the columns of ``v`` (k, n, r): Householder QR,
    which stays orthonormal when the columns are dependent (a rank-deficient update makes
    them so; Gram-Schmidt then returns non-orthogonal noise and the Ritz value overshoots)."""
    return torch.linalg.qr(v).Q


def _top_eigenvalue(g: torch.Tensor, squarings: int = 10) -> torch.Tensor:
    """Largest eigenvalue of each symmetric PSD (k, r, r) matrix without ``eigvalsh`` (which
    synchronises a CUDA device with the host):
    the Rayleigh quotients of the columns of G^(2^squarings) (trace-normalised repeated
    squaring), the largest of them. Its relative error is below 1 / (e 2^(squarings+1))
    (1.8e-4 for 10 squarings, in float64) and it never exceeds the eigenvalue."""
    g = g.float() if g.device.type == "mps" else g.double()  # MPS has no float64
    tr = torch.diagonal(g, dim1=1, dim2=2).sum(-1).clamp_min(_TINY)[:, None, None]
    m = g / tr
    for _ in range(squarings):
        m = torch.bmm(m, m)
        m = m / torch.diagonal(m, dim1=1, dim2=2).sum(-1).clamp_min(_TINY)[:, None, None]
    num = (m * torch.bmm(g, m)).sum(1)  # m_j^T G m_j per column j
    den = (m * m).sum(1)
    rq = torch.where(den > 0, num / den.clamp_min(_TINY), torch.zeros_like(num))
    return rq.amax(1)


def power_iteration(a: torch.Tensor, v: torch.Tensor, iters: int,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular value of each matrix of ``a`` (k, m, n) by block power (subspace)
    iteration on A^T A from the right vectors ``v`` (k, n, r), then the Ritz value.

    ``iters`` products V <- A^T A V (columns rescaled to unit norm), one
    orthonormalisation V <- orth(V) at the end (the span is that of orthonormalising
    every iteration: subspace iteration; a few iterations lose no precision in the
    near-top directions that matter), and sigma = sqrt(lambda_max((A V)^T (A V))).
    A block of r vectors tracks the top singular vector when the top singular values
    are close (random-like weights: a single vector then swaps between near-equal
    directions from step to step), converging like (sigma_{r+1} / sigma_1)^(2 iters).
    Returns (sigma (k,), the orthonormal block (k, n, r) to warm-start the next call).
    The estimate never exceeds sigma_max; a zero matrix gives 0 and keeps its block.

    ``reduce``: ``a`` holds this rank's rows of the matrices (FSDP2's ``Shard(0)``) and ``reduce`` sums a
    tensor over the ranks: A^T A V = sum_r A_r^T (A_r V) and (A V)^T (A V) = sum_r (A_r V)^T (A_r V), so every
    rank holds the same replicated V and sigma, those of the whole matrices."""
    total = reduce if reduce is not None else (lambda t: t)
    for _ in range(iters):
        nxt = total(torch.bmm(a.transpose(1, 2), torch.bmm(a, v)))
        nrm = torch.linalg.vector_norm(nxt, dim=1, keepdim=True)  # (k, 1, r)
        v = torch.where(nrm > 0, nxt / nrm.clamp_min(_TINY), v)
    v = _orthonormal(v)
    av = torch.bmm(a, v)
    sigma = _top_eigenvalue(total(torch.bmm(av.transpose(1, 2), av))).clamp_min(0).sqrt().to(a.dtype)
    return sigma, v


class SpectralProbe(Probe):
    """sigma_max of every weight matrix and of its update, by warm-started power iteration."""

    name = "spectral"

    def __init__(self, iters: int = 3, update_iters: int = 2, cold_iters: int = 30, block: int = 12,
                 follow: int = 2, seed: int = 0) -> None:
        for name, v in (("iters", iters), ("update_iters", update_iters), ("cold_iters", cold_iters),
                        ("block", block)):
            positive_int(name, v, owner="SpectralProbe")
        if isinstance(follow, bool) or not isinstance(follow, int) or follow < 0:
            raise ValueError(f"SpectralProbe: follow must be an integer >= 0, got {follow!r}")
        self.block = block
        self.follow = follow
        self.iters = iters
        self.update_iters = update_iters
        self.cold_iters = cold_iters
        self.seed = seed
        self._armed = False
        self._before: list[torch.Tensor] | None = None
        self._pending: Collected | None = None
        self.tracked: list[tuple[str, torch.nn.Parameter]] = []
        self.groups: list[list[int]] = []
        self._vectors: dict[tuple[str, int], torch.Tensor] = {}

    def setup(self, session: Any) -> None:
        super().setup(session)
        self.tracked = [(n, p) for n, p in session.param_names if p.requires_grad and p.ndim >= 2]
        # FSDP2: each rank stacks its rows of the weights (Shard(0)); the power iteration sums over the ranks
        self._sharded = any(is_sharded(p) for _, p in self.tracked)
        buckets: dict[tuple, list[int]] = {}
        for i, (_, p) in enumerate(self.tracked):
            mat = (int(p.shape[0]), math.prod(p.shape[1:]))
            buckets.setdefault((mat, p.dtype, p.device), []).append(i)
        self.groups = list(buckets.values())
        self.names = [self.tracked[i][0] for g in self.groups for i in g]
        # sqrt(fan_in / fan_out) per matrix, in key order
        self._rms = [math.sqrt(math.prod(self.tracked[i][1].shape[1:]) / self.tracked[i][1].shape[0])
                     for g in self.groups for i in g]
        self._gen = torch.Generator().manual_seed(self.seed)

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False
        self._before = None

    def _stack(self, group: list[int]) -> torch.Tensor:
        t = torch.stack([local_tensor(self.tracked[i][1].detach()).reshape(-1, math.prod(self.tracked[i][1].shape[1:]))
                         for i in group])
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    def _sigma(self, kind: str, gi: int, a: torch.Tensor, warm_iters: int) -> torch.Tensor:
        v = self._vectors.get((kind, gi))
        iters = warm_iters
        if v is None or v.device != a.device or v.dtype != a.dtype:
            rows = int(self.tracked[self.groups[gi][0]][1].shape[0])  # the whole matrix's (FSDP2: not the shard's)
            r = min(self.block, rows, a.shape[2])
            v = torch.randn(a.shape[0], a.shape[2], r, generator=self._gen, dtype=torch.float64)
            v = v.to(device=a.device, dtype=a.dtype)
            iters = self.cold_iters
        r = v.shape[2]
        extra = self._vectors.get(("update", gi)) if kind == "weight" and self.follow else None
        if extra is not None and extra.device == a.device and extra.dtype == a.dtype:
            # the recent update's top directions: where a new dominant direction of W comes from
            v = torch.cat([v, extra[:, :, :self.follow]], dim=2)
        sigma, v = power_iteration(a, v, iters, all_sum if self._sharded else None)
        self._vectors[(kind, gi)] = v[:, :, :r]
        return sigma

    def before_optimizer_step(self, optimizer: Any) -> None:
        """W_t before the step's first optimizer step (with several optimizers, Delta W at
        ``collect`` is then the whole step's change, each weight moved by its own optimizer)."""
        if optimizer is None or not self.tracked or self._before is not None:
            return
        with torch.no_grad():
            self._before = [self._stack(g) for g in self.groups]

    def _finish_step(self) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        w_sig, d_sig = [], []
        with torch.no_grad():
            for gi, (g, b) in enumerate(zip(self.groups, before)):
                d = self._stack(g)
                d.sub_(b)  # the stacked copy of W_{t+1} becomes D = W_{t+1} - W_t
                w_sig.append(self._sigma("weight", gi, b, self.iters))
                d_sig.append(self._sigma("update", gi, d, self.update_iters))
            values = torch.cat([torch.cat(w_sig).float(), torch.cat(d_sig).float()])
        keys = [("weight.spectral_norm", n) for n in self.names] + [("update.spectral_norm", n) for n in self.names]
        scale = dict(zip(self.names, self._rms))

        def post(vals: Any) -> list[tuple[str, str, float]]:
            return [("update.rms_to_rms", n, s * vals[("update.spectral_norm", n)]) for n, s in scale.items()]

        self._pending = Collected(keys, values, post)

    def collect(self, step: int) -> Collected | None:
        self._finish_step()  # every optimizer of this step has stepped by now
        out, self._pending = self._pending, None
        if out is not None or not self.tracked:
            return out
        # no optimizer step this recording step (or no optimizer): the weights as they are now
        with torch.no_grad():
            sig = [self._sigma("weight", gi, self._stack(g), self.iters) for gi, g in enumerate(self.groups)]
            values = torch.cat(sig).float()
        return Collected([("weight.spectral_norm", n) for n in self.names], values)

    def close(self) -> None:
        self._armed = False
        self._before = None
        self._pending = None
        self._vectors.clear()
