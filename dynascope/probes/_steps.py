"""The step an optimizer just took, from its state: D = w_{t+1} - w_t without a copy of w_t.

After ``optimizer.step()`` the optimizer's state holds what it applied: SGD's momentum buffer, Adam's moments
and step count. For ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize),
``torch.optim.Adam`` and ``torch.optim.AdamW`` (weight decay coupled or decoupled, AMSGrad, maximize;
foreach, fused or for-loop: the same formula) the step follows from that state, the gradient and
w_{t+1} by the formula the optimizer used (torch/optim/sgd.py, adam.py):

* SGD, momentum mu > 0, not Nesterov: D = -lr b_t (b_t the momentum buffer after the step).
* SGD otherwise: w_{t+1} = w_t - lr (s g + wd w_t + [Nesterov] mu b_t), s = -1 when maximizing, solved for w_t:
  w_t = (w_{t+1} + lr (s g + [Nesterov] mu b_t)) / (1 - lr wd).
* Adam/AdamW: u = lr / (1 - beta1^t) m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps) (v_t: the running max with
  AMSGrad); coupled weight decay (Adam) is inside m_t: D = -u; decoupled (AdamW):
  w_{t+1} = w_t (1 - lr wd) - u, so w_t = (w_{t+1} + u) / (1 - lr wd) and D = w_{t+1} - w_t.

The copy measures the update as rounded into the float32 weights; this gives the update the optimizer
computed (they agree to ~1e-6 relative, tested to 1e-4 for each optimizer and flag). A tensor learning rate
or step count stays a tensor (no value is read on the host: no synchronisation, architecture invariant 3).
Other optimizers (Muon, user optimizers) and a state without the expected entries return None: the caller
keeps a copy for those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from time import perf_counter
from typing import Any

import torch

from ._fused import FusedKernels, adam_update_sq_norms
from ._groups import CHUNK_ELEMENTS, index_tensor, is_sharded, local_tensor, shape_chunks
from .base import ProbeContext

__all__ = ["COPY_MAX_ELEMENTS", "worth_reading_state", "reads_state", "supports_state_steps", "steps_from_state",
           "steps_and_weights_from_state", "optimizer_steps",
           "update_norms_from_state", "optimizer_update_norms"]


#: w_t solved from w_{t+1} and the step carries the rounding of the step: an entry below this fraction of its
#: step's size is zero (a bias at its zero initialisation stays zero, so its angle and effective lr stay
#: undefined as with a copy)
ROUNDING = 2.0 ** -20


def _pairs(w1s: list[torch.Tensor], w_ts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(D, w_t) from w_{t+1} and solved w_t, entries of w_t at the rounding level of the step set to zero
    (|w_t| <= ROUNDING |D|): multi-tensor operations, ``w_ts`` changed in place."""
    r = torch._foreach_sub(w1s, w_ts)
    torch._foreach_abs_(r)
    torch._foreach_mul_(r, ROUNDING)  # ROUNDING |D|
    keep = torch._foreach_abs(w_ts)
    torch._foreach_sub_(keep, r)
    del r
    torch._foreach_sign_(keep)
    torch._foreach_clamp_min_(keep, 0.0)  # 1 where |w_t| > ROUNDING |D|, else 0 (NaN stays NaN)
    torch._foreach_mul_(w_ts, keep)
    del keep
    return list(zip(torch._foreach_sub(w1s, w_ts), w_ts))


def _adam_vectors(ts: Sequence[Any], lr: float | torch.Tensor, beta1: float, beta2: float, device: torch.device,
                  dtype: torch.dtype, with_lr: bool = False) -> torch.Tensor:
    """(2, n): per parameter, sqrt(1 - beta2^t) and lr / (1 - beta1^t), of ``dtype`` on ``device``, computed
    where the step counts live (no value is read on the host: architecture invariant 3) and moved without
    blocking; ``with_lr``: (3, n), lr itself in the third row."""
    if all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in ts) and len({x.device for x in ts}) == 1:
        t = torch.stack(list(ts)).to(torch.float64)
    else:
        t = torch.stack([x.detach().reshape(()).to(torch.float64) if isinstance(x, torch.Tensor)
                         else torch.tensor(float(x), dtype=torch.float64) for x in ts])
    if isinstance(lr, torch.Tensor) and lr.device != t.device:
        t = t.to(lr.device)
    rows = [(1.0 - beta2 ** t).sqrt(), lr / (1.0 - beta1 ** t)]
    if with_lr:
        rows.append(torch.ones_like(t) * lr)
    vec = torch.stack(rows).to(dtype)
    if vec.device != device:
        vec = (vec.pin_memory() if device.type == "cuda" else vec).to(device, non_blocking=True)
    return vec


