"""``dynascope ls RUN``: what a run recorded (metrics, layers, steps, artifacts, marks)."""

from __future__ import annotations

import argparse

from ..core.coverage import summarize
from ..store import RunData, RunStoreError, load_run, query

__all__ = ["add_arguments", "run", "describe"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories (a folder holding runs: each run inside it)")


def _steps(run: RunData, metric: str, layers: list[str]) -> str:
    st = query.steps(run, metric, layers[0]) if layers else []
    if len(st) == 0:
        return "no steps"
    return f"steps {int(st[0])}..{int(st[-1])} ({len(st)} recorded)"


def describe(run: RunData) -> str:
    """A plain-text listing of the run (what ``dynascope ls`` prints)."""
    meta = run.meta
    lines = [f"run {run.name}  ({run.path})"]
    model = (meta.get("model") or {}).get("class")
    opts = [o.get("class") for o in meta.get("optimizers") or []] or (
        [(meta.get("optimizer") or {}).get("class")] if meta.get("optimizer") else [])
    opt = " + ".join(str(o) for o in opts)
    lines.append(f"  status {meta.get('status', 'n/a')}, model {model or 'n/a'}, optimizer {opt or 'none'}, "
                 f"every {meta.get('every', 'n/a')}")
    metrics = query.metrics(run)
    lines.append(f"metrics ({len(metrics)}):")
    width = max((len(m) for m in metrics), default=0)
    for m in metrics:
        lays = query.layers(run, m)
        n = len([x for x in lays if x != ""])
        where = "run-level" if lays == [""] else f"{n} layer{'s' if n != 1 else ''}"
        lines.append(f"  {m:<{width}}  {where:<12}  {_steps(run, m, lays)}")
    arts = run.artifacts()
    lines.append(f"artifacts ({len(arts)}):")
    if len(arts):
        for name, grp in arts.groupby("name", sort=True):
            st = grp["step"].to_numpy()
            lines.append(f"  {name}  steps {int(st.min())}..{int(st.max())} ({len(st)})")
    lines.append("coverage:")
    if meta.get("steps") == 0 and meta.get("status") == "finished":
        lines.append("  nothing recorded: run.step() was never called")
    else:
        lines += summarize(run.coverage(), module_types=meta.get("module_types"), parameters=meta.get("parameters"))
    marks = run.marks()
    lines.append(f"marks ({len(marks)}):")
    for _, row in marks.head(20).iterrows():
        lines.append(f"  step {int(row['step'])}  {row['key']} = {row['value']!r}")
    if len(marks) > 20:
        lines.append(f"  ... {len(marks) - 20} more")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import UserError
    from .report import expand_runs

    for i, path in enumerate(expand_runs(args.runs, "ls")):
        try:
            text = describe(load_run(path))
        except RunStoreError as exc:
            raise UserError(str(exc)) from None
        if i:
            print()
        print(text)
    return 0
