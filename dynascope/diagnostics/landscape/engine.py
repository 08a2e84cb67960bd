"""The evaluation engine of the loss landscapes: the loss of the model at
many points ``theta + sum_k c_k d_k``, moving the live weights in place (loop)
or through ``torch.func.vmap`` over stacked parameters, with the BatchNorm
policy and the method choice."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ...core.checks import one_of
from .. import _dist
from .._batch import (
    Forward,
    LossFn,
    as_pairs,
    batch_size,
    default_forward,
    model_device_dtype,
    move_to,
)
from .directions import Direction

MetricFn = Callable[[Any, Any], "float | torch.Tensor | Mapping[str, float | torch.Tensor]"]
BNPolicy = Literal["eval", "recompute"]


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Evaluator:
    """Loss (and metrics) of the model as it is now, on fixed pairs, no autograd."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        forward: Forward | None,
        bn_policy: str,
        metric_fn: MetricFn | None,
    ) -> None:
        one_of("bn_policy", bn_policy, ("eval", "recompute"))
        device, _ = model_device_dtype(model)
        self.model = model
        self.loss_fn = loss_fn
        self.forward = forward or default_forward
        self.pairs = [(move_to(x, device), move_to(y, device)) for x, y in as_pairs(batch)]
        self.sizes = [batch_size(x) for x, _ in self.pairs]
        self.total = float(sum(self.sizes))
        if _dist.active():  # each rank holds its shard: weights n_pair / N over the global batch
            self.total = _dist.sum_number(self.total)
        self.weights = [n / self.total for n in self.sizes]
        self.bn_policy = bn_policy
        self.metric_fn = metric_fn
        self.bns = _bn_modules(model) if bn_policy == "recompute" else []

    def prepare(self) -> None:
        """Modes for the whole evaluation (restored by preserved_state)."""
        self.model.eval()
        for m in self.bns:
            m.momentum = None  # cumulative average over the batch's pairs

    def _recompute_bn(self) -> None:
        for m in self.bns:
            m.reset_running_stats()
            m.train()
        for x, _ in self.pairs:
            self.forward(self.model, x)
        for m in self.bns:
            m.eval()

    def __call__(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss (and metrics) of the whole batch; under torch.distributed each rank's weighted shard
        summed over the ranks (one all_reduce per point, after a checkpoint: ``diagnostics/_dist.py``)."""
        if not _dist.active():
            return self._local()
        keys: list[str] = []

        def packed() -> torch.Tensor:  # this rank's weighted loss and metrics: one checkpoint, one all_reduce
            loss, metrics = self._local()
            keys.extend(sorted(metrics))
            return torch.tensor([float(loss), *(metrics[k] for k in keys)], dtype=torch.float64, device=loss.device)

        total = _dist.reduce_sum(packed)
        return total[0], {k: float(v) for k, v in zip(keys, total[1:].tolist())}

    def _local(self) -> tuple[torch.Tensor, dict[str, float]]:
        if self.bns:
            self._recompute_bn()
        loss = None
        metrics: dict[str, float] = {}
        for (x, y), w in zip(self.pairs, self.weights):
            out = self.forward(self.model, x)
            value = self.loss_fn(out, y)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar tensor (the mean loss of the pair), got {shape}")
            term = value.detach().reshape(()).double() * w
            loss = term if loss is None else loss + term
            if self.metric_fn is not None:
                m = self.metric_fn(out, y)
                items = m.items() if isinstance(m, Mapping) else [("metric", m)]
                for k, v in items:
                    metrics[k] = metrics.get(k, 0.0) + float(v) * w
        assert loss is not None
        return loss, metrics


def _saved_bn_momenta(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    return [(m, m.momentum) for m in _bn_modules(model)]


def _progress(total: int, progress: bool | None, desc: str) -> Any:
    from tqdm import tqdm  # a stderr bar; tqdm.auto warns in a notebook without ipywidgets

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    # delay: the bar appears only for grids that take more than a few seconds.
    return tqdm(total=total, desc=desc, disable=disable, delay=0 if progress else 3, file=sys.stderr, leave=False)


class _Mover:
    """Sets ``theta = base + sum_k c_k d_k`` in place on the directed parameters."""

    def __init__(self, model: nn.Module, directions: Sequence[Direction]) -> None:
        named = dict(model.named_parameters())
        keys = [k for k in named if any(k in d and bool(d[k].any()) for d in directions)]
        if not keys:
            raise ValueError("every direction is zero on every parameter: nothing to move")
        self.keys = keys
        self.params = [named[k] for k in keys]
        with torch.no_grad():
            self.base = [p.detach().clone() for p in self.params]
        self.dirs = [[d[k] if k in d else torch.zeros_like(named[k]) for k in keys] for d in directions]

    @torch.no_grad()
    def set(self, coeffs: Sequence[float]) -> None:
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(self.params, self.base)
        else:  # pragma: no cover - older torch
            for p, b in zip(self.params, self.base):
                p.copy_(b)
        for c, d in zip(coeffs, self.dirs):
            if c != 0.0:
                torch._foreach_add_(self.params, d, alpha=float(c))

    @torch.no_grad()
    def restore(self) -> None:
        for p, b in zip(self.params, self.base):
            p.copy_(b)


def _evaluate_points_loop(
    mover: _Mover, ev: _Evaluator, points: np.ndarray, bar: Any
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n = len(points)
    if _dist.active():
        return _evaluate_points_reduced(mover, ev, points, bar)
    device = mover.params[0].device
    out = torch.empty(n, dtype=torch.float64, device=device)
    extras: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for k in range(n):
            mover.set(points[k])
            loss, metrics = ev()
            out[k] = loss
            for name, v in metrics.items():
                extras.setdefault(name, np.full(n, np.nan))[k] = v
            bar.update(1)
    return out.cpu().numpy(), extras


def _evaluate_points_reduced(
    mover: _Mover, ev: _Evaluator, points: np.ndarray, bar: Any
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """torch.distributed: every point's loss (and metrics) of this rank's weighted shard, then ONE checkpoint and
    one all_reduce of the ``points x (1 + metrics)`` table (not one per point: the points do not depend on each
    other's values)."""
    keys: list[str] = []

    def local() -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for k in range(len(points)):
                mover.set(points[k])
                loss, metrics = ev._local()
                if k == 0:
                    keys.extend(sorted(metrics))
                rows.append(torch.stack([loss.double(), *(torch.tensor(metrics[m], dtype=torch.float64,
                                                                       device=loss.device) for m in keys)]))
                bar.update(1)
        return torch.stack(rows)

    total = _dist.reduce_sum(local).cpu().numpy()  # one transfer for the whole table
    return total[:, 0].copy(), {m: total[:, 1 + j].copy() for j, m in enumerate(keys)}


def _evaluate_points_vmap(
    model: nn.Module, mover: _Mover, ev: _Evaluator, points: np.ndarray, chunk: int, bar: Any
) -> np.ndarray:
    """Batched evaluation: ``torch.func.vmap`` over stacked parameter sets
    (``chunk`` grid points per call, one preallocated stack reused)."""
    from torch.func import vmap

    named_params = dict(model.named_parameters())
    named_buffers = dict(model.named_buffers())
    fixed = {k: v for k, v in named_params.items() if k not in mover.keys}
    device = mover.params[0].device
    stacks = [torch.empty((chunk, *b.shape), dtype=b.dtype, device=device) for b in mover.base]
    out = torch.empty(len(points), dtype=torch.float64, device=device)

    def loss_at(stacked: dict[str, torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        values = {**fixed, **named_buffers, **stacked}
        return ev.loss_fn(ev.forward(_Functional(model, values), x), y)

    with torch.no_grad():
        for start in range(0, len(points), chunk):
            pts = points[start:start + chunk]
            c = len(pts)
            coeff = torch.as_tensor(pts, dtype=mover.base[0].dtype, device=device)
            for s, b, *ds in zip(stacks, mover.base, *mover.dirs):
                view = s[:c]
                view.copy_(b.unsqueeze(0).expand_as(view))
                for axis, d in enumerate(ds):
                    shape = (c,) + (1,) * d.ndim
                    view.add_(coeff[:, axis].reshape(shape).to(d.dtype) * d.unsqueeze(0))
            stacked = {k: s[:c] for k, s in zip(mover.keys, stacks)}
            total = None
            for (x, y), w in zip(ev.pairs, ev.weights):
                vals = vmap(loss_at, in_dims=(0, None, None))(stacked, x, y).double() * w
                total = vals if total is None else total + vals
            out[start:start + c] = total
            bar.update(c)
    return out.cpu().numpy()


class _Functional(nn.Module):
    """Wraps ``functional_call`` so user ``forward(model, x)`` callables work under vmap."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_values", values)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self._model, self._values, args, kwargs)


def _choose_method(method: str, ev: _Evaluator, metric_fn: MetricFn | None) -> str:
    """``"loop"``, ``"vmap"`` or ``"measure"`` (time both on the first chunks, keep the faster)."""
    if method not in ("auto", "loop", "vmap", "measure"):
        raise ValueError(f"method must be 'auto', 'loop', 'vmap' or 'measure', got {method!r}")
    if _dist.active():
        return "loop"  # torch.distributed: every point's loss through the evaluator, which combines the ranks
    if method in ("vmap", "measure"):
        if ev.bn_policy == "recompute":
            raise ValueError(f"method={method!r} needs bn_policy='eval' (recomputing statistics updates buffers "
                             "in place)")
        if metric_fn is not None:
            raise ValueError(f"method={method!r} evaluates the loss only; use method='loop' with metric_fn")
        return method
    # auto: the in-place loop. It is deterministic (the same seed gives bit-identical grids, whichever
    # machine load), supports every option and costs one forward pass per point. vmap over stacked
    # parameters was 1.1-3x slower on CPU in issue 4's measurement but 0.6x the loop in ours on a heavily
    # loaded 2-core machine (docs/landscape.md); it stays opt-in (method="vmap" or "measure").
    return "loop"


def _vmap_or_loop(
    model: nn.Module, mover: _Mover, ev: _Evaluator, points: np.ndarray, chunk: int, bar: Any, warn: bool = True
) -> tuple[np.ndarray, str]:
    try:
        return _evaluate_points_vmap(model, mover, ev, points, chunk, bar), "vmap"
    except Exception as exc:  # vmap cannot trace every model; fall back (and say so when vmap was asked for)
        import warnings

        if warn:
            warnings.warn(f"vmap evaluation failed ({type(exc).__name__}: {exc}); using the loop", stacklevel=4)
        bar.reset(total=bar.total)
        return _evaluate_points_loop(mover, ev, points, bar)[0], "loop"


def _run_points(
    model: nn.Module,
    mover: _Mover,
    ev: _Evaluator,
    points: np.ndarray,
    method: str,
    chunk: int,
    progress: bool | None,
    desc: str,
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """Evaluate ``points`` (rows of coefficients, one per direction); returns the
    losses, per-point metrics and the method actually used."""
    with _progress(len(points), progress, desc) as bar:
        if method == "measure" and len(points) >= 2 * chunk:
            warn = True
            t0 = time.perf_counter()
            first, _ = _evaluate_points_loop(mover, ev, points[:chunk], bar)
            t_loop = time.perf_counter() - t0
            t0 = time.perf_counter()
            second, used = _vmap_or_loop(model, mover, ev, points[chunk:2 * chunk], chunk, bar, warn)
            t_vmap = time.perf_counter() - t0
            if used == "vmap" and t_vmap < t_loop:
                rest, used = _vmap_or_loop(model, mover, ev, points[2 * chunk:], chunk, bar, warn)
            else:
                rest, _ = _evaluate_points_loop(mover, ev, points[2 * chunk:], bar)
                used = "loop"
            return np.concatenate([first, second, rest]), {}, used
        if method == "vmap":  # ("measure" with too few points for a fair trial: the loop)
            losses, used = _vmap_or_loop(model, mover, ev, points, chunk, bar)
            return losses, {}, used
        losses, extras = _evaluate_points_loop(mover, ev, points, bar)
        return losses, extras, "loop"
