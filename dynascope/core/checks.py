"""Argument checks shared by the public entry points, with errors that name the bad value."""

from __future__ import annotations

from typing import Any

__all__ = ["positive_int"]


def positive_int(name: str, value: Any, owner: str = "") -> int:
    """``value`` if it is an int >= 1 (bools refused), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be an integer >= 1, got {value!r}")
    return value
