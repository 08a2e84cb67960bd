"""Listeners: objects a session calls with the ``(step, metric, layer, value)`` rows of every flush
(:meth:`dynascope.Session.add_listener`). :class:`TensorBoardMirror` mirrors them to a TensorBoard
``SummaryWriter`` (``dynascope.probe(..., tensorboard=LOGDIR_OR_WRITER)``); ``dynascope export``
(:mod:`dynascope.integrations.tensorboard`) writes a saved run the same way.

Tags: ``<prefix><metric>/<layer>`` for per-layer rows and ``<prefix><metric>`` for run-level ones,
prefix ``"dynascope."`` by default. Needs the ``tensorboard`` package, imported only when used.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["TensorBoardMirror", "tag", "DEFAULT_PREFIX", "Row"]

DEFAULT_PREFIX = "dynascope."

Row = tuple[int, str, str, float]


def tag(metric: str, layer: str, prefix: str = DEFAULT_PREFIX) -> str:
    """TensorBoard tag of one scalar row."""
    return f"{prefix}{metric}/{layer}" if layer else f"{prefix}{metric}"


def _summary_writer(logdir: str | os.PathLike[str]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when tensorboard is missing
        raise ImportError(
            "TensorBoard output needs the tensorboard package: pip install 'dynascope[tensorboard]'") from exc
    return SummaryWriter(log_dir=os.fspath(logdir))


class TensorBoardMirror:
    """Flush listener that writes each row as ``writer.add_scalar(tag, value, step)``.

    ``target``: a log directory (a SummaryWriter is opened there and closed with
    the session) or an object with ``add_scalar`` such as the user's own
    ``SummaryWriter`` (flushed, not closed, at the end). ``metrics``: glob
    patterns of metric names to mirror (default: all).
    """

    def __init__(self, target: Any, prefix: str = DEFAULT_PREFIX, metrics: Sequence[str] | None = None) -> None:
        if hasattr(target, "add_scalar"):
            self.writer, self._owned = target, False
        elif isinstance(target, (str, os.PathLike)):
            self.writer, self._owned = _summary_writer(target), True
        else:
            raise TypeError("tensorboard= must be a log directory or a SummaryWriter (an object with add_scalar), "
                            f"got {type(target).__name__}")
        self.prefix = prefix
        self.metrics = list(metrics) if metrics is not None else None
        self.written = 0

    def _wanted(self, metric: str) -> bool:
        return self.metrics is None or any(fnmatch.fnmatchcase(metric, p) for p in self.metrics)

    def __call__(self, rows: Iterable[Row]) -> None:
        for step, metric, layer, value in sorted(rows, key=lambda r: r[0]):
            if self._wanted(metric):
                self.writer.add_scalar(tag(metric, layer, self.prefix), float(value), global_step=int(step))
                self.written += 1
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        elif callable(getattr(self.writer, "flush", None)):
            self.writer.flush()
