"""``dynascope report RUN... -o report.html [--format html|png|pdf] [--title ...] [--baseline GOOD_RUN] [--skip-bad]
[--watch SECONDS [--refresh]]``.

``--watch SECONDS`` rewrites the report every SECONDS while the runs train,
until Ctrl-C (exit 0). Each rewrite re-opens the runs (read-only SQLite
connections on the WAL store: the training process is never blocked) and
replaces the file atomically, so a browser or a reader never sees half a
report. A run directory that does not exist yet is waited for. A line is
printed when a run's status (meta.json) turns ``finished``, ``failed`` or ``interrupted``.
``--refresh`` makes the page reload itself at the same interval, keeping its
scroll position.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from ..store import RunStoreError, load_run
from ..store.reader import find_runs
from ..store.schema import DB_NAME

__all__ = ["add_arguments", "run", "expand_runs"]


def expand_runs(paths: list[str], command: str) -> list[str]:
    """``paths`` with each folder that is not a run but holds runs (at any depth) replaced by those runs,
    sorted, and one line on stderr saying how many were found; anything else is kept (and errors as before)."""
    out: list[str] = []
    for p in paths:
        found = [] if (Path(p) / DB_NAME).exists() else find_runs(p)
        if found:
            print(f"dynascope {command}: {p} is not a run; found {len(found)} run{'s' if len(found) != 1 else ''} "
                  "inside it", file=sys.stderr)
            out += [str(f) for f in found]
        else:
            out.append(p)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories to report on (several are compared; a folder holding runs: each run "
                             "inside it)")
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
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                        help="rewrite the report every SECONDS while the runs train, until Ctrl-C")
    parser.add_argument("--refresh", action="store_true",
                        help="with --watch: the page reloads itself every SECONDS, keeping its scroll position")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import UserError
    from ..reports.html import report

    if args.refresh and args.watch is None:
        raise UserError("--refresh needs --watch SECONDS (the interval at which the report is rewritten)")
    if args.watch is not None:
        return _watch(args)
    runs, skipped = [], []
    paths = expand_runs(args.runs, "report")
    for path in paths:
        try:
            runs.append(load_run(path))
        except RunStoreError as exc:
            if not args.skip_bad:
                raise UserError(f"run {path}: {exc} (pass --skip-bad to report on the other runs)"
                                if len(paths) > 1 else str(exc)) from None
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


_ENDED = ("finished", "failed", "interrupted")  # the statuses a closed run's meta.json holds


def _status(path: str) -> str | None:
    try:
        return str(load_run(path).meta.get("status") or "unknown")
    except RunStoreError:
        return None


def _watch(args: argparse.Namespace) -> int:
    from ..core.errors import UserError
    from ..reports.html import report

    if args.fmt != "html":
        raise UserError("--watch rewrites an HTML report; it cannot be used with --format png/pdf")
    if not args.watch > 0:
        raise UserError(f"--watch needs a positive number of seconds, got {args.watch:g}")
    out = Path(args.out or "report.html")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory; give the report file's path")
    figures = [k.strip() for k in args.figures.split(",") if k.strip()] if args.figures else None
    # Ctrl-C sets a flag that the loop checks: a KeyboardInterrupt raised inside a garbage-collection callback
    # is printed and swallowed by Python ("Exception ignored in ..."), and the watcher then never stopped
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    known: dict[str, str | None] = {}
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            for path in args.runs:
                st = _status(path)
                if st != known.get(path, "?"):
                    if st is None:
                        print(f"waiting for run {path!r} to appear", flush=True)
                    elif st in _ENDED:
                        print(f"run {path!r} {st}", flush=True)
                    elif path not in known or known[path] is None:
                        print(f"watching run {path!r} ({st})", flush=True)
                    known[path] = st
            present = [p for p in args.runs if known.get(p) is not None]
            if present:
                now = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S UTC")
                state = ("all runs ended" if all(known[p] in _ENDED for p in present)
                         else "runs still training")
                live = (f"Live report, rewritten every {args.watch:g} s (last at {now}; {state})"
                        + ("; this page reloads itself." if args.refresh else "; reload the page to update."))
                try:
                    report([load_run(p) for p in present], out, title=args.title, figures=figures,
                           refresh=args.watch if args.refresh else None, live=live, progress=False)
                except RunStoreError as exc:  # a run directory removed or damaged while watched
                    print(f"report not updated: {exc}", file=sys.stderr, flush=True)
                except ValueError as exc:
                    raise UserError(str(exc)) from None
                except (OSError, sqlite3.Error) as exc:  # transient (disk full, busy store): try again next time
                    print(f"report not updated: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            stop.wait(max(args.watch - (time.monotonic() - t0), 0.0))
    except KeyboardInterrupt:  # a second Ctrl-C before the handler was in place, or from a callee
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"stopped watching; {out} holds the last report", file=sys.stderr)
    return 0
