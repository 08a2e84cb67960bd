"""Errors and their one-line text.

:class:`UserError` is an expected failure caused by the user's input (the CLI prints it as one line
and exits with 2); :func:`one_line` and :func:`describe` are the one text of an exception that every
warning, record and error message uses."""

from __future__ import annotations

__all__ = ["UserError", "one_line", "describe", "MAX_LINE"]

MAX_LINE = 200  # characters of an exception's text kept in a one-line message


class UserError(Exception):
    """An expected failure caused by the user's input; printed as one line, exit code 2."""


def one_line(exc: BaseException, limit: int = MAX_LINE) -> str:
    """The exception's message on one line (whitespace folded), at most ``limit`` characters; its type's
    name when it has no message."""
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


def describe(exc: BaseException, limit: int = MAX_LINE) -> str:
    """``"TypeName: message"`` on one line (see :func:`one_line`)."""
    return f"{type(exc).__name__}: {one_line(exc, limit)}"
