"""The Hessian as a linear operator: Hessian-vector products of the mean loss
over a batch, with respect to the trainable parameters (or ``params=``), in a
stated mode.

* **Hessian-vector products** (HVPs): the model is called through
  ``torch.func.functional_call`` with detached leaf copies of its parameters
  (cast to ``dtype`` when asked, e.g. float64 for reference checks) and cloned
  buffers, so the caller's parameters, ``.grad`` and buffers are never part of a
  graph and BatchNorm running statistics cannot change. The gradient
  ``g = grad(L, theta, create_graph=True)`` is built once per batch pair and
  kept; each product is then ``H v = grad(g, theta, grad_outputs=v,
  retain_graph=True)`` (double backward over the retained graph). Choice by
  measurement (``benchmarks/bench_hessian.py --hvp``: 94,986-parameter CNN with
  BatchNorm, batch 256, CPU, 2 threads, medians of 10 products, implementations
  interleaved; docs/curvature.md has the table): retained-graph double backward
  130 ms per product on a quiet machine and 1433 ms on a loaded one; recomputing
  forward + gradient each time 123 / 1947 ms; torch.func forward-over-reverse
  ``jvp(grad(f))`` 151 / 2682 ms; ``is_grads_batched`` (8 vectors) 142 / 1745 ms;
  ``torch.func.linearize`` 62 / 1858 ms after a 3.5 / 7.8 s trace. Linearize
  won per product on the quiet run but only pays back its trace after ~50
  products (a top-k call needs 10-40) and lost under load; recomputing tied on
  the quiet run and lost by 1.36x under load. Retained double backward has no
  set-up cost and supports every module autograd does, so it is the default.
  With several batch pairs (``cache_graph=None`` keeps graphs only for one
  pair, to bound memory) each product recomputes forward and gradient per pair.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.checks import check_mode
from . import _dist
from ._batch import (
    Forward,
    LossFn,
    as_pairs,
    batch_size,
    default_forward,
    model_device_dtype,
    move_to,
    trainable_named_parameters,
)

__all__ = ["HessianOperator"]

Params = Iterable[str] | nn.Module | None
Mode = Literal["eval", "train", "current"]


class _Call(nn.Module):
    """Wrapper so ``functional_call`` also works with a custom ``forward=``."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self._fwd = forward

    def forward(self, inputs: Any) -> Any:  # noqa: D401
        return self._fwd(self.model, inputs)


