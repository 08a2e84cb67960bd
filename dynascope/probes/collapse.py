"""Scheduled neural collapse (Papyan, Han and Donoho 2020) of one layer's features on a fixed labelled batch.

Recorded with layer = the module's name: ``collapse.nc1``,
``collapse.equinorm``, ``collapse.equiangular``, and ``collapse.input`` (1 when
the features are the module's input, 0 for its output). The features are the output
of the module named ``layer``, or by default the INPUT of the model's last
``nn.Linear`` (the penultimate features the classifier reads), flattened to
``(examples, -1)``. Formulas: :mod:`dynascope.diagnostics.collapse`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.checks import check_mode, set_mode
from ..core.guard import preserved_state
from ..core.names import clean_name, is_wrapped
from ..core.outputs import first_tensor
from ..diagnostics._batch import Forward, default_forward
from ..diagnostics._dist import gather_rows
from ..diagnostics.collapse import neural_collapse
from ._eval import DeviceBatch
from .scheduled import Scheduled, ScheduledContext

__all__ = ["Collapse", "feature_module"]


def feature_module(model: nn.Module, layer: str | None) -> tuple[str, nn.Module, bool]:
    """``(name, module, use_input)``: the module named ``layer`` (its output), or the last ``nn.Linear``
    (its input). ValueError naming the choices when there is none."""
    wrapped = is_wrapped(model)
    named = [(clean_name(n, wrapped), m) for n, m in model.named_modules()]
    if layer is None:
        linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("Collapse: the model has no nn.Linear whose input could be the features; name a "
                             "module with layer=")
        return linears[-1][0], linears[-1][1], True
    for n, m in named:
        if n == layer:
            return n, m, False
    known = [n for n, _ in named if n][:10]
    raise ValueError(f"Collapse: no module named {layer!r}; known: {known}{' ...' if len(named) > 11 else ''}")


class Collapse(Scheduled):
    """Neural collapse of the features at ``layer`` (default: the input of the last ``nn.Linear``) on ``batch``
    (``(inputs, labels)`` or a list of pairs; labels are class indices) every ``every`` steps, in ``mode``
    "eval" (default), "train" or "current"."""

    name = "collapse"

    def __init__(
        self,
        every: int | None = None,
        batch: Any = None,
        layer: str | None = None,
        *,
        at: Sequence[int] | str | None = None,
        mode: Literal["eval", "train", "current"] = "eval",
        forward: Forward | None = None,
    ) -> None:
        super().__init__(every=every, at=at)
        check_mode(mode, "Collapse")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"Collapse: layer must be a module name (str) or None, got {type(layer).__name__}")
        self.batch = DeviceBatch(batch, "Collapse")
        self.layer = layer
        self.mode = mode
        self.forward = forward or default_forward

    def run(self, ctx: ScheduledContext) -> None:
        model = ctx.model
        name, module, use_input = feature_module(model, self.layer)
        feats: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: Any, output: Any = None) -> None:
            t = first_tensor(args if use_input else output)
            if t is not None:
                feats.append(t.detach().reshape(t.shape[0], -1))

        labels = []
        with preserved_state(model, params=False, grads=False), torch.no_grad():
            set_mode(model, self.mode)
            handle = module.register_forward_pre_hook(grab) if use_input else module.register_forward_hook(grab)
            try:
                for x, y in self.batch.on(model):
                    before = len(feats)
                    self.forward(model, x)
                    if len(feats) != before + 1:
                        raise ValueError(f"Collapse: module {name!r} ran {len(feats) - before} times in one forward "
                                         "pass; name a module that runs once with layer=")
                    labels.append(y)
            finally:
                handle.remove()
        # torch.distributed: every rank's shard of the batch, in rank order (one process on the global batch)
        res = neural_collapse(*gather_rows(torch.cat(feats), torch.cat(labels)))
        for metric, value in res.rows():
            ctx.log(metric, value, name)
        ctx.log("collapse.input", float(use_input), name)  # 1: the module's input was measured, 0: its output
