"""``dynascope report RUN... -o report.html [--format html|png|pdf] [--title ...] [--baseline GOOD_RUN]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..store import RunStoreError, load_run

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories to report on (several are compared)")
    parser.add_argument("-o", "--out", default=None, metavar="PATH",
                        help="output file for html (default: report.html), or folder for png/pdf "
                             "(default: report-figures)")
    parser.add_argument("--format", dest="fmt", choices=("html", "png", "pdf"), default="html",
                        help="html: one self-contained file; png/pdf: one file per figure in a folder")
    parser.add_argument("--title", default=None, help="report title (default: names the runs)")
    parser.add_argument("--figures", default=None, metavar="KEY,...",
                        help="only these figures (comma-separated registry keys)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out runs that cannot be read (damaged store, missing meta.json) and say so "
                             "at the top of the report, instead of stopping with an error")
    parser.add_argument("--baseline", default=None, metavar="GOOD_RUN",
                        help="a known-good run: the report lists where the runs leave its band first")


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .html import report

    runs, skipped = [], []
    for path in args.runs:
        try:
            runs.append(load_run(path))
        except RunStoreError as exc:
            if not args.skip_bad:
                raise UserError(f"run {path}: {exc} (pass --skip-bad to report on the other runs)"
                                if len(args.runs) > 1 else str(exc)) from None
            skipped.append((path, str(exc)))
    try:
        baseline = None if args.baseline is None else load_run(args.baseline)
    except RunStoreError as exc:
        raise UserError(f"--baseline: {exc}") from None
    out = Path(args.out) if args.out else Path("report.html" if args.fmt == "html" else "report-figures")
    figures = [k.strip() for k in args.figures.split(",") if k.strip()] if args.figures else None
    while True:
        if not runs:
            raise UserError(f"no run could be read ({len(skipped)} skipped): " + "; ".join(p for _, p in skipped))
        try:
            path = report(runs, out, title=args.title, figures=figures, fmt=args.fmt, skipped=skipped,
                          baseline=baseline)
            break
        except RunStoreError as exc:  # damage met while reading (past the checks at load time)
            bad = next((r for r in runs if str(r.path) in str(exc)), None)
            if not args.skip_bad or bad is None:
                raise UserError(f"run {bad.path if bad is not None else '?'}: {exc}" if len(runs) > 1
                                else str(exc)) from None
            runs.remove(bad)
            skipped.append((str(bad.path), str(exc)))
        except (ValueError, FileExistsError, NotADirectoryError) as exc:
            raise UserError(str(exc)) from None
    for p, problem in skipped:
        print(f"dynascope report: skipped {p}: {problem}", file=sys.stderr)
    print(path)
    return 0
