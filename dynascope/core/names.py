"""Layer names: qualified names as the user's model gives them, without the
wrapper prefixes that DDP (``module.``), FSDP (``_fsdp_wrapped_module.``),
activation checkpointing and ``torch.compile`` (``_orig_mod.``) insert, and
module selection by type, glob pattern or predicate."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["clean_name", "is_container", "select_modules", "ModuleFilter"]

_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")
_LEADING_MODULE = re.compile(r"^(module\.)+")

ModuleFilter = None | str | type | Iterable[str | type] | Callable[[str, nn.Module], bool]


def clean_name(name: str, wrapped: bool = False) -> str:
    """Strip wrapper segments; ``wrapped`` says the root is DDP/DataParallel (strip ``module.``)."""
    name = _WRAPPER_SEGMENTS.sub("", name).lstrip(".")
    if wrapped:
        name = _LEADING_MODULE.sub("", name)
        if name == "module":
            name = ""
    return name


def is_wrapped(model: nn.Module) -> bool:
    """True for DistributedDataParallel / DataParallel roots (their child is ``module``)."""
    return type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module")


def is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _matches(name: str, module: nn.Module, flt: ModuleFilter) -> bool:
    if flt is None:
        return True
    if callable(flt) and not isinstance(flt, type):
        return bool(flt(name, module))
    items = [flt] if isinstance(flt, (str, type)) else list(flt)  # type: ignore[arg-type]
    for item in items:
        if isinstance(item, type) and isinstance(module, item):
            return True
        if isinstance(item, str) and fnmatch.fnmatchcase(name, item):
            return True
    return False


def select_modules(model: nn.Module, flt: ModuleFilter = None) -> list[tuple[str, nn.Module]]:
    """``(clean_name, module)`` for every module except the root, pure containers
    and wrappers, in ``named_modules`` order, kept when ``flt`` matches.

    ``flt``: None (all), a type, a glob pattern on the clean name (``"blocks.*"``),
    an iterable of those, or a predicate ``(name, module) -> bool``.
    """
    wrapped = is_wrapped(model)
    out: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    for raw, module in model.named_modules():
        name = clean_name(raw, wrapped)
        if not name or name in seen or is_container(module):
            continue
        seen.add(name)
        if _matches(name, module, flt):
            out.append((name, module))
    return out


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    wrapped = is_wrapped(model)
    return [(clean_name(n, wrapped), p) for n, p in model.named_parameters()]
