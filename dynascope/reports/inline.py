"""Notebook display: ``RunData._repr_html_`` and the object ``dynascope.report`` returns.

Jupyter calls ``_repr_html_`` by itself, so nothing here imports IPython.

- :func:`run_html`: the run table of the report (model, optimizers,
  hyper-parameters, steps, status), the recorded metrics with their layer and
  step counts, the findings (each naming the ``dynascope.figure(...)`` call
  that shows it) and the figures the run can draw. Every string from the run
  goes through jinja2's autoescape.
- :class:`ReportPath`: a ``pathlib.Path`` to the written report that a
  notebook shows inline in a sandboxed ``<iframe srcdoc>``: the report's
  styles and its small script stay inside the frame (an opaque origin), and
  cannot reach the notebook page.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, Template, select_autoescape

from ..store import RunData, load_run, query

__all__ = ["run_html", "ReportPath", "figure_call", "IFRAME_HEIGHT"]

from .report_path import IFRAME_HEIGHT, ReportPath  # noqa: E402  (re-exported)

_TEMPLATES = Path(__file__).parent / "templates"


@cache
def _template(name: str) -> Template:
    env = Environment(loader=FileSystemLoader(str(_TEMPLATES)),
                      autoescape=select_autoescape(default=True, default_for_string=True,
                                                   enabled_extensions=("html", "j2")))
    return env.get_template(name)


def figure_call(figure_key: str | None, keys: list[str]) -> str | None:
    """The ``dynascope.figure(...)`` call that shows a finding (its key may be a prefix, e.g. "sharpness")."""
    if not figure_key:
        return None
    match = figure_key if figure_key in keys else next((k for k in keys if figure_key in k), None)
    return None if match is None else f'dynascope.figure("{match}", run)'


def _metric_rows(run: RunData) -> list[dict[str, Any]]:
    rows = []
    for m in query.metrics(run):
        lays = query.layers(run, m)
        n = len([x for x in lays if x != ""])
        st = query.steps(run, m, lays[0]) if lays else []
        rows.append({"name": m, "layers": "run-level" if lays == [""] else n, "n_steps": len(st),
                     "first": int(st[0]) if len(st) else "", "last": int(st[-1]) if len(st) else ""})
    return rows


def _artifact_rows(run: RunData) -> list[dict[str, Any]]:
    arts = run.artifacts()
    out = []
    for name, grp in arts.groupby("name", sort=True):
        st = grp["step"].to_numpy()
        out.append({"name": name, "count": len(st),
                    "steps": str(int(st[0])) if len(st) == 1 else f"{int(st.min())} to {int(st.max())}"})
    return out


def run_html(run: RunData) -> str:
    """The run as an HTML fragment for a notebook (re-read from disk: a run still training shows its progress)."""
    from ..analysis.findings import findings
    from .catalog import figures
    from .figures import all_figures
    from .html import run_summary

    try:
        run = load_run(run.path)  # fresh meta (status) and no stale caches
    except Exception:  # noqa: BLE001 - the directory went away: show what the object holds
        pass
    keys = [s.key for s in all_figures()]
    summary = [(label, values[0]) for label, values in run_summary([run])]
    found = [{"severity": f.severity, "message": f.message, "call": figure_call(f.figure_key, keys)}
             for f in findings([run])]
    return _template("run.html.j2").render(
        name=run.name, status=str(run.meta.get("status", "n/a")), summary=summary, findings=found,
        metrics=_metric_rows(run), artifacts=_artifact_rows(run), figures=figures(run).names())