def _adam_scalars(ts: Sequence[Any], lr: float | torch.Tensor, beta1: float, beta2: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`_adam_vectors` as two lists of 0-dim tensors (multi-tensor operations' scalars)."""
    vec = _adam_vectors(ts, lr, beta1, beta2, device, dtype)
    return list(vec[0].unbind()), list(vec[1].unbind())


#: an optimizer with at most this many trainable weights (16 MB in float32) has its step measured with a copy
#: of them: on the CPU the copy (copy, subtract, norm: 3 passes) costs less than the state formula (~10 passes
#: over the state; 40-block model at 1 thread, sentinel alone 1.16x against 1.28x, update probe at every=1
#: 1.31x against 1.53x) and its memory is small; above, the state formula saves a copy of the model
COPY_MAX_ELEMENTS = 1 << 22


def worth_reading_state(optimizer: torch.optim.Optimizer, limit: int | None = None) -> bool:
    """Whether ``optimizer``'s step is better read from its state than measured with a copy: it is covered
    (:func:`supports_state_steps`) and its trainable weights hold more than ``limit`` (default
    COPY_MAX_ELEMENTS) elements."""
    if not supports_state_steps(optimizer):
        return False
    limit = COPY_MAX_ELEMENTS if limit is None else limit
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad) > limit


def reads_state(ctx: ProbeContext, optimizer: torch.optim.Optimizer, limit: int | None = None) -> bool:
    """:func:`worth_reading_state`, decided once per optimizer and limit in the run's context."""
    key = ("reads_state", id(optimizer), limit)
    hit = ctx.persistent.get(key)
    if hit is None:
        hit = ctx.persistent[key] = worth_reading_state(optimizer, limit)
    return hit


def supports_state_steps(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether :func:`steps_from_state` knows this optimizer's step (SGD, Adam, AdamW; not their subclasses,
    whose step may differ)."""
    return type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    if "decoupled_weight_decay" in group:
        return bool(group["decoupled_weight_decay"])
    return isinstance(optimizer, torch.optim.AdamW)


@torch.no_grad()
def steps_from_state(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                     params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """D = w_{t+1} - w_t of each of ``params`` (all in ``group``, all stepped just now), computed from the
    optimizer's state after its step; None when this optimizer or state is not covered. One new tensor of
    the parameter's size per parameter: callers bound their memory by passing a few at a time."""
    got = steps_and_weights_from_state(optimizer, group, params)
    return None if got is None else [d for d, _ in got]


def _part(x: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """Elements ``span`` of ``x`` flattened (a view of a contiguous tensor), or ``x`` itself."""
    return x if span is None else x.reshape(-1)[span[0]:span[1]]


@torch.no_grad()
def steps_and_weights_from_state(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                                 params: Sequence[torch.Tensor], span: tuple[int, int] | None = None
                                 ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(D, w_t) of each parameter, as :func:`steps_from_state`: w_t solved from the step where the formula
    needs it (exact where w_t was: a zero bias stays zero), else w_{t+1} - D. ``span``: only the elements
    ``span[0]:span[1]`` of each parameter flattened (a large parameter a slice at a time: the temporaries
    are a few times the slice)."""
    if not params:
        return []
    lr = group["lr"]  # a float, or a 0-dim tensor used as it is
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    state = optimizer.state
    sts = [state.get(p) or {} for p in params]
    w1s = [_part(p.detach(), span) for p in params]
    if type(optimizer) is torch.optim.SGD:
        mu = float(group.get("momentum", 0.0) or 0.0)
        nesterov = bool(group.get("nesterov", False))
        sign = -1.0 if group.get("maximize", False) else 1.0
        bufs = [st.get("momentum_buffer") for st in sts] if mu else []
        if mu and any(b is None for b in bufs):
            return None
        if mu and not nesterov:  # D = -lr b: w_t = w_{t+1} + lr b
            w_ts = torch._foreach_mul([_part(b, span) for b in bufs], lr)
        else:
            if any(p.grad is None for p in params):
                return None
            w_ts = torch._foreach_mul([_part(p.grad, span).to(p.dtype) for p in params], sign)
            if nesterov:
                torch._foreach_add_(w_ts, [_part(b, span) for b in bufs], alpha=mu)
            torch._foreach_mul_(w_ts, lr)
        torch._foreach_add_(w_ts, w1s)  # w_{t+1} + lr (s g + [Nesterov] mu b)
        if wd and not (mu and not nesterov):
            torch._foreach_div_(w_ts, 1.0 - lr * wd)
        return _pairs(w1s, w_ts)
    if any(not st for st in sts):
        return None
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    amsgrad = bool(group.get("amsgrad", False))
    decoupled = _decoupled(optimizer, group) and wd != 0.0
    ms = [st.get("exp_avg") for st in sts]
    vs = [st.get("max_exp_avg_sq" if amsgrad else "exp_avg_sq") for st in sts]
    ts = [st.get("step") for st in sts]
    if any(x is None for x in ms) or any(x is None for x in vs) or any(x is None for x in ts):
        return None
    bc2s, steps = _adam_scalars(ts, lr, beta1, beta2, w1s[0].device, ms[0].dtype)
    # the optimizer's own order: u = (lr / bc1) m / (sqrt(v) / bc2 + eps), what it subtracted
    u = torch._foreach_sqrt([_part(v, span) for v in vs])
    torch._foreach_div_(u, bc2s)
    torch._foreach_add_(u, eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, [_part(m, span) for m in ms])
    torch._foreach_mul_(u, steps)
    torch._foreach_add_(u, w1s)  # w_{t+1} + u
    if decoupled:  # AdamW: w_{t+1} = w_t (1 - lr wd) - u
        torch._foreach_div_(u, 1.0 - lr * wd)
    return _pairs(w1s, u)


def _pieces(params: Sequence[torch.Tensor]) -> Iterator[tuple[list[int], tuple[int, int] | None]]:
    """What is computed at once: parameters of one shape (:func:`shape_chunks`), or slices of CHUNK_ELEMENTS
    elements (``span``) of a parameter larger than that."""
    for ks in shape_chunks(params):
        n = params[ks[0]].numel()
        if len(ks) == 1 and n > CHUNK_ELEMENTS:
            for a in range(0, n, CHUNK_ELEMENTS):
                yield ks, (a, min(n, a + CHUNK_ELEMENTS))
        else:
            yield ks, None


def _rows(ts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of one shape as one (k, ...) tensor: a view of a single one, else a stacked copy."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def _accumulate(acc: torch.Tensor, ks: list[int], x: torch.Tensor, device: torch.device) -> None:
    """acc[ks] += the squared norm of each row of ``x`` (k, ...)."""
    # float32 accumulation for half/bfloat16/float32; a float64 model's norms in float64 (a float32 dtype= on a
    # float64 input raises: the sentinel fell back to copies and lost step 0's update norms)
    wide = None if x.dtype == torch.float64 else torch.float32
    sq = torch.linalg.vector_norm(x.reshape(len(ks), -1), dim=1, dtype=wide).float().square_()
    if len(ks) == len(acc):
        acc.add_(sq)
    else:
        acc.index_add_(0, index_tensor(ks, device), sq)


@torch.no_grad()
def update_norms_from_state(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                            params: Sequence[torch.Tensor], fused: FusedKernels | None = None
                            ) -> torch.Tensor | None:
    """||w_{t+1} - w_t|| of each of ``params`` (all in ``group``, all stepped just now) from the optimizer's
    state, as a float32 vector on their device; None when this optimizer or state is not covered. The step in
    closed form (module docstring): D = -lr b (SGD with momentum), D = -lr (s g + mu b [Nesterov] + wd w_{t+1})
    / (1 - lr wd) (SGD otherwise), D = -(u + lr wd w_{t+1}) / (1 - lr wd) (AdamW; Adam: -u); the weights of
    one shape stacked, a large one a slice at a time (:func:`_pieces`): temporaries of at most CHUNK_ELEMENTS
    elements (SGD with momentum: none), a constant number of tensor calls per piece. Nothing is read on the
    host. ``fused``: Adam/AdamW's norms from one compiled kernel per parameter layout once that pays
    (:func:`dynascope.probes._fused.adam_update_sq_norms`: one read of m, v and w, no temporary)."""
    if not params:
        return torch.zeros(0)
    lr = group["lr"]  # a float, or a 0-dim tensor used as it is
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    state = optimizer.state
    sts = [state.get(p) or {} for p in params]
    given = params
    if any(is_sharded(p) for p in params):
        # FSDP2: the norms of this rank's shards (parameters, gradients, state), never a DTensor operation
        # (its reductions are collectives); the caller sums their squares across ranks
        params = [local_tensor(p) for p in params]
        sts = [{k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()} for st in sts]
    device = params[0].device
    if type(optimizer) is torch.optim.SGD:
        mu = float(group.get("momentum", 0.0) or 0.0)
        nesterov = bool(group.get("nesterov", False))
        bufs = [st.get("momentum_buffer") for st in sts] if mu else []
        if mu and any(b is None for b in bufs):
            return None
        if mu and not nesterov:  # D = -lr b: the momentum buffers' norms, no temporary
            return torch.stack([n.float() for n in torch._foreach_norm(bufs)]).mul_(abs(lr))
        grads = [None if p.grad is None else local_tensor(p.grad) for p in given]
        if any(g is None for g in grads):
            return None
        sign = -1.0 if group.get("maximize", False) else 1.0
        acc = torch.zeros(len(params), dtype=torch.float32, device=device)
        for ks, span in _pieces(params):
            e = _rows([_part(grads[k], span) for k in ks]).to(params[ks[0]].dtype).mul(sign)  # s g (a new tensor)
            if nesterov:
                e.add_(_rows([_part(bufs[k], span) for k in ks]), alpha=mu)
            if wd:
                e.add_(_rows([_part(params[k].detach(), span) for k in ks]), alpha=wd)
            _accumulate(acc, ks, e, device)
            del e
        scale = lr / (1.0 - lr * wd) if wd else lr
    else:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        amsgrad = bool(group.get("amsgrad", False))
        decoupled = _decoupled(optimizer, group) and wd != 0.0
        if any(not st for st in sts):
            return None
        ms = [st.get("exp_avg") for st in sts]
        vs = [st.get("max_exp_avg_sq" if amsgrad else "exp_avg_sq") for st in sts]
        ts = [st.get("step") for st in sts]
        if any(x is None for x in ms) or any(x is None for x in vs) or any(x is None for x in ts):
            return None
        plain = fused is not None and params is given and all(type(x) is torch.Tensor for x in (*ms, *vs))
        if plain:
            vec = _adam_vectors(ts, lr, beta1, beta2, device, ms[0].dtype, with_lr=True)
            gkey = ("adam", id(optimizer), id(group), len(params))
            sq = adam_update_sq_norms(fused, gkey, vs, ms, [p.detach() for p in params], vec, eps,
                                      wd if decoupled else 0.0)
            if sq is not None:
                return _scaled_norms(sq.to(torch.float32), 1.0 / (1.0 - lr * wd) if decoupled else 1.0)
            t0 = perf_counter()
            vec = vec[:2]
        else:
            vec = _adam_vectors(ts, lr, beta1, beta2, device, ms[0].dtype)
        acc = torch.zeros(len(params), dtype=torch.float32, device=device)
        for ks, span in _pieces(params):
            # the weights of one shape stacked (a few copies of at most CHUNK_ELEMENTS elements), a large weight
            # a slice at a time: a dozen tensor operations per shape, not per parameter (on the CPU a
            # multi-tensor operation is a loop over the parameters); the temporaries stay in the cache
            bshape = (len(ks),) + (1,) * (1 if span is not None or len(ks) == 1 else params[ks[0]].dim())
            bc2, step = vec[:, index_tensor(ks, device)] if len(ks) < len(params) else vec
            # the optimizer's own order: u = (lr / bc1) m / (sqrt(v) / bc2 + eps)
            u = _rows([_part(vs[k], span) for k in ks]).sqrt()
            u.div_(bc2.view(bshape)).add_(eps).reciprocal_()
            u.mul_(_rows([_part(ms[k], span) for k in ks])).mul_(step.view(bshape))
            if decoupled:  # AdamW: D = -(u + lr wd w_{t+1}) / (1 - lr wd)
                w = _rows([_part(params[k].detach(), span) for k in ks])
                if isinstance(lr, torch.Tensor):
                    u.addcmul_(w, lr * wd)
                else:
                    u.add_(w, alpha=lr * wd)
                del w
            _accumulate(acc, ks, u, device)
            del u
        scale = 1.0 / (1.0 - lr * wd) if decoupled else 1.0
        if plain:
            lay = fused.layouts.get(gkey)
            if lay is not None:
                lay.spent += perf_counter() - t0
    return _scaled_norms(acc, scale)


def _scaled_norms(sq: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """|scale| sqrt(sq), in place."""
    out = sq.sqrt_()
    if isinstance(scale, torch.Tensor):
        return out.mul_(scale.abs().to(out.dtype))
    return out.mul_(abs(scale))


def optimizer_update_norms(ctx: ProbeContext, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                           fused: FusedKernels | None = None) -> torch.Tensor:
    """||w_{t+1} - w_t|| of each of ``params`` after ``optimizer`` stepped (float32, their device), whatever
    param groups they are in (one :func:`update_norms_from_state` per group); 0 for a parameter ``optimizer``
    does not own. LookupError when the state lacks an entry the step writes. ``fused``: as there."""
    device = params[0].device if params else torch.device("cpu")
    # the parameters of each param group: computed once per (optimizer, list of parameters) and kept in the
    # per-run context (a caller passes the same list at every step)
    key = ("update_norm_groups", id(optimizer), id(params), len(params))
    hit = ctx.persistent.get(key)
    if hit is None or hit[0] is not params or any(len(g["params"]) != n for g, _, _, n in hit[1]):
        by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
        for k, p in enumerate(params):
            if ctx.optimizer_of(p) is optimizer:
                g = ctx.group_of(p)
                if g is not None:
                    by_group.setdefault(id(g), (g, []))[1].append(k)
        hit = ctx.persistent[key] = (params, [(g, [params[k] for k in ks], index_tensor(ks, device), len(g["params"]))
                                              for g, ks in by_group.values()])
    parts = hit[1]
    if len(parts) == 1 and len(parts[0][1]) == len(params):  # one group holding them all, in order
        got = update_norms_from_state(optimizer, parts[0][0], parts[0][1], fused)
        if got is None:
            raise LookupError("the optimizer's state lacks an entry its step writes")
        return got.to(device)
    out = torch.zeros(len(params), dtype=torch.float32, device=device)
    for g, ps, index, _ in parts:
        got = update_norms_from_state(optimizer, g, ps, fused)
        if got is None:
            raise LookupError("the optimizer's state lacks an entry its step writes")
        out.index_copy_(0, index, got.to(device))
    return out


def optimizer_steps(ctx: ProbeContext, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    span: tuple[int, int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(D, w_t) of each of ``params`` after ``optimizer`` stepped, whatever param groups they are in (one
    :func:`steps_and_weights_from_state` call per group); D = 0 for a parameter ``optimizer`` does not own (it
    was not stepped). ``span``: elements of each parameter flattened, as there. LookupError when the state
    lacks an entry the step writes."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(params)
    by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
    for k, p in enumerate(params):
        g = ctx.group_of(p) if ctx.optimizer_of(p) is optimizer else None
        if g is None:
            w = _part(p.detach(), span)
            out[k] = (torch.zeros_like(w), w)
        else:
            by_group.setdefault(id(g), (g, []))[1].append(k)
    for g, ks in by_group.values():
        pairs = steps_and_weights_from_state(optimizer, g, [params[k] for k in ks], span)
        if pairs is None:
            raise LookupError("the optimizer's state lacks an entry its step writes")
        for k, pair in zip(ks, pairs):
            out[k] = pair
    return [pair for pair in out if pair is not None]  # every slot is filled above
