"""Command line: ``dynascope demo | report | ls | analyze | export | check``.

``python -m dynascope`` is the same program. Each subcommand lives in its own
module that provides ``add_arguments(parser)`` and ``run(args) -> int``; this
file only dispatches. Wrong arguments print a usage message and exit with 2;
expected failures (a path that is not a run, a bad checkpoint) print one line
``dynascope: error: ...`` and exit with 2 as well. Output piped into a reader that
stops early (``dynascope ls RUN | head``) ends quietly with 141 (128 + SIGPIPE).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ..core.errors import UserError
from ..core.version import __version__

__all__ = ["main", "UserError"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dynascope.commands.demo", "train small models on bundled digits data and write a comparison report"),
    "report": ("dynascope.commands.report", "write the HTML report (and optionally PNG/PDF figures) for runs"),
    "ls": ("dynascope.commands.ls", "list the metrics, layers and steps a run recorded"),
    "analyze": ("dynascope.commands.analyze", "run diagnostics over saved checkpoints into a run directory"),
    "export": ("dynascope.integrations.tensorboard", "export a run's scalars to TensorBoard event files"),
    "check": ("dynascope.analysis.check", "print a run's findings; exit 1 when one is at or above --fail-on (a gate)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynascope", description="See inside PyTorch training runs.")
    parser.add_argument("--version", action="version", version=f"dynascope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside our module: show it
                raise
            p.set_defaults(_unavailable=module)
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        parser.error(f"command {args.command!r} is not available in this installation ({args._unavailable})")
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe is met inside the try
        return code
    except UserError as exc:
        print(f"dynascope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dynascope ls RUN | head`: the reader has gone; stop quietly as `cat` would
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, the status of a writer whose reader closed the pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
