"""Gradients as the loss produced them: the moment before gradient clipping.

A loop that clips (``torch.nn.utils.clip_grad_norm_``, which Hugging Face's Trainer, accelerate and
Lightning call) changes the gradients between the end of the backward pass and the optimizer's step, where
the session's step pre-hook would read them. While a session is open, :class:`ClipWatch` intercepts the
clipping itself: ``clip_grad_norm_`` computes the total norm and then calls
``torch.nn.utils.clip_grad._clip_grads_with_norm_`` (looked up in its module at each call, so it is
intercepted however the user imported ``clip_grad_norm_``); the public ``torch.nn.utils.clip_grads_with_norm_``
is patched too. Just before the gradients are scaled down the watch calls its listeners with the parameters,
``max_norm`` and the total norm clipping computed; the session reads the gradients there (after
accumulation and after ``GradScaler.unscale_``, which must precede clipping) and records how much clipping
changed them (``grad.clip_coef``). The clipping itself runs unchanged.

Scoped: installed when the first session opens and removed when the last one closes; a listener that fails
is dropped with one warning and clipping goes on (probing never stops training).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.errors import describe

__all__ = ["ClipWatch", "Listener"]

#: called with (parameters, max_norm, total_norm) just before the gradients are clipped
Listener = Callable[[Sequence[torch.Tensor], float, torch.Tensor], None]

_lock = threading.Lock()


class ClipWatch:
    """The one interception of gradient clipping in this process, shared by every open session."""

    _listeners: list[Listener] = []
    _originals: dict[tuple[Any, str], Any] = {}

    @classmethod
    def add(cls, listener: Listener) -> None:
        with _lock:
            if not cls._listeners:
                cls._install()
            cls._listeners.append(listener)

    @classmethod
    def remove(cls, listener: Listener) -> None:
        with _lock:
            if listener in cls._listeners:
                cls._listeners.remove(listener)
            if not cls._listeners:
                cls._uninstall()

    @classmethod
    def _targets(cls) -> list[tuple[Any, str]]:
        import torch.nn.utils as utils
        import torch.nn.utils.clip_grad as clip_grad

        out = [(m, n) for m, n in ((clip_grad, "_clip_grads_with_norm_"), (utils, "clip_grads_with_norm_"))
               if callable(getattr(m, n, None))]
        return out

    @classmethod
    def _install(cls) -> None:
        for module, name in cls._targets():
            original = getattr(module, name)
            if getattr(original, "_dynascope_watch", False):
                continue
            cls._originals[(module, name)] = original
            setattr(module, name, cls._wrap(original))

    @classmethod
    def _uninstall(cls) -> None:
        for (module, name), original in cls._originals.items():
            if getattr(getattr(module, name, None), "_dynascope_watch", False):
                setattr(module, name, original)
        cls._originals.clear()

    @classmethod
    def _wrap(cls, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor,
                                  foreach: bool | None = None) -> Any:
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            else:
                parameters = list(parameters)
            for listener in list(cls._listeners):
                try:
                    listener(parameters, max_norm, total_norm)
                except Exception as exc:  # noqa: BLE001 - probing never stops training
                    cls.remove(listener)
                    warnings.warn(f"dynascope: reading the gradients before clipping failed ({describe(exc)}); "
                                  "they are read at the optimizer step from now on, training goes on unchanged",
                                  RuntimeWarning, stacklevel=3)
            return original(parameters, max_norm, total_norm, foreach)

        clip_grads_with_norm_._dynascope_watch = True  # type: ignore[attr-defined]
        clip_grads_with_norm_.__wrapped__ = original  # type: ignore[attr-defined]
        clip_grads_with_norm_.__doc__ = original.__doc__
        return clip_grads_with_norm_