class HessianOperator:
    """Hessian of the size-weighted mean loss as a linear operator on flat vectors.

    Build it inside :func:`preserved_state` (the public functions do): it sets the
    model's mode. ``matvec(x)`` takes and returns flat tensors of length ``n`` in
    ``self.dtype`` on ``self.device``; ``n_hvp`` counts products.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: Params = None,
        forward: Forward | None = None,
        dtype: torch.dtype | None = None,
        mode: Mode = "eval",
        seed: int = 0,
        cache_graph: bool | None = None,
    ) -> None:
        check_mode(mode)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        model = _dist.unwrap(model)  # DDP: the module itself (diagnostics/_dist.py)
        self.loss_fn = loss_fn
        self.pairs = as_pairs(batch)
        sizes = [batch_size(x) for x, _ in self.pairs]
        total = float(sum(sizes))
        if _dist.active():  # each rank holds its shard: weights n_pair / N over the global batch
            total = _dist.sum_number(total)
        if total <= 0:
            raise ValueError(f"batch holds no samples (sizes {sizes})")
        self.weights = [s / total for s in sizes]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to differentiate")
        chosen = trainable_named_parameters(model, params)
        self.device, model_dtype = model_device_dtype(model)
        self.dtype = dtype or model_dtype
        self._cast = self.dtype if self.dtype != model_dtype else None
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {self.dtype}")
        self.names = [n for n, _ in chosen]
        self.shapes = [p.shape for _, p in chosen]
        self.numels = [p.numel() for _, p in chosen]
        self.offsets = np.concatenate([[0], np.cumsum(self.numels)]).astype(int)
        self.n = int(self.offsets[-1])
        self.n_hvp = 0
        self.seed = seed
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        self._wrapper = _Call(model, forward or default_forward)
        chosen_ids = {id(p) for _, p in chosen}
        # leaves: detached copies the graph attaches to (never the caller's tensors)
        # (FSDP2: the whole parameter, gathered once; every rank holds the same one)
        self.leaves = [_dist.full(p).to(self.dtype).requires_grad_(True) for _, p in chosen]
        leaf_of = {id(p): leaf for (_, p), leaf in zip(chosen, self.leaves)}
        self._tensors: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            t = leaf_of[id(p)] if id(p) in chosen_ids else _dist.full(p)
            if id(p) not in chosen_ids and p.is_floating_point():
                t = t.to(self.dtype)
            self._tensors["model." + name] = t
        self._buffer_src = [(name, b) for name, b in model.named_buffers()]
        self.cache_graph = (len(self.pairs) == 1) if cache_graph is None else bool(cache_graph)
        self._graphs: list[tuple[list[torch.Tensor], list[int]]] | None = None
        # matmat through one batched double backward: None until timed against the loop (matmat), then whether
        self._batched: bool | None = None
        if self.cache_graph:
            self._graphs = [self._gradient(i) for i in range(len(self.pairs))]

    # -- building blocks ------------------------------------------------------
    def _buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, b in self._buffer_src:
            c = b.detach().clone()
            if c.is_floating_point():
                c = c.to(self.dtype)
            out["model." + name] = c
        return out

    def _loss(self, i: int) -> torch.Tensor:
        inputs, targets = self.pairs[i]
        inputs = move_to(inputs, self.device, self._cast)
        targets = move_to(targets, self.device, self._cast)
        tensors = dict(self._tensors)
        tensors.update(self._buffers())
        torch.manual_seed(self.seed + i)  # dropout in train mode: same mask every product
        # fused attention kernels (flash / memory-efficient) have no double backward
        with sdpa_kernel(SDPBackend.MATH), _dist.plain_forward(self._wrapper.model):
            out = functional_call(self._wrapper, tensors, (inputs,))
        loss = self.loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1 or loss.ndim > 1:
            raise ValueError(
                f"loss_fn must return a scalar (the mean loss of the pair), got a tensor of shape {tuple(loss.shape)}"
            )
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend differentiably on the selected parameters (the forward ran under "
                "torch.no_grad, detached its outputs, or uses none of them)"
            )
        return loss.reshape(())

    def _gradient(self, i: int) -> tuple[list[torch.Tensor], list[int]]:
        """Weighted gradient of pair i with its graph; returns the grads that
        depend on the parameters and their indices (others contribute 0)."""
        loss = self._loss(i) * self.weights[i]
        grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError("the loss does not depend on any of the selected parameters")
        keep = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return [grads[j] for j in keep], keep

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[self.offsets[j] : self.offsets[j + 1]].view(self.shapes[j]) for j in range(len(self.shapes))]

    def flatten(self, parts: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                (torch.zeros(n, device=self.device, dtype=self.dtype) if t is None else t.reshape(-1))
                for t, n in zip(parts, self.numels)
            ]
        )

    def matvec(self, x: torch.Tensor, block: list[int] | None = None) -> torch.Tensor:
        """H x for a flat x (length n). With ``block`` (indices of parameter
        tensors), the product with the diagonal block H_BB: x is read and the
        result written only on those tensors (zeros elsewhere). Under
        torch.distributed: the sum over ranks of each rank's weighted product, so
        H is the global batch's (``diagnostics/_dist.py``; every rank calls it)."""
        return _dist.reduce_sum(lambda: self._local_matvec(x, block))

    def _local_matvec(self, x: torch.Tensor, block: list[int] | None = None) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        xs = self.split(x)
        acc: list[torch.Tensor | None] = [None] * len(self.leaves)
        wanted = set(range(len(self.leaves)) if block is None else block)
        for i in range(len(self.pairs)):
            if self._graphs is not None:
                grads, keep = self._graphs[i]
                retain = True
            else:
                grads, keep = self._gradient(i)
                retain = False
            sel = [(g, j) for g, j in zip(grads, keep) if j in wanted]
            if not sel:
                continue
            inputs = [self.leaves[j] for j in sorted(wanted)]
            hv = torch.autograd.grad(
                [g for g, _ in sel],
                inputs,
                grad_outputs=[xs[j] for _, j in sel],
                retain_graph=retain,
                allow_unused=True,
            )
            for j, h in zip(sorted(wanted), hv):
                if h is None:
                    continue
                acc[j] = h.detach() if acc[j] is None else acc[j] + h.detach()
        self.n_hvp += 1
        return self.flatten(acc)

    def matmat(self, X: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """H X for the columns of X (shape ``n x m``), ``m`` products counted in ``n_hvp``.

        Up to ``chunk`` columns go through one batched double backward
        (``torch.autograd.grad(..., is_grads_batched=True)``, vmap over the
        backward) where that is faster: the first call with at least 8 columns times
        2 columns each way and keeps the faster for the rest of this operator (vmap's
        double backward through some layers is far slower than the loop: 10x on a
        small CNN with max-pooling, where it is 2.2x faster on an MLP). A model whose
        backward raises under vmap falls back to one :meth:`matvec` per column. Same
        values as the loop up to rounding."""
        X = X.to(device=self.device, dtype=self.dtype)
        if X.ndim != 2 or X.shape[0] != self.n:
            raise ValueError(f"matmat needs an (n, m) matrix with n = {self.n}, got shape {tuple(X.shape)}")
        cols: list[torch.Tensor] = []
        start = 0
        if self._batched is None and self._graphs is not None and X.shape[1] >= 8:
            t0 = time.perf_counter()
            cols.append(self._loop(X[:, :2]))
            t_loop = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                cols.append(self._matmat_batched(X[:, 2:4]))
                self._batched = time.perf_counter() - t0 < t_loop
            except Exception:  # noqa: BLE001 - no batching rule for some op: the exact loop instead
                cols.append(self._loop(X[:, 2:4]))
                self._batched = False
            start = 4
        for a in range(start, X.shape[1], max(1, int(chunk))):
            part = X[:, a : a + chunk]
            if self._batched is not False and self._graphs is not None and part.shape[1] > 1:
                try:
                    cols.append(self._matmat_batched(part))
                    continue
                except Exception:  # noqa: BLE001 - no batching rule for some op: the exact loop instead
                    self._batched = False
            cols.append(self._loop(part))
        return torch.cat(cols, dim=1) if cols else X.new_zeros(self.n, 0)

    def _loop(self, part: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.matvec(part[:, j]) for j in range(part.shape[1])], dim=1)

    def _matmat_batched(self, part: torch.Tensor) -> torch.Tensor:
        assert self._graphs is not None
        m = part.shape[1]
        rows = part.T.contiguous()  # (m, n): one vector per row
        pieces = [rows[:, self.offsets[j] : self.offsets[j + 1]].reshape(m, *self.shapes[j])
                  for j in range(len(self.shapes))]
        acc: list[torch.Tensor | None] = [None] * len(self.leaves)
        for grads, keep in self._graphs:
            if not keep:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # vmap's "performance drop" fallback notice
                hv = torch.autograd.grad(grads, self.leaves, grad_outputs=[pieces[j] for j in keep],
                                         retain_graph=True, allow_unused=True, is_grads_batched=True)
            for j, h in enumerate(hv):
                if h is not None:
                    acc[j] = h.detach() if acc[j] is None else acc[j] + h.detach()
        out = torch.cat([(torch.zeros(m, n, device=self.device, dtype=self.dtype) if t is None else t.reshape(m, -1))
                         for t, n in zip(acc, self.numels)], dim=1)
        self.n_hvp += m
        return out.T

    def release(self) -> None:
        self._graphs = None


def _make_operator(model, loss_fn, batch, params, forward, dtype, mode, seed, cache_graph) -> HessianOperator:
    # under torch.distributed a rank whose forward or loss raises fails every rank together
    op = _dist.attempt(lambda: HessianOperator(
        model, loss_fn, batch, params=params, forward=forward, dtype=dtype, mode=mode, seed=seed,
        cache_graph=cache_graph,
    ))
    if _dist.active():
        op._batched = False  # products of several columns: one reduced matvec per column (the batched one is local)
    return op
