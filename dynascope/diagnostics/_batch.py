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
    "take_examples",
    "Forward",
    "LossFn",
    "as_pairs",
    "batch_size",
    "default_forward",
    "default_loss",
    "lm_targets",
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


def _causal_lm_output(outputs: Any) -> bool:
    """A Hugging Face ``ModelOutput`` of a causal language model (``CausalLMOutput``, ``...WithPast``,
    ``...WithCrossAttentions``): next-token logits, shifted by one against the input ids."""
    return any(c.__name__.startswith("CausalLMOutput") for c in type(outputs).__mro__)


def default_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """The default loss: cross entropy of a tensor output against ``targets``; for a model output with a
    ``.loss`` (a Hugging Face model given ``labels``) that loss; for a causal LM's output with ``.logits`` the
    next-token cross entropy, ``logits[:, :-1]`` against ``targets[:, 1:]`` (``targets``: the input ids, as
    Hugging Face's ``labels``; -100 ignored).

    >>> import torch
    >>> float(default_loss(torch.zeros(2, 4), torch.tensor([0, 1])))  # log 4
    1.3862943649291992
    """
    import torch.nn.functional as F

    if isinstance(outputs, torch.Tensor):
        return F.cross_entropy(outputs, targets)
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor) and _causal_lm_output(outputs):
        if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:-1]:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"a causal LM's logits {tuple(logits.shape)} need the input ids "
                             f"{tuple(logits.shape[:-1])} as targets for the next-token loss, got {got}")
        return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                               targets[..., 1:].reshape(-1).long(), ignore_index=-100)
    raise TypeError(f"the default loss (cross entropy) needs a tensor output, a model output with .loss, or a "
                    f"causal LM's output with .logits; got {type(outputs).__name__}: pass a loss function")


def lm_targets(inputs: Any) -> torch.Tensor | None:
    """The input ids in ``inputs`` (an integer tensor, or a mapping's ``input_ids``): the targets of a causal
    LM's next-token loss when none are given; None otherwise."""
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input_ids")
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and not inputs.is_complex() \
            and inputs.dtype != torch.bool and inputs.ndim >= 2:
        return inputs
    return None


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


def take_examples(obj: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (tensors sliced on dim 0, nested in mappings, tuples, lists)."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.ndim > 0 else obj
    if isinstance(obj, Mapping):
        return {k: take_examples(v, start, stop) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(take_examples(v, start, stop) for v in obj)
    return obj


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
