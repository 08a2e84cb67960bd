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

sigma_max by power iteration on W^T W: ``u = W v / ||W v||``, ``v = W^T u /
||W^T u||``, estimate ``||W^T u||``; batched over the weights of one shape
(one ``bmm`` per product), warm-started from the previous recording step's
right singular vectors (weights and updates keep separate vectors). The
first recording step starts from random vectors (a private generator: the
global RNG is not touched) with ``cold_iters`` iterations; later steps run
``iters`` (weights) and ``update_iters`` (updates) iterations. The estimate
never exceeds sigma_max (it is ||W^T W v|| / ||W v|| for a unit v). Defaults
from tests/test_spectral.py's measurement (short SGD and AdamW runs, every
recording step after the first): 2 weight iterations are within 1e-3 relative
of ``torch.linalg.matrix_norm(W, 2)``, 4 update iterations within 2%.

Cost on a recording step: a stacked copy of the weights before the step and
one after it (transient: two copies of the matrices), and 2 (iters +
update_iters) batched matrix-vector products per shape; state between
recording steps: one left-size and one right-size vector per matrix, twice.
Without an optimizer only ``weight.spectral_norm`` is recorded (at
``run.step``). When ``optimizer.step`` runs several times in one recording
step, the first call's update is measured.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import positive_int
from .base import Collected, Probe

__all__ = ["SpectralProbe", "power_iteration"]

_TINY = 1e-30


def power_iteration(a: torch.Tensor, v: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` power iterations for the top singular value of each matrix of ``a`` (k, m, n)
    from unit right vectors ``v`` (k, n). Returns (sigma (k,), new unit right vectors (k, n)).

    A zero matrix gives sigma 0 and keeps its vector (so a later non-zero update still converges)."""
    sigma = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        u = torch.bmm(a, v.unsqueeze(-1)).squeeze(-1)  # (k, m)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(_TINY)
        w = torch.bmm(u.unsqueeze(1), a).squeeze(1)  # (k, n) = (W^T u)^T
        sigma = torch.linalg.vector_norm(w, dim=1)
        v = torch.where(sigma[:, None] > 0, w / sigma[:, None].clamp_min(_TINY), v)
    return sigma, v


class SpectralProbe(Probe):
    """sigma_max of every weight matrix and of its update, by warm-started power iteration."""

    name = "spectral"

    def __init__(self, iters: int = 2, update_iters: int = 4, cold_iters: int = 30, seed: int = 0) -> None:
        for name, v in (("iters", iters), ("update_iters", update_iters), ("cold_iters", cold_iters)):
            positive_int(name, v, owner="SpectralProbe")
        self.iters = iters
        self.update_iters = update_iters
        self.cold_iters = cold_iters
        self.seed = seed
        self._armed = False
        self._hooks: list[Any] = []
        self._before: list[torch.Tensor] | None = None
        self._pending: Collected | None = None
        self.tracked: list[tuple[str, torch.nn.Parameter]] = []
        self.groups: list[list[int]] = []
        self._vectors: dict[tuple[str, int], torch.Tensor] = {}

    def setup(self, session: Any) -> None:
        super().setup(session)
        self.tracked = [(n, p) for n, p in session.param_names if p.requires_grad and p.ndim >= 2]
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
        opt = getattr(session, "optimizer", None)
        if opt is not None and self.tracked:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))

    def arm(self) -> None:
        self._armed = True

    def disarm(self) -> None:
        self._armed = False
        self._before = None

    def _stack(self, group: list[int]) -> torch.Tensor:
        t = torch.stack([self.tracked[i][1].detach().reshape(self.tracked[i][1].shape[0], -1) for i in group])
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    def _sigma(self, kind: str, gi: int, a: torch.Tensor, warm_iters: int) -> torch.Tensor:
        v = self._vectors.get((kind, gi))
        iters = warm_iters
        if v is None or v.device != a.device or v.dtype != a.dtype:
            v = torch.randn(a.shape[0], a.shape[2], generator=self._gen, dtype=torch.float64)
            v = (v / v.norm(dim=1, keepdim=True)).to(device=a.device, dtype=a.dtype)
            iters = self.cold_iters
        sigma, v = power_iteration(a, v, iters)
        self._vectors[(kind, gi)] = v
        return sigma

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._armed or self._before is not None or self._pending is not None:
            return
        with torch.no_grad():
            self._before = [self._stack(g) for g in self.groups]

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        before, self._before = self._before, None
        if not self._armed or before is None:
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
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._before = None
        self._pending = None
        self._vectors.clear()
