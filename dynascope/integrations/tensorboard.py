"""TensorBoard: export a run's scalars to event files, or mirror them live.

``dynascope export RUN --tensorboard LOGDIR`` writes every scalar row
``(step, metric, layer, value)`` of RUN as a TensorBoard scalar; with several
runs each goes to ``LOGDIR/<run name>`` so TensorBoard shows them side by side.
``dynascope.probe(..., tensorboard=LOGDIR_OR_WRITER)`` (or
``run.add_listener(TensorBoardMirror(writer))``) mirrors the rows of every
flush to a ``torch.utils.tensorboard.SummaryWriter`` while training runs, so
the curves appear beside the user's own.

Tags: ``<prefix><metric>/<layer>`` for per-layer rows and ``<prefix><metric>``
for run-level ones, prefix ``"dynascope."`` by default, e.g.
``dynascope.act.channel_var/blocks.3`` and ``dynascope.loss``. TensorBoard
groups tags by the part before the first ``/``, so each metric gets its own
section with one chart per layer, apart from the user's tags.

Needs the ``tensorboard`` package (``pip install dynascope[tensorboard]``),
imported only when used.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["TensorBoardMirror", "export", "tag", "DEFAULT_PREFIX", "add_arguments", "run"]

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


def export(run_dir: str | os.PathLike[str], logdir: str | os.PathLike[str], *, prefix: str = DEFAULT_PREFIX,
           metrics: Sequence[str] | None = None) -> int:
    """Write the scalars of the run at ``run_dir`` to TensorBoard event files in
    ``logdir``; returns the number of scalars written. NaN stays NaN."""
    from ..store import load_run

    data = load_run(run_dir)
    df = data._query("SELECT step, metric, layer, value FROM scalars ORDER BY step, metric, layer")
    mirror = TensorBoardMirror(logdir, prefix=prefix, metrics=metrics)
    try:
        mirror(zip(df["step"].tolist(), df["metric"].tolist(), df["layer"].tolist(),
                   df["value"].astype(float).tolist()))
    finally:
        mirror.close()
    return mirror.written


# -- command line: dynascope export ---------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--tensorboard", metavar="LOGDIR", required=True,
                        help="TensorBoard log directory (several runs go to LOGDIR/<run name>)")
    parser.add_argument("--metrics", metavar="PATTERN", action="append", default=None,
                        help="export only metrics matching this glob pattern (repeatable), e.g. 'grad.*'")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"tag prefix (default {DEFAULT_PREFIX!r})")


def run(args: argparse.Namespace) -> int:
    from ..commands.cli import UserError
    from ..store import RunStoreError, load_run

    try:
        names = [load_run(r).name for r in args.runs]
    except RunStoreError as exc:
        raise UserError(str(exc)) from None
    if len(set(names)) != len(names) and len(names) > 1:
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    for path, name in zip(args.runs, names):
        target = args.tensorboard if len(args.runs) == 1 else os.path.join(args.tensorboard, name)
        try:
            n = export(path, target, prefix=args.prefix, metrics=args.metrics)
        except (ImportError, RunStoreError) as exc:
            raise UserError(str(exc)) from None
        print(f"{path}: {n} scalars -> {target}")
    return 0
