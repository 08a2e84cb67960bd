"""Findings as data and as a gate: ``dynascope.findings(run)`` and ``dynascope check RUN``.

The same findings as the report (one function, :func:`dynascope.analysis.findings.collect`): with a
baseline, its deviations first, then every rule's findings, errors before warnings before info.

``dynascope check RUN... [--baseline GOOD_RUN] [--fail-on error|warning|info]`` prints one finding per
line and exits 1 when any is at or above the ``--fail-on`` severity (default ``warning``), 0 otherwise, 2
on bad input, so a pipeline or a scheduler can stop or flag a run on its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import pandas as pd

from ..store import NotARunError, RunData, as_run, load_run

__all__ = ["findings", "failing", "add_arguments", "run", "SEVERITY_RANK"]

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}

RunLike = str | os.PathLike[str] | RunData


def findings(run: RunLike | Sequence[RunLike], baseline: RunLike | None = None) -> pd.DataFrame:
    """Findings of a run (a run directory or a RunData; or several) as a DataFrame.

    Columns: severity (error / warning / info), rule, metric, layer, step, message, source (the rule's
    literature, or the baseline run for deviations), run, value, threshold, figure (the report figure that
    shows it). With ``baseline`` the deviations from it (:func:`dynascope.compare`) come first.
    """
    from .findings import collect, frame

    runs = [run] if isinstance(run, (str, os.PathLike, RunData)) else list(run)
    if not runs:
        raise ValueError("findings() needs a run (a run directory or a RunData)")
    run_list = [as_run(r) for r in runs]
    base = None if baseline is None else as_run(baseline)
    return frame(collect(run_list, base), base)


def failing(df: pd.DataFrame, fail_on: str = "warning") -> pd.DataFrame:
    """The findings at or above ``fail_on`` (info < warning < error)."""
    if fail_on not in SEVERITY_RANK:
        raise ValueError(f"fail_on must be one of {sorted(SEVERITY_RANK, key=SEVERITY_RANK.get)}, got {fail_on!r}")
    return df[[SEVERITY_RANK.get(s, 0) >= SEVERITY_RANK[fail_on] for s in df["severity"]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories to check")
    parser.add_argument("--baseline", default=None, metavar="GOOD_RUN",
                        help="a known-good run: deviations from its band are findings too")
    parser.add_argument("--fail-on", dest="fail_on", choices=("info", "warning", "error"), default="warning",
                        help="exit 1 when a finding has this severity or a higher one (default: warning)")


def _line(row: pd.Series, several: bool) -> str:
    where = []
    if several:
        where.append(f"run {row['run']}")
    if not pd.isna(row["step"]):
        where.append(f"step {int(row['step'])}")
    if row["layer"]:
        where.append(f"layer {row['layer']}")
    at = f" ({', '.join(where)})" if where else ""
    return f"{row['severity']}: {row['rule']}{at}: {row['message']}"


def run(args: argparse.Namespace) -> int:
    from ..core.errors import UserError

    try:
        runs = [load_run(p) for p in args.runs]
        base = None if args.baseline is None else load_run(args.baseline)
    except NotARunError as exc:
        raise UserError(str(exc)) from None
    try:
        df = findings(runs, base)
    except ValueError as exc:  # e.g. a baseline sharing no metric and step with the run
        raise UserError(str(exc)) from None
    for _, row in df.iterrows():
        print(_line(row, len(runs) > 1))
    bad = failing(df, args.fail_on)
    counts = ", ".join(f"{n} {s}" for s, n in df["severity"].value_counts().items()) or "none"
    verdict = f"{len(bad)} at or above {args.fail_on}: fail" if len(bad) else f"none at or above {args.fail_on}: pass"
    print(f"dynascope check: {len(df)} finding(s) ({counts}); {verdict}", file=sys.stderr)
    return 1 if len(bad) else 0
