"""``dynascope report RUN... -o report.html [--format html|png|pdf] [--title ...] [--baseline GOOD_RUN]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..store import NotARunError, load_run

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
    parser.add_argument("--baseline", default=None, metavar="GOOD_RUN",
                        help="a known-good run: the report lists where the runs leave its band first")


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .html import report

    runs = []
    for path in args.runs:
        try:
            runs.append(load_run(path))
        except NotARunError as exc:
            raise UserError(str(exc)) from None
    try:
        baseline = None if args.baseline is None else load_run(args.baseline)
    except NotARunError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out) if args.out else Path("report.html" if args.fmt == "html" else "report-figures")
    figures = [k.strip() for k in args.figures.split(",") if k.strip()] if args.figures else None
    try:
        path = report(runs, out, title=args.title, figures=figures, fmt=args.fmt, baseline=baseline)
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        raise UserError(str(exc)) from None
    print(path)
    return 0
