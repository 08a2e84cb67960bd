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
import os
from collections.abc import Sequence

from ..capture.listeners import DEFAULT_PREFIX, TensorBoardMirror, tag

__all__ = ["TensorBoardMirror", "export", "tag", "DEFAULT_PREFIX", "add_arguments", "run"]

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
    from ..core.errors import UserError
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
