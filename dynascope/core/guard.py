"""State guard: run code that may move weights or consume randomness, then put
everything back exactly (architecture invariant 4).

Restored on exit, also when the body raises: parameter values, ``requires_grad``
flags, ``.grad`` tensors (values and identity of None), buffers (BatchNorm
running statistics, ``num_batches_tracked``), every module's train/eval mode,
and the torch RNG state of the CPU and of every initialised CUDA device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved_state", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, object]:
    """Snapshot of torch's CPU RNG and, where CUDA is initialised, every CUDA RNG."""
    state: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["cpu"])  # type: ignore[arg-type]
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]


@contextlib.contextmanager
def preserved_state(
    model: nn.Module, *, params: bool = True, grads: bool = True, buffers: bool = True
) -> Iterator[None]:
    """Context manager that restores ``model`` (and the global RNG) exactly on exit.

    ``params=False`` skips the parameter copy for code that only runs forward
    passes (it still restores buffers, modes and RNG), which saves one copy of
    the weights.
    """
    modes = [(m, m.training) for m in model.modules()]
    named = list(model.named_parameters())
    saved_params = [p.detach().clone() for _, p in named] if params else None
    flags = [p.requires_grad for _, p in named]
    saved_grads = [p.grad for _, p in named] if grads else None
    grad_values = (
        [None if g is None else g.detach().clone() for g in saved_grads] if saved_grads is not None else None
    )
    bufs = list(model.buffers())
    saved_bufs = [b.detach().clone() for b in bufs] if buffers else None
    rng = rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, p), flag in zip(named, flags):
                p.requires_grad_(flag)
            if saved_params is not None:
                for (_, p), v in zip(named, saved_params):
                    p.copy_(v)
            if saved_grads is not None and grad_values is not None:
                for (_, p), g, v in zip(named, saved_grads, grad_values):
                    if g is None:
                        p.grad = None
                    else:
                        # Keep the caller's .grad tensor object (optimizers and
                        # DDP hold references) and its exact values.
                        g.copy_(v)
                        p.grad = g
            if saved_bufs is not None:
                for b, v in zip(bufs, saved_bufs):
                    b.copy_(v)
        for m, mode in modes:
            m.training = mode
        set_rng_state(rng)
