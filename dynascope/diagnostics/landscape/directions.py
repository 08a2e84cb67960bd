"""Filter-normalized random directions (Li et al. 2018) and checks of
user-given directions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .._batch import (
    trainable_named_parameters,
)

Direction = dict[str, torch.Tensor]

#: Module types whose parameters count as normalization-layer parameters.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _norm_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def _is_filter_weight(p: torch.Tensor, norm_ids: set[int]) -> bool:
    return p.ndim >= 2 and id(p) not in norm_ids


def _row_normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d_i <- d_i / ||d_i|| * ||w_i||`` per row of ``flatten(1)``; zero rows of
    ``w`` (or of ``d``) give zero rows, never a division by zero."""
    work = torch.promote_types(w.dtype, torch.float32)  # float32 at least, float64 for float64 models
    d2 = d.flatten(1).to(work)
    w2 = w.detach().flatten(1).to(work)
    dn = torch.linalg.vector_norm(d2, dim=1, keepdim=True)
    wn = torch.linalg.vector_norm(w2, dim=1, keepdim=True)
    scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
    return (d2 * scale).reshape(d.shape)


def filter_normalized_direction(
    model: nn.Module,
    seed: int | None = 0,
    *,
    generator: torch.Generator | None = None,
    include_bias_bn: bool = False,
    params: Iterable[str] | nn.Module | None = None,
) -> Direction:
    """A random Gaussian direction, filter-normalized as in Li et al. (2018).

    For every trainable weight with ``ndim >= 2`` outside normalization layers,
    each row of ``d.flatten(1)`` (one output unit / filter) is rescaled to the
    norm of the matching row of the weight. Biases, other 1-D parameters and
    normalization-layer parameters are zero unless ``include_bias_bn=True``;
    then each such tensor is rescaled as a whole to the tensor's norm (the
    reference code instead copies the weight itself into the direction).

    The Gaussian is drawn in float32 on the CPU from ``generator`` (or a fresh
    one seeded with ``seed``), one tensor per trainable parameter in model
    order, so the direction is reproducible and the same on every device; it is
    returned on each parameter's device and dtype, keyed by parameter name.
    """
    if generator is None:
        if seed is None:
            raise ValueError("give seed= (an int) or generator= so the direction is reproducible")
        generator = torch.Generator().manual_seed(int(seed))
    norm_ids = _norm_param_ids(model)
    out: Direction = {}
    for name, p in trainable_named_parameters(model, params):
        g = torch.randn(p.shape, generator=generator, dtype=torch.float32)  # drawn for every tensor: stable stream
        g = g.to(device=p.device)
        if _is_filter_weight(p, norm_ids):
            d = _row_normalize(g, p)
        elif include_bias_bn:
            d = _row_normalize(g.reshape(1, -1), p.detach().reshape(1, -1)).reshape(p.shape)
        else:
            d = torch.zeros_like(g)
        out[name] = d.to(dtype=p.dtype)
    return out


def _dot(a: Direction, b: Direction) -> float:
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in a if k in b))


def _check_direction(model: nn.Module, d: Mapping[str, torch.Tensor], which: str) -> Direction:
    named = dict(model.named_parameters())
    unknown = [k for k in d if k not in named]
    if unknown:
        raise ValueError(f"direction {which} names parameters the model does not have: {unknown[:5]}")
    out: Direction = {}
    for k, v in d.items():
        p = named[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"direction {which}[{k!r}] has shape {shape}, the parameter has {tuple(p.shape)}")
        out[k] = v.detach().to(device=p.device, dtype=p.dtype)
    if not out:
        raise ValueError(f"direction {which} is empty")
    return out
