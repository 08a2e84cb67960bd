"""Per-example gradient statistics, mostly without per-example gradients.

What Cockpit's quantities need from a batch of ``B`` examples (``dynascope.gradient_tests``): the mean
gradient ``gbar``, each example's squared gradient norm ``|g_i|^2``, its dot product with the mean
``<g_i, gbar>``, the per-coordinate second moment ``m2 = (1/B) sum_i g_i^2`` and, for the histograms, the
per-example gradient elements themselves.

**Which per-example gradient.** ``loss_fn(outputs, targets)`` is the MEAN loss over the batch,
``L = (1/B) sum_i l_i``; ``g_i = grad l_i``, so ``gbar = mean_i g_i = grad L``. This is Cockpit's
convention: BackPACK's ``BatchGrad`` returns ``(1/B) grad l_i`` for a mean loss and each Cockpit quantity
multiplies it back by ``B`` (``B * batch_grad``; ``B**2 * sum_grad_squared``) before its formula.
With module hooks ``g_i`` is ``B`` times example ``i``'s share of ``grad L`` (its slice of the output
gradient), which is ``grad l_i`` when the examples do not interact; with ``torch.func`` it is the gradient
of ``loss_fn`` on example ``i`` alone (a batch of one). For a mean loss over independent examples the two
agree, and every parameter done by ``torch.func`` is checked against it (``mean_i g_i`` against the batch
gradient): a loss that is not a mean, examples that interact, or random layers (dropout in training mode)
raise instead of giving a silently wrong number.

**Module hooks** (``engine="auto"``): a forward hook keeps each call's input and a tensor hook on its
output keeps the output's gradient ``D`` (scaled by ``B``: ``g_i``'s share); then, with ``A`` the input
(any leading dimensions after the batch flattened into ``T`` positions, e.g. transformer tokens):

* ``nn.Linear`` weight: ``g_i = D_i^T A_i`` (``D_i``: ``T x out``, ``A_i``: ``T x in``). For ``T = 1``
  (Goodfellow 2015) ``|g_i|^2 = |D_i|^2 |A_i|^2`` and ``m2 = (1/B) (D^2)^T A^2``; for ``T > 1``
  ``|g_i|^2 = sum((D_i D_i^T) * (A_i A_i^T))`` (the Gram form, Rochette et al. 2019) when it is cheaper
  than building ``g_i``, which the second moment and the histograms need anyway (built a chunk of
  examples at a time, within ``memory_bytes``). ``<g_i, gbar> = sum(D_i * (A_i gbar^T))`` always.
* ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, numeric padding, zero padding mode): the same with ``A``
  the unfolded input patches (``T`` = output positions).
* ``nn.Embedding`` (no ``max_norm``, not sparse): ``g_i = sum_t onehot(idx_it) D_it^T``;
  ``|g_i|^2 = sum_{t,s} [idx_it = idx_is] D_it . D_is``; tokens at ``padding_idx`` contribute nothing.
* ``nn.LayerNorm`` / ``nn.RMSNorm`` affine parameters, BatchNorm's in eval mode (running statistics) and
  every layer's bias: the per-example gradients themselves (``B x`` the parameter's size:
  ``sum_t D_it * xhat_it`` and ``sum_t D_it``).

A module called several times contributes the positions of every call. A parameter whose gradient the
hooks do not rebuild (``mean_i g_i`` differs from the batch gradient: a tied weight, a weight used outside
its module's call, e.g. ``nn.MultiheadAttention``'s projections) and every other parameter goes to
``torch.func``: ``vmap`` over ``grad`` of ``functional_call`` on one example, a chunk of examples at a time
within ``memory_bytes``. ``engine="func"`` does every parameter that way and ``engine="loop"`` with an
autograd loop over the examples (the references).

**BatchNorm in training mode** has no per-example gradient (each example's loss depends on the whole
batch through its statistics). ``batchnorm="eval"`` (default) evaluates those BatchNorm layers with their
running statistics; ``batchnorm="loop"`` runs every example as a batch of one in training mode (its own
statistics; not possible for ``BatchNorm1d`` on ``(B, C)`` inputs); the result's ``notes`` and
``methods`` say which.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..core.checks import check_mode, one_of, set_mode
from ..core.guard import preserved_state, rng_state, set_rng_state
from ._batch import Forward, LossFn, as_pairs, batch_size, default_forward, take_examples, trainable_named_parameters

__all__ = ["PerExampleGrads", "HistSpec", "per_example_gradients", "MEMORY_BYTES"]

MEMORY_BYTES = 256 * 2**20  # per-example gradients built at once (a chunk of examples) stay below this
Engine = Literal["auto", "func", "loop"]
BatchNormFallback = Literal["eval", "loop"]


@dataclass(frozen=True)
class HistSpec:
    """Histogram bins: ``bins`` and ``range`` as Cockpit's ``GradHist1d`` (``bins=100``, ``range=(-2, 2)``) or
    ``GradHist2d`` (``bins=(40, 50)``, ``range=((-1, 1), (-2, 2))``: gradient elements on x, parameters on y)."""

    bins: Any
    range: Any


@dataclass(frozen=True)
class PerExampleGrads:
    """``B`` (``batch_size``) per-example gradients ``g_i`` of the mean loss ``loss`` (see the module doc):

    * ``grad``: the mean gradient ``gbar`` per parameter (``names``), ``sq_norms``: ``|g_i|^2`` (``B``, float64),
      ``dots``: ``<g_i, gbar>`` (``B``, float64), ``second_moment``: ``(1/B) sum_i g_i^2`` per parameter;
    * ``hist1d``: ``(counts, edges)`` of the per-example gradient elements (Cockpit's ``GradHist1d``: clipped
      into the range, ``torch.histc``), ``hist2d``: ``(counts, x_edges, y_edges)`` of per-example gradient
      elements (x) against the parameter's value (y) (Cockpit's ``GradHist2d``), or None when not asked;
    * ``methods``: how each parameter's per-example gradients were obtained ("linear", "conv2d",
      "embedding", "layernorm", "bias", "torch.func", "loop"), ``notes``: fallbacks taken.
    """

    batch_size: int
    loss: float
    names: tuple[str, ...]
    grad: tuple[torch.Tensor, ...]
    sq_norms: torch.Tensor
    dots: torch.Tensor
    second_moment: tuple[torch.Tensor, ...] | None
    hist1d: tuple[torch.Tensor, torch.Tensor] | None
    hist2d: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    methods: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------------------
# accumulators: what every parameter's per-example gradients add to


class _Acc:
    def __init__(self, n: int, device: torch.device, h1: HistSpec | None, h2: HistSpec | None) -> None:
        self.sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.dots = torch.zeros(n, dtype=torch.float64, device=device)
        self.h1, self.h2 = h1, h2
        self.c1 = torch.zeros(int(h1.bins), dtype=torch.float64, device=device) if h1 else None
        if h2:
            xb, yb = (int(b) for b in h2.bins)
            self.c2: torch.Tensor | None = torch.zeros(xb * yb, dtype=torch.float64, device=device)
        else:
            self.c2 = None

    def hist(self, g: torch.Tensor, value: torch.Tensor) -> None:
        """Histogram counts of per-example gradients ``g`` (``b x shape``) of a parameter with value ``value``."""
        if self.h1 is not None and self.c1 is not None:
            lo, hi = (float(v) for v in self.h1.range)
            bins = int(self.h1.bins)
            self.c1 += torch.histc(g.detach().clamp(lo, hi), bins=bins, min=lo, max=hi).to(torch.float64)
        if self.h2 is not None and self.c2 is not None:
            (xlo, xhi), (ylo, yhi) = ((float(a), float(b)) for a, b in self.h2.range)
            xb, yb = (int(b) for b in self.h2.bins)
            xw, yw = (xhi - xlo) / xb, (yhi - ylo) / yb
            x = g.detach().clamp(xlo + xw / 2, xhi - xw / 2)
            y = value.detach().clamp(ylo + yw / 2, yhi - yw / 2).expand_as(x)
            idx = yb * ((x - xlo) / xw).long() + ((y - ylo) / yw).long()
            self.c2 += torch.bincount(idx.reshape(-1), minlength=xb * yb).to(torch.float64)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Per-example sums of a ``b x ...`` tensor, in float64."""
    return t.reshape(t.shape[0], -1).sum(1, dtype=torch.float64)


