"""Batches, forward calls and the mean loss shared by every diagnostic.

A *batch* is one ``(inputs, targets)`` pair or an iterable of pairs. With
several pairs the loss is the MEAN over all samples: each pair's mean loss is
weighted by its batch size (the edge-of-stability convention), not averaged
with equal weight per pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "Forward",
    "LossFn",
    "as_pairs",
    "batch_size",
    "default_forward",
    "move_to",
    "model_device_dtype",
    "trainable_named_parameters",
]

LossFn = Callable[[Any, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping (Hugging Face style), else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _is_pair(obj: Any) -> bool:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        return False
    first = obj[0]
    return isinstance(first, (torch.Tensor, Mapping)) or first is None


def as_pairs(batch: Any) -> list[tuple[Any, Any]]:
    """Normalise ``batch`` to a non-empty list of ``(inputs, targets)`` pairs."""
    if _is_pair(batch):
        return [(batch[0], batch[1])]
    if isinstance(batch, torch.Tensor):
        raise TypeError(
            "batch must be an (inputs, targets) pair or an iterable of pairs, got a bare tensor; "
            "pass (inputs, targets) or (inputs, None)"
        )
    if not isinstance(batch, Iterable):
        raise TypeError(f"batch must be an (inputs, targets) pair or an iterable of pairs, got {type(batch).__name__}")
    pairs = []
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"batch item {i} is not an (inputs, targets) pair: {type(item).__name__}")
        pairs.append((item[0], item[1]))
    if not pairs:
        raise ValueError("batch is an empty iterable: at least one (inputs, targets) pair is needed")
    return pairs


def batch_size(inputs: Any) -> int:
    """Number of samples in ``inputs``: leading dimension of the first tensor found."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.ndim > 0 else 1
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                return batch_size(v)
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        for v in inputs:
            if isinstance(v, torch.Tensor):
                return batch_size(v)
    raise TypeError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (nested in tuples, lists, dicts) to ``device``; floating tensors to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(move_to(v, device, dtype) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device, dtype) for v in obj]
    return obj


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError("the model has no floating-point parameters")


def trainable_named_parameters(
    model: nn.Module, params: Iterable[str] | nn.Module | None = None
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs with ``requires_grad``, optionally restricted.

    ``params`` may be None (all), an iterable of qualified names or name
    prefixes (a module name selects all its parameters), or a submodule of
    ``model``. Raises ValueError for unknown names or an empty selection.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        chosen = []
        for w in wanted:
            hits = [(n, p) for n, p in named if n == w or n.startswith(w + ".")]
            if not hits:
                raise ValueError(f"no trainable parameter named or under {w!r}; known: {[n for n, _ in named][:8]}...")
            chosen.extend(h for h in hits if h not in chosen)
    if not chosen:
        raise ValueError("the model has no trainable parameters (requires_grad=True) in the selection")
    return chosen
