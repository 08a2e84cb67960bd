"""What a module returned, as one tensor: the hooks that read a module's output (activation statistics,
plasticity, neural collapse) take the same one."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["first_tensor"]


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in a module's output, depth first: the output itself, the first tensor of a tuple
    or list (``(None, x)`` gives ``x``), of a dict's values, or of a Hugging Face ``ModelOutput``
    (``to_tuple()``); None when it holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # Hugging Face ModelOutput (also a dict)
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            t = first_tensor(item)
            if t is not None:
                return t
    return None
