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

from collections.abc import Sequence
from typing import Any

import torch

from ._groups import CHUNK_ELEMENTS
from .base import ProbeContext

__all__ = ["supports_state_steps", "steps_from_state", "steps_and_weights_from_state", "optimizer_steps",
           "update_norms_from_state", "optimizer_update_norms"]


#: w_t solved from w_{t+1} and the step carries the rounding of the step: an entry below this fraction of its
#: step's size is zero (a bias at its zero initialisation stays zero, so its angle and effective lr stay
#: undefined as with a copy)
ROUNDING = 2.0 ** -20


def _pair(w1: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, w_t) from w_{t+1} and a solved w_t, entries of w_t at the rounding level of the step set to zero."""
    d = w1.sub(w_t)
    w_t.masked_fill_(w_t.abs() <= d.abs().mul_(ROUNDING), 0.0)
    return w1.sub(w_t), w_t


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


@torch.no_grad()
def steps_and_weights_from_state(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                                 params: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(D, w_t) of each parameter, as :func:`steps_from_state`: w_t solved from the step where the formula
    needs it (exact where w_t was: a zero bias stays zero), else w_{t+1} - D."""
    lr = group["lr"]  # a float, or a 0-dim tensor used as it is
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    state = optimizer.state
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    if type(optimizer) is torch.optim.SGD:
        mu = float(group.get("momentum", 0.0) or 0.0)
        nesterov = bool(group.get("nesterov", False))
        sign = -1.0 if group.get("maximize", False) else 1.0
        for p in params:
            buf = state.get(p, {}).get("momentum_buffer") if mu else None
            if mu and buf is None:
                return None
            if buf is not None and not nesterov:
                out.append(_pair(p.detach(), p.detach().add(buf.mul(lr))))
                continue
            if p.grad is None:
                return None
            g = p.grad.to(p.dtype)
            rhs = g.mul(sign)
            if nesterov and buf is not None:
                rhs.add_(buf, alpha=mu)
            w_t = p.detach().add(rhs.mul_(lr))
            if wd:
                w_t.div_(1.0 - lr * wd)
            out.append(_pair(p.detach(), w_t))
        return out
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    amsgrad = bool(group.get("amsgrad", False))
    decoupled = _decoupled(optimizer, group) and wd != 0.0
    for p in params:
        st = state.get(p, {})
        m, v, t = st.get("exp_avg"), st.get("max_exp_avg_sq" if amsgrad else "exp_avg_sq"), st.get("step")
        if m is None or v is None or t is None:
            return None
        # the step count: a float, or a (CPU or device) tensor kept on its device
        t = t.to(m.device, torch.float64) if isinstance(t, torch.Tensor) else float(t)
        bc1 = 1.0 - beta1 ** t
        bc2_sqrt = (1.0 - beta2 ** t) ** 0.5
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)
        u = m.div(denom).mul_(lr / bc1)  # what the optimizer subtracted
        if decoupled:
            out.append(_pair(p.detach(), p.detach().add(u).div_(1.0 - lr * wd)))
        else:
            out.append(_pair(p.detach(), p.detach().add(u)))
    return out


def _chunks(params: Sequence[torch.Tensor]) -> list[list[int]]:
    """Consecutive index chunks of ``params`` of at most CHUNK_ELEMENTS elements (at least one parameter)."""
    out: list[list[int]] = []
    size = 0
    for k, p in enumerate(params):
        n = p.numel()
        if not out or size + n > CHUNK_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return out


