"""Argument checks shared by the public entry points, with errors that name the bad value."""

from __future__ import annotations

from typing import Any

__all__ = ["positive_int", "one_of", "check_mode", "set_mode", "MODES"]


def positive_int(name: str, value: Any, owner: str = "") -> int:
    """``value`` if it is an int >= 1 (bools refused), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be an integer >= 1, got {value!r}")
    return value


MODES = ("eval", "train", "current")


def one_of(name: str, value: Any, choices: tuple[str, ...], owner: str = "") -> str:
    """``value`` if it is one of ``choices``, else ValueError naming it and the choices."""
    if value not in choices:
        prefix = f"{owner}: " if owner else ""
        names = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}" if len(choices) > 1 else \
            repr(choices[0])
        raise ValueError(f"{prefix}{name} must be {names}, got {value!r}")
    return value


def check_mode(mode: Any, owner: str = "", choices: tuple[str, ...] = MODES) -> str:
    """The train/eval mode a diagnostic runs its model in: ``"eval"``, ``"train"`` or ``"current"`` (leave
    it as it is); ValueError naming the bad value."""
    return one_of("mode", mode, choices, owner)


def set_mode(model: Any, mode: str) -> None:
    """Put ``model`` in ``mode`` (``"current"`` leaves it as it is); the caller's state guard restores it."""
    if mode != "current":
        model.train(mode == "train")