def _chunk(n: int, per_example_elements: int, elem: int, budget: int) -> int:
    return max(1, min(n, budget // max(1, 3 * per_example_elements * elem)))


# --------------------------------------------------------------------------------------------------------------
# module hooks


@dataclass
class _Calls:
    """One module's calls in the batch forward: inputs (detached) and, filled by tensor hooks, output gradients."""

    kind: str
    inputs: list[Any] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m).__name__ in ("Conv1d", "Conv2d"):
        if m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
        return None
    if type(m) is nn.Embedding and m.max_norm is None and not m.sparse:
        return "embedding"
    if type(m) is nn.LayerNorm and m.elementwise_affine:
        return "layernorm"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not m.training \
            and m.running_mean is not None and m.running_var is not None:
        return "batchnorm"  # eval mode (running statistics): a per-channel affine map of each example
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and type(m) is rms and m.elementwise_affine:
        return "rmsnorm"
    return None


class _Hooks:
    def __init__(self, model: nn.Module, ids: set[int]) -> None:
        self.calls: dict[nn.Module, _Calls] = {}
        self.handles: list[Any] = []
        self.active = True
        for m in model.modules():
            kind = _kind(m)
            own = [p for p in m.parameters(recurse=False) if id(p) in ids]
            if kind is None or not own:
                continue
            self.calls[m] = _Calls(kind)
            self.handles.append(m.register_forward_hook(self._hook(m)))

    def _hook(self, m: nn.Module) -> Callable[..., None]:
        def fwd(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not self.active or not args or not isinstance(args[0], torch.Tensor):
                return
            rec = self.calls[m]
            slot = len(rec.grads)
            rec.inputs.append(args[0].detach())
            rec.grads.append(None)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                def keep(g: torch.Tensor, rec: _Calls = rec, slot: int = slot) -> None:
                    rec.grads[slot] = g.detach()
                out.register_hook(keep)
            else:
                rec.inputs[slot] = None  # no gradient can flow: mark the call unusable
        return fwd

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _factors(m: nn.Module, rec: _Calls, n: int, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, D)``: ``n x T x in`` inputs (or patches, or token ids ``n x T``) and ``n x T x out`` output gradients
    times ``scale`` over every call of ``m`` (positions of all calls concatenated); None when unusable."""
    a_parts, d_parts = [], []
    for x, g in zip(rec.inputs, rec.grads):
        if x is None or x.ndim == 0 or x.shape[0] != n:
            return None
        if g is None:  # an output no gradient reached adds nothing
            continue
        g = g * scale
        if rec.kind == "linear":
            a_parts.append(x.reshape(n, -1, x.shape[-1]))
            d_parts.append(g.reshape(n, -1, g.shape[-1]))
        elif rec.kind in ("conv1d", "conv2d"):
            assert isinstance(m, (nn.Conv1d, nn.Conv2d))
            if rec.kind == "conv1d":
                if x.ndim != 3:
                    return None
                x4 = x.unsqueeze(2)
                k, st, pd, dl = (1, m.kernel_size[0]), (1, m.stride[0]), (0, m.padding[0]), (1, m.dilation[0])  # type: ignore[index]
            else:
                if x.ndim != 4:
                    return None
                x4 = x
                k, st, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation  # type: ignore[assignment]
            patches = F.unfold(x4, k, dilation=dl, padding=pd, stride=st)  # n x (C k) x T
            a_parts.append(patches.transpose(1, 2))
            d_parts.append(g.reshape(n, g.shape[1], -1).transpose(1, 2))
        elif rec.kind == "embedding":
            assert isinstance(m, nn.Embedding)
            idx = x.reshape(n, -1)
            d = g.reshape(n, -1, g.shape[-1])
            if m.padding_idx is not None:
                d = d * (idx != m.padding_idx).unsqueeze(-1).to(d.dtype)
            a_parts.append(idx)
            d_parts.append(d)
    if not d_parts:
        return None
    return torch.cat(a_parts, 1), torch.cat(d_parts, 1)


def _norm_xhat(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        rm, rv = m.running_mean, m.running_var
        assert rm is not None and rv is not None
        return (x - rm.reshape(shape)) * torch.rsqrt(rv.reshape(shape) + m.eps)
    dims = tuple(range(-len(m.normalized_shape), 0))  # type: ignore[arg-type]
    if isinstance(m, nn.LayerNorm):
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + m.eps)
    eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps  # type: ignore[attr-defined]
    return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)


def _norm_per_example(m: nn.Module, rec: _Calls, n: int, scale: float) -> dict[str, torch.Tensor] | None:
    """Per-example gradients (``n x shape``) of a LayerNorm's / RMSNorm's / eval-mode BatchNorm's weight and bias
    over all its calls."""
    out: dict[str, torch.Tensor] = {}
    bn = rec.kind == "batchnorm"
    nd = 0 if bn else len(m.normalized_shape)  # type: ignore[arg-type]
    for x, g in zip(rec.inputs, rec.grads):
        if x is None or x.ndim <= (1 if bn else nd) or x.shape[0] != n:
            return None
        if g is None:
            continue
        g = g * scale
        lead = tuple(range(2, x.ndim)) if bn else tuple(range(1, x.ndim - nd))
        parts = {"weight": g * _norm_xhat(m, x), "bias": g}
        for name, t in parts.items():
            t = t.sum(lead) if lead else t
            out[name] = out[name] + t if name in out else t
    return out or None


def _outer_stats(a: torch.Tensor, d: torch.Tensor, gbar: torch.Tensor, shape: torch.Size, value: torch.Tensor,
                 acc: _Acc, need_m2: bool, budget: int, embedding: int = 0) -> torch.Tensor | None:
    """Per-example ``|g_i|^2`` and ``<g_i, gbar>`` into ``acc`` (and the histograms, and ``m2`` when asked) for
    ``g_i = D_i^T A_i`` (``embedding``: the vocabulary size, with ``A`` the token ids). Returns ``m2`` (shape
    ``shape``) or None."""
    n, t = d.shape[0], d.shape[1]
    out_dim = d.shape[2]
    g2 = gbar.reshape(out_dim, -1) if not embedding else gbar  # out x in  (embedding: V x dim)
    # dots: sum_t D_it . (gbar A_it)
    if embedding:
        acc.dots += _rows(d * g2[a])
    else:
        acc.dots += _rows(d * (a @ g2.t()))
    in_dim = embedding if embedding else a.shape[2]
    hist = acc.h1 is not None or acc.h2 is not None
    step = _chunk(n, out_dim * in_dim, d.element_size(), budget)
    if not embedding and t == 1:  # Goodfellow: norms and second moments from the factors; g_i only to bin it
        acc.sq += _rows(d.square()) * _rows(a.square())
        m2 = (d[:, 0].square().t() @ a[:, 0].square()).reshape(shape) / n if need_m2 else None
        if hist:
            for s in range(0, n, step):
                g = torch.einsum("bo,bi->boi", d[s:s + step, 0], a[s:s + step, 0])
                acc.hist(g.reshape((g.shape[0], *shape)), value)
        return m2
    if not hist and not need_m2:
        if embedding:  # |g_i|^2 = sum_ts [idx_it == idx_is] D_it . D_is
            same = (a.unsqueeze(2) == a.unsqueeze(1)).to(d.dtype)
            acc.sq += _rows(same * (d @ d.transpose(1, 2)))
        else:  # the Gram form
            gram_step = _chunk(n, t * t, d.element_size(), budget)
            for s in range(0, n, gram_step):
                dd, aa = d[s:s + gram_step], a[s:s + gram_step]
                acc.sq += _rows((dd @ dd.transpose(1, 2)) * (aa @ aa.transpose(1, 2)))
        return None
    # g_i built a chunk of examples at a time: the second moments (no shortcut for T > 1) and the histograms
    m2 = torch.zeros(out_dim, in_dim, dtype=d.dtype, device=d.device) if not embedding else \
        torch.zeros(embedding, out_dim, dtype=d.dtype, device=d.device)
    for s in range(0, n, step):
        dd, aa = d[s:s + step], a[s:s + step]
        b = dd.shape[0]
        if embedding:
            g = torch.zeros(b * embedding, out_dim, dtype=d.dtype, device=d.device)
            offs = (torch.arange(b, device=d.device) * embedding).unsqueeze(1)
            g.index_add_(0, (aa + offs).reshape(-1), dd.reshape(-1, out_dim))
            g = g.reshape(b, embedding, out_dim)
        else:
            g = torch.einsum("bto,bti->boi", dd, aa)
        g2 = g.square()
        acc.sq += _rows(g2)
        if need_m2:
            m2 += g2.sum(0)
        if hist:
            acc.hist(g.reshape((b, *shape)), value)
    return (m2 / n).reshape(shape) if need_m2 else None


def _dense_stats(g: torch.Tensor, gbar: torch.Tensor, value: torch.Tensor, acc: _Acc, need_m2: bool
                 ) -> torch.Tensor | None:
    """Statistics of per-example gradients ``g`` (``n x shape``) held whole."""
    n = g.shape[0]
    acc.sq += _rows(g.square())
    acc.dots += _rows(g * gbar)
    acc.hist(g, value)
    return g.square().sum(0) / n if need_m2 else None


def _close(rebuilt: torch.Tensor, gbar: torch.Tensor, scale: float) -> bool:
    """The mean of the rebuilt per-example gradients is the batch gradient, up to float rounding: ``scale``
    bounds the norm of the mean of the absolute per-example terms, against which rounding is measured."""
    eps = torch.finfo(gbar.dtype).eps
    tol = 1e-3 * float(gbar.norm()) + 1e3 * eps * scale + 1e-30
    return float((rebuilt - gbar).norm()) <= tol


# --------------------------------------------------------------------------------------------------------------
# the engine




def _unsqueeze(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.unsqueeze(0)
    if isinstance(obj, Mapping):
        return {k: _unsqueeze(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unsqueeze(v) for v in obj)
    return obj


def _scalar_loss(loss: Any, owner: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{owner}: loss_fn must return a scalar tensor (the MEAN loss over the batch)")
    return loss.reshape(())


def batchnorm_in_training(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers in training mode (no per-example gradient)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def prepare_batchnorm(model: nn.Module, batchnorm: str, engine: str, owner: str) -> tuple[str, list[str]]:
    """Apply the BatchNorm fallback to a model already in its mode (the caller's state guard restores it):
    returns the engine to use and the notes."""
    bns = batchnorm_in_training(model)
    if not bns:
        return engine, []
    shown = ", ".join(bns[:4]) + (", ..." if len(bns) > 4 else "")
    if batchnorm == "eval":
        no_stats = [n for n, m in model.named_modules() if n in bns and getattr(m, "running_mean", None) is None]
        if no_stats:
            raise ValueError(f"{owner}: BatchNorm {no_stats[0]!r} in training mode keeps no running statistics, so "
                             "it has no per-example gradient and no eval-mode fallback: pass batchnorm='loop' or "
                             "mode='eval'")
        for n, m in model.named_modules():
            if n in bns:
                m.eval()
        return engine, [f"BatchNorm in training mode has no per-example gradient: {shown} evaluated with their "
                        "running statistics (eval mode; batchnorm='eval')"]
    return "loop", [f"BatchNorm in training mode has no per-example gradient: every example run as a batch of one "
                    f"in training mode, {shown} on its own statistics (batchnorm='loop')"]


def compute_per_example(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
                        named: list[tuple[str, nn.Parameter]], *, forward: Forward, engine: str,
                        second_moment: bool, hist1d: HistSpec | None, hist2d: HistSpec | None,
                        memory_bytes: int, owner: str, notes: list[str],
                        combine: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
                        ) -> PerExampleGrads:
    """The engine on a model already in the mode to use (under the caller's state guard).

    ``combine``: maps this batch's mean gradient to the one the dot products ``<g_i, gbar>`` are taken with
    (under torch.distributed: the global batch's, every rank's weighted and summed); ``grad`` is then that
    one. None: this batch's own."""
    n = batch_size(inputs)
    names = [nm for nm, _ in named]
    ps = [p for _, p in named]
    device = ps[0].device
    acc = _Acc(n, device, hist1d, hist2d)
    methods: dict[str, str] = {}
    m2s: list[torch.Tensor | None] = [None] * len(ps)
    if engine == "loop":
        gbar, loss = _loop(model, loss_fn, inputs, targets, ps, forward, acc, m2s, second_moment, owner, combine)
        methods = {nm: "loop" for nm in names}
    else:
        ids = {id(p) for p in ps}
        hooks = _Hooks(model, ids) if engine == "auto" else None
        try:
            loss_t = _scalar_loss(loss_fn(forward(model, inputs), targets), owner)
        finally:
            if hooks is not None:
                hooks.remove()
        grads = torch.autograd.grad(loss_t, ps, allow_unused=True)
        gbar = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(ps, grads)]
        loss = float(loss_t.detach())  # one host read: the value CABS divides by
        ref = gbar if combine is None else combine(gbar)
        done: set[int] = set()
        if hooks is not None:
            done = _from_hooks(hooks, ps, gbar, ref, n, acc, m2s, second_moment, memory_bytes, methods, names,
                               notes)
        rest = [i for i in range(len(ps)) if i not in done]
        if rest:
            _from_func(model, loss_fn, inputs, targets, named, rest, forward, gbar, ref, acc, m2s, second_moment,
                       memory_bytes, owner)
            for i in rest:
                methods[names[i]] = "torch.func"
        gbar = ref
    m2 = tuple(t if t is not None else torch.zeros_like(p) for t, p in zip(m2s, ps)) if second_moment else None
    h1 = h2 = None
    if hist1d is not None and acc.c1 is not None:
        lo, hi = (float(v) for v in hist1d.range)
        h1 = (acc.c1, torch.linspace(lo, hi, int(hist1d.bins) + 1, dtype=torch.float64))
    if hist2d is not None and acc.c2 is not None:
        (xlo, xhi), (ylo, yhi) = ((float(a), float(b)) for a, b in hist2d.range)
        xb, yb = (int(b) for b in hist2d.bins)
        h2 = (acc.c2.reshape(xb, yb), torch.linspace(xlo, xhi, xb + 1, dtype=torch.float64),
              torch.linspace(ylo, yhi, yb + 1, dtype=torch.float64))
    return PerExampleGrads(n, loss, tuple(names), tuple(gbar), acc.sq, acc.dots, m2, h1, h2, methods, tuple(notes))


def _from_hooks(hooks: _Hooks, ps: list[nn.Parameter], gbar: list[torch.Tensor], ref: list[torch.Tensor], n: int,
                acc: _Acc, m2s: list[torch.Tensor | None], need_m2: bool, budget: int, methods: dict[str, str],
                names: list[str], notes: list[str]) -> set[int]:
    """The parameters the hooks rebuild (checked against this batch's gradient ``gbar``; the dot products
    taken with ``ref``)."""
    index = {id(p): i for i, p in enumerate(ps)}
    done: set[int] = set()
    for m, rec in hooks.calls.items():
        if not rec.inputs:
            continue
        own = {nm: p for nm, p in m.named_parameters(recurse=False) if id(p) in index}
        if rec.kind in ("layernorm", "rmsnorm", "batchnorm"):
            per = _norm_per_example(m, rec, n, float(n))
            if per is None:
                continue
            for nm, p in own.items():
                i = index[id(p)]
                g = per.get(nm)
                if g is None or not _close(g.mean(0), gbar[i], float(g.abs().mean(0).norm())):
                    notes.append(f"{names[i]}: the hooks did not rebuild its gradient (used outside its "
                                 f"module's call?): torch.func instead")
                    continue
                m2s[i] = _dense_stats(g, ref[i], p, acc, need_m2)
                methods[names[i]] = rec.kind
                done.add(i)
            continue
        fac = _factors(m, rec, n, float(n))
        if fac is None:
            continue
        a, d = fac
        for nm, p in own.items():
            i = index[id(p)]
            if nm == "bias":
                g = d.sum(1)
                ok = _close(g.mean(0), gbar[i], float(g.abs().mean(0).norm()))
                if ok:
                    m2s[i] = _dense_stats(g, ref[i], p, acc, need_m2)
                    methods[names[i]] = "bias"
            elif nm == "weight":
                emb = int(p.shape[0]) if rec.kind == "embedding" else 0
                if emb:
                    rebuilt = torch.zeros_like(p).index_add_(0, a.reshape(-1), d.reshape(-1, d.shape[-1])) / n
                else:
                    rebuilt = torch.einsum("bto,bti->oi", d, a).reshape(p.shape) / n
                ok = _close(rebuilt, gbar[i], float(d.norm() * (a.norm() if not emb else math.sqrt(a.numel()))) / n)
                if ok:
                    m2s[i] = _outer_stats(a, d, ref[i], p.shape, p, acc, need_m2, budget, embedding=emb)
                    methods[names[i]] = rec.kind
            else:
                ok = False
            if ok:
                done.add(i)
            else:
                notes.append(f"{names[i]}: the hooks did not rebuild its gradient (a tied weight, or used outside "
                             f"its module's call): torch.func instead")
    return done


def _from_func(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any,
               named: list[tuple[str, nn.Parameter]], rest: list[int], forward: Forward,
               gbar: list[torch.Tensor], ref: list[torch.Tensor], acc: _Acc, m2s: list[torch.Tensor | None],
               need_m2: bool, budget: int, owner: str) -> None:
    """Per-example gradients of the parameters ``rest`` by ``vmap(grad(...))``, a chunk of examples at a time."""
    n = batch_size(inputs)
    chosen = {named[i][0]: named[i][1].detach() for i in rest}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in chosen}
    buffers = dict(model.named_buffers())

    class _Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return forward(self.model, x)

    call = _Call()

    def one(theta: dict[str, torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        state = {**{"model." + k: v for k, v in fixed.items()}, **{"model." + k: v for k, v in theta.items()},
                 **{"model." + k: v for k, v in buffers.items()}}
        out = functional_call(call, state, (_unsqueeze(x),))
        return _scalar_loss(loss_fn(out, _unsqueeze(y)), owner)

    per_fn = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
    elems = sum(named[i][1].numel() for i in rest)
    step = _chunk(n, elems, named[rest[0]][1].element_size(), budget)
    sums = {i: torch.zeros_like(named[i][1]) for i in rest}
    abs_sums = {i: torch.zeros_like(named[i][1]) for i in rest}
    m2 = {i: torch.zeros_like(named[i][1]) for i in rest}
    for s in range(0, n, step):
        with warnings.catch_warnings():  # vmap's fallback for ops without a batching rule (attention on CPU)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            gs = per_fn(chosen, take_examples(inputs, s, s + step), take_examples(targets, s, s + step))
        for i in rest:
            g = gs[named[i][0]].detach()
            acc.sq += _rows(g.square())
            acc.dots += _rows(g * ref[i])
            sums[i] += g.sum(0)
            abs_sums[i] += g.abs().sum(0)
            if need_m2:
                m2[i] += g.square().sum(0)
            acc.hist(g, named[i][1])
    for i in rest:
        if not _close(sums[i] / n, gbar[i], float(abs_sums[i].norm()) / n):
            raise ValueError(f"{owner}: the mean of the per-example gradients of {named[i][0]!r} is not the batch "
                             "gradient: loss_fn must be the MEAN over independent examples (no BatchNorm in "
                             "training mode, no dropout: use mode='eval')")
        if need_m2:
            m2s[i] = m2[i] / n


def _loop(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, ps: list[nn.Parameter],
          forward: Forward, acc: _Acc, m2s: list[torch.Tensor | None], need_m2: bool, owner: str,
          combine: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
          ) -> tuple[list[torch.Tensor], float]:
    """The per-example loop: each example as a batch of one; two passes (the mean first, then the dots with it,
    or with ``combine`` of it) under the same random state. Returns the gradient the dots were taken with."""
    n = batch_size(inputs)
    start = rng_state()

    def each(i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        x_i, y_i = take_examples(inputs, i, i + 1), take_examples(targets, i, i + 1)
        lt = _scalar_loss(loss_fn(forward(model, x_i), y_i), owner)
        gs = torch.autograd.grad(lt, ps, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(ps, gs)], lt.detach()

    total = [torch.zeros_like(p) for p in ps]
    m2 = [torch.zeros_like(p) for p in ps]
    losses = []
    for i in range(n):
        gs, lt = each(i)
        losses.append(lt)
        for t, q, g in zip(total, m2, gs):
            t += g
            if need_m2:
                q += g.square()
    gbar = [t / n for t in total]
    if combine is not None:
        gbar = combine(gbar)
    set_rng_state(start)
    for i in range(n):
        gs, _ = each(i)
        for p, g, gb in zip(ps, gs, gbar):
            acc.sq[i] += g.to(torch.float64).square().sum()
            acc.dots[i] += (g.to(torch.float64) * gb).sum()
            acc.hist(g.unsqueeze(0), p)
    if need_m2:
        for j, q in enumerate(m2):
            m2s[j] = q / n
    return gbar, float(torch.stack(losses).mean())


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Any = None,
    forward: Forward | None = None,
    mode: Literal["eval", "train", "current"] = "eval",
    engine: Engine = "auto",
    batchnorm: BatchNormFallback = "eval",
    second_moment: bool = True,
    hist1d: HistSpec | None = None,
    hist2d: HistSpec | None = None,
    memory_bytes: int = MEMORY_BYTES,
) -> PerExampleGrads:
    """Per-example gradient statistics of ``loss_fn`` (the MEAN loss) on one ``(inputs, targets)`` batch.

    ``engine``: "auto" (module hooks where they apply, ``torch.func`` for the rest), "func" (``torch.func``
    for every parameter) or "loop" (an autograd loop over the examples). ``mode``: "eval" (default),
    "train" or "current"; ``batchnorm``: the fallback for BatchNorm in training mode ("eval": running
    statistics; "loop": each example its own batch). ``params``: the parameters that count (default: every
    trainable one). ``hist1d`` / ``hist2d``: histogram bins (None: no histogram; the histograms need the
    per-example gradients, built a chunk of examples at a time within ``memory_bytes``). The model, its
    ``.grad``, buffers, modes and the RNG are restored.
    """
    owner = "per_example_gradients"
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable, got {type(loss_fn).__name__}")
    check_mode(mode, owner)
    one_of("engine", engine, ("auto", "func", "loop"), owner)
    one_of("batchnorm", batchnorm, ("eval", "loop"), owner)
    inputs, targets = single_pair(batch, owner)
    named = trainable_named_parameters(model, params)
    with preserved_state(model, params=False), torch.enable_grad():
        set_mode(model, mode)
        eng, notes = prepare_batchnorm(model, batchnorm, engine, owner)
        return compute_per_example(model, loss_fn, inputs, targets, named, forward=forward or default_forward,
                                   engine=eng, second_moment=second_moment, hist1d=hist1d, hist2d=hist2d,
                                   memory_bytes=memory_bytes, owner=owner, notes=notes)


def single_pair(batch: Any, owner: str, min_examples: int = 2) -> tuple[Any, Any]:
    pairs = as_pairs(batch)
    if len(pairs) != 1:
        raise ValueError(f"{owner}: give one (inputs, targets) batch, got {len(pairs)} pairs")
    inputs, targets = pairs[0]
    n = batch_size(inputs)
    if n < min_examples:
        raise ValueError(f"{owner}: the per-example statistics need a batch of at least 2 examples, got {n}")
    return inputs, targets