def _as_dtype(ts: list[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.dtype == q.dtype else t.to(q.dtype) for t, q in zip(ts, like)]


@torch.no_grad()
def update_norms_from_state(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                            params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """||w_{t+1} - w_t|| of each of ``params`` (all in ``group``, all stepped just now) from the optimizer's
    state, as a float32 vector on their device; None when this optimizer or state is not covered. The step in
    closed form (module docstring): D = -lr b (SGD with momentum), D = -lr (s g + mu b [Nesterov] + wd w_{t+1})
    / (1 - lr wd) (SGD otherwise), D = -(u + lr wd w_{t+1}) / (1 - lr wd) (AdamW; Adam: -u); multi-tensor
    operations over chunks of at most CHUNK_ELEMENTS elements of temporaries (SGD with momentum: none), a
    constant number of Python calls per chunk. Nothing is read on the host."""
    if not params:
        return torch.zeros(0)
    device = params[0].device
    lr = group["lr"]  # a float, or a 0-dim tensor used as it is
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    state = optimizer.state
    sts = [state.get(p) or {} for p in params]
    norms: list[torch.Tensor] = []
    if type(optimizer) is torch.optim.SGD:
        mu = float(group.get("momentum", 0.0) or 0.0)
        nesterov = bool(group.get("nesterov", False))
        bufs = [st.get("momentum_buffer") for st in sts] if mu else []
        if mu and any(b is None for b in bufs):
            return None
        if mu and not nesterov:  # D = -lr b: the momentum buffers' norms, no temporary
            return torch.stack([n.float() for n in torch._foreach_norm(bufs)]).mul_(abs(lr))
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return None
        sign = -1.0 if group.get("maximize", False) else 1.0
        for ks in _chunks(params):
            ps = [params[k].detach() for k in ks]
            e = torch._foreach_mul(_as_dtype([grads[k] for k in ks], ps), sign)  # s g
            if nesterov:
                torch._foreach_add_(e, [bufs[k] for k in ks], alpha=mu)
            if wd:
                torch._foreach_add_(e, ps, alpha=wd)
            norms += torch._foreach_norm(e)
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
        # per-parameter bias corrections as 0-dim tensors computed where the step counts live (no value is
        # read on the host: architecture invariant 3), moved to the parameters' device without blocking
        t = torch.stack([x.detach().reshape(()).to(torch.float64) if isinstance(x, torch.Tensor)
                         else torch.tensor(float(x), dtype=torch.float64) for x in ts])
        if isinstance(lr, torch.Tensor) and lr.device != t.device:
            t = t.to(lr.device)
        vec = torch.stack([(1.0 - beta2 ** t).sqrt(), lr / (1.0 - beta1 ** t)]).to(ms[0].dtype)
        if vec.device != device:
            vec = (vec.pin_memory() if device.type == "cuda" else vec).to(device, non_blocking=True)
        bc2s, step = list(vec[0].unbind()), list(vec[1].unbind())
        for ks in _chunks(params):
            # the optimizer's own order: u = (lr / bc1) m / (sqrt(v) / bc2 + eps)
            den = torch._foreach_sqrt([vs[k] for k in ks])
            torch._foreach_div_(den, [bc2s[k] for k in ks])
            torch._foreach_add_(den, eps)
            torch._foreach_reciprocal_(den)
            torch._foreach_mul_(den, [ms[k] for k in ks])
            torch._foreach_mul_(den, [step[k] for k in ks])
            if decoupled:  # AdamW: D = -(u + lr wd w_{t+1}) / (1 - lr wd)
                if isinstance(lr, torch.Tensor):
                    torch._foreach_addcmul_(den, [params[k].detach() for k in ks], [lr * wd] * len(ks))
                else:
                    torch._foreach_add_(den, [params[k].detach() for k in ks], alpha=lr * wd)
            norms += torch._foreach_norm(den)
            del den
        scale = 1.0 / (1.0 - lr * wd) if decoupled else 1.0
    out = torch.stack([n.float() for n in norms])
    if isinstance(scale, torch.Tensor):
        return out.mul_(scale.abs().to(out.dtype))
    return out.mul_(abs(scale))


def optimizer_update_norms(ctx: ProbeContext, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
                           ) -> torch.Tensor:
    """||w_{t+1} - w_t|| of each of ``params`` after ``optimizer`` stepped (float32, their device), whatever
    param groups they are in (one :func:`update_norms_from_state` per group); 0 for a parameter ``optimizer``
    does not own. LookupError when the state lacks an entry the step writes."""
    device = params[0].device if params else torch.device("cpu")
    out = torch.zeros(len(params), dtype=torch.float32, device=device)
    by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
    for k, p in enumerate(params):
        if ctx.optimizer_of(p) is optimizer:
            g = ctx.group_of(p)
            if g is not None:
                by_group.setdefault(id(g), (g, []))[1].append(k)
    for g, ks in by_group.values():
        got = update_norms_from_state(optimizer, g, [params[k] for k in ks])
        if got is None:
            raise LookupError("the optimizer's state lacks an entry its step writes")
        if len(ks) == len(params):
            return got.to(out.device)
        out.index_copy_(0, torch.tensor(ks, dtype=torch.long, device=device), got.to(out.device))
    return out


def optimizer_steps(ctx: ProbeContext, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(D, w_t) of each of ``params`` after ``optimizer`` stepped, whatever param groups they are in (one
    :func:`steps_and_weights_from_state` call per group); D = 0 for a parameter ``optimizer`` does not own (it
    was not stepped). LookupError when the state lacks an entry the step writes."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(params)
    by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
    for k, p in enumerate(params):
        g = ctx.group_of(p) if ctx.optimizer_of(p) is optimizer else None
        if g is None:
            out[k] = (torch.zeros_like(p), p.detach())
        else:
            by_group.setdefault(id(g), (g, []))[1].append(k)
    for g, ks in by_group.values():
        pairs = steps_and_weights_from_state(optimizer, g, [params[k] for k in ks])
        if pairs is None:
            raise LookupError("the optimizer's state lacks an entry its step writes")
        for k, pair in zip(ks, pairs):
            out[k] = pair
    return [pair for pair in out if pair is not None]  # every slot is filled above
