"""Shared by the scheduled recorders that evaluate a fixed probe batch: batches kept on the model's device,
and the logits of a model output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..diagnostics._batch import as_pairs, model_device_dtype, move_to
from ..diagnostics.scores import _logits as logits_of

__all__ = ["DeviceBatch", "logits_of"]


class DeviceBatch:
    """A fixed list of ``(inputs, targets)`` pairs, moved to the model's device once (again if it moves)."""

    def __init__(self, batch: Any, owner: str) -> None:
        if batch is None:
            raise ValueError(f"{owner}: batch=(inputs, targets) is required (a fixed held-out batch)")
        try:
            self.pairs = as_pairs(batch)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{owner}: {exc}") from None
        for _, y in self.pairs:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"{owner}: the batch needs targets (a tensor of class indices), got "
                                f"{type(y).__name__}")
        self._device: torch.device | None = None
        self._moved: list[tuple[Any, Any]] = []

    def on(self, model: nn.Module) -> list[tuple[Any, Any]]:
        device, _ = model_device_dtype(model)
        if device != self._device:
            self._moved = [(move_to(x, device), move_to(y, device)) for x, y in self.pairs]
            self._device = device
        return self._moved
