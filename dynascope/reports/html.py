"""The report: one self-contained HTML file (or a folder of PNG/PDF figures) for one or several runs.

Layout: title, findings (each linked to the figure that shows it), a run
summary table, then the registered figures by section. Figures are inline SVG
(crisp when printed, text selectable); a figure whose SVG would exceed
``SVG_LIMIT`` bytes is embedded as a base64 PNG instead, to bound the file
size. No external resource is referenced, and a Content-Security-Policy
allows only the report's own small script (run toggles), so the file works
offline and a model or run name containing HTML/JS is inert twice over: every
string from the model or the user is escaped by jinja2's autoescape.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html as _html
import io
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from ..analysis.findings import BASELINE_RULE, Finding
from ..analysis.findings import collect as collect_findings
from ..core.coverage import triage
from ..core.version import __version__
from ..store import RunData, RunStoreError, as_runs, query
from ..store.writer import write_atomic
from .figures import FigureSpec, all_figures, run_colors
from .figures._helpers import CAPTION_ATTR, GID_LABELS_ATTR
from .forensics_view import comparison_items, forensics_items
from .report_path import ReportPath

__all__ = ["report", "SVG_LIMIT", "FORMATS", "render_png", "run_summary", "refresh_script"]

FORMATS = ("html", "png", "pdf")
SVG_LIMIT = 700_000  # bytes; above this a figure is embedded as PNG
PNG_DPI = 110
EXPORT_DPI = 200

_TEMPLATES = Path(__file__).parent / "templates"
_SCRIPT = (
    "document.querySelectorAll('input.runtoggle').forEach(function (cb) {"
    "cb.addEventListener('change', function () {"
    "document.querySelectorAll('.dsrun' + cb.dataset.run).forEach(function (el) {"
    "el.style.display = cb.checked ? '' : 'none'; }); }); });"
)

# --refresh: reload after the interval, keeping the scroll position (sessionStorage, per file)
_REFRESH = (
    "(function () { var k = 'dynascope-scroll:' + location.pathname; var y = sessionStorage.getItem(k);"
    " if (y !== null) { window.scrollTo(0, +y); sessionStorage.removeItem(k); }"
    " setTimeout(function () { sessionStorage.setItem(k, String(window.scrollY)); location.reload(); }, %d); })();"
)

_RC = {"svg.fonttype": "none", "svg.hashsalt": "dynascope", "font.size": 10, "axes.titlesize": 10,
       "figure.dpi": 100, "path.simplify": True}


@dataclass
class _RenderedFigure:
    key: str
    anchor: str
    title: str
    source: str
    caption: str
    body: Markup | None
    error: str | None
    spec: FigureSpec


def _anchor(key: str) -> str:
    return "fig-" + re.sub(r"[^A-Za-z0-9_-]+", "-", key)


_GID_RE = re.compile(r'<g id="(dsrun(\d+)-\d+(?:-nf)?)">')


def _svg(fig, labels: dict[str, str]) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Contributor": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    # responsive size: keep the viewBox, drop the fixed width/height in pt
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 role="img"', svg, count=1)

    def tag(m: re.Match[str]) -> str:
        gid, run_idx = m.group(1), m.group(2)
        label = labels.get(gid.removesuffix("-nf"))
        title = f"<title>{_html.escape(label)}</title>" if label else ""
        return f'<g id="{gid}" class="dsrun{run_idx}">{title}'

    return _GID_RE.sub(tag, svg)


def _png(fig, dpi: int = PNG_DPI) -> bytes:
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def render_png(fig, dpi: int = PNG_DPI) -> bytes:
    """The figure as the report would rasterize it (same rc settings), e.g. for a notebook."""
    return _png(fig, dpi)


def _embed(fig) -> Markup:
    labels = getattr(fig, GID_LABELS_ATTR, None) or {}
    svg = _svg(fig, labels)
    if len(svg.encode()) <= SVG_LIMIT:
        return Markup(svg)
    data = base64.b64encode(_png(fig)).decode("ascii")
    return Markup(f'<img alt="figure" src="data:image/png;base64,{data}">')


def _draw(specs: Sequence[FigureSpec], runs: Sequence[RunData], progress: bool | None = None,
          render: Any = None) -> list[tuple[FigureSpec, Any, str | None, Any]]:
    """Draw every figure (and ``render`` it, e.g. to inline SVG); a figure that raises becomes an error entry."""
    from tqdm import tqdm  # text bar on stderr (tqdm.auto warns in a notebook without ipywidgets)

    out = []
    # progress=None: a bar on stderr only when it is a terminal
    for spec in tqdm(specs, desc="figures", unit="fig", disable=None if progress is None else not progress,
                     leave=False):
        try:
            fig = spec.fn(runs)
            body = None if fig is None or render is None else render(fig)
        except RunStoreError:
            raise  # a damaged run store is the run's problem, not the figure's: the caller names the run
        except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the report
            warnings.warn(f"figure {spec.key!r} failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            out.append((spec, None, f"{type(exc).__name__}: {exc}", None))
            continue
        if fig is not None:
            out.append((spec, fig, None, body))
    return out


def _select(figures: Iterable[str] | None) -> list[FigureSpec]:
    specs = all_figures()
    if figures is None:
        return specs
    wanted = list(figures)
    known = {s.key for s in specs}
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise ValueError(f"unknown figure key(s) {unknown}; known: {sorted(known)}")
    return [s for s in specs if s.key in set(wanted)]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt_value(x) for x in v) + ")"
    return str(v)


def _never_stepped(run: RunData) -> bool:
    return run.meta.get("steps") == 0 and run.meta.get("status") == "finished"


def _steps_summary(run: RunData) -> str:
    if _never_stepped(run):
        return "nothing recorded: run.step() was never called"
    metric = "loss" if query.has(run, "loss") else (query.metrics(run) or [None])[0]
    if metric is None:
        return "nothing recorded"
    st = query.steps(run, metric)
    if len(st) == 0:
        return "nothing recorded"
    return f"{len(st)} recorded ({metric}), steps {int(st[0])} to {int(st[-1])}"


def _wall(v: Any) -> str:
    try:
        s = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min ({s:.0f} s)"


def _summary(runs: Sequence[RunData]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn) -> None:
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except Exception:  # noqa: BLE001 - a malformed meta field shows as n/a
                vals.append("n/a")
        rows.append((label, vals))

    def model(r: RunData) -> str:
        return str((r.meta.get("model") or {}).get("class", "n/a"))

    def params(r: RunData) -> str:
        m = r.meta.get("model") or {}
        n, t = m.get("n_parameters"), m.get("n_trainable")
        if n is None:
            return "n/a"
        return f"{int(n):,}" + (f" ({int(t):,} trainable)" if t is not None and t != n else "")

    def optimizers(r: RunData) -> list[dict]:
        opts = r.meta.get("optimizers")
        if opts is None:  # runs of dynascope 0.1: one optimizer
            opts = [r.meta["optimizer"]] if r.meta.get("optimizer") else []
        return list(opts)

    def optimizer(r: RunData) -> str:
        opts = optimizers(r)
        return "none (update metrics skipped)" if not opts else " + ".join(str(o.get("class", "n/a")) for o in opts)

    def hyper(r: RunData) -> str:
        opts = optimizers(r)
        parts = []
        for o in opts:
            groups = o.get("hyperparameters") or []
            for i, g in enumerate(groups):
                # None / False are PyTorch's "off" defaults (foreach, fused, maximize, ...): left out to keep it short
                kv = ", ".join(f"{k}={_fmt_value(v)}" for k, v in g.items()
                               if k not in ("params", "n_params") and v is not None and v is not False)
                label = (f"{o.get('class', '?')} " if len(opts) > 1 else "") + \
                    (f"group {i}: " if len(groups) > 1 else "")
                parts.append(label + kv)
        return "; ".join(parts) or "n/a"

    def coverage(r: RunData) -> str:
        cov = r.coverage()
        if cov.empty:  # analyze has no live instruments; otherwise a run of an older dynascope or another writer
            return ("not recorded (run written by dynascope analyze: checkpoints, no live probes)"
                    if r.meta.get("source") == "analyze" else "not recorded (no coverage table in the run's meta.json)")
        if _never_stepped(r):
            return "n/a: run.step() was never called"
        counts = []
        for kind in ("module", "parameter"):
            k = cov[cov["kind"] == kind]
            if len(k):
                counts.append(f"{int(k['recorded'].astype(bool).sum())} of {len(k)} {kind}s recorded")
        # what a user would act on, one by one; what is missing by design, one line per kind
        missing, by_design = triage(cov, r.meta.get("module_types"), r.meta.get("parameters"))
        notes = [f"{m.kind} {m.name}: {m.reason}" for m in missing.head(6).itertuples()]
        more = f"; ... {len(missing) - 6} more (dynascope ls)" if len(missing) > 6 else ""
        return (", ".join(counts) + ("; not recorded: " + "; ".join(notes) + more if notes else "")
                + "".join(f"; {line}" for line in by_design))

    row("status", lambda r: str(r.meta.get("status", "n/a")))
    row("model", model)
    row("parameters", params)
    row("optimizer", optimizer)
    row("hyper-parameters", hyper)
    row("steps", _steps_summary)
    row("recorded every", lambda r: "n/a" if not r.meta.get("every") else
        ("step" if int(r.meta["every"]) == 1 else f"{int(r.meta['every'])} steps"))
    row("wall time", lambda r: _wall(r.meta.get("wall_time_s")))
    row("started", lambda r: str(r.meta.get("start_time", "n/a")))
    row("torch", lambda r: str(r.meta.get("torch_version", "n/a")))
    row("device", lambda r: str(r.meta.get("device", "n/a")))
    row("seed", lambda r: str(r.meta.get("seed", "n/a")))
    row("probes", lambda r: ", ".join(map(str, r.meta.get("probes") or [])) or "n/a")
    row("coverage", coverage)
    row("run directory", lambda r: str(r.path))
    return rows


def run_summary(runs: Sequence[RunData]) -> list[tuple[str, list[str]]]:
    """The report's run table: ``(label, one value per run)`` rows (status, model, optimizer, ...)."""
    return _summary(runs)


def refresh_script(seconds: float) -> str:
    """The script a ``--refresh`` report carries: reload every ``seconds``, keeping the scroll position."""
    return _REFRESH % max(int(round(seconds * 1000)), 100)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _resolve_anchor(f: Finding, keys: list[str]) -> str | None:
    if not f.figure_key:
        return None
    if f.figure_key in keys:
        return _anchor(f.figure_key)
    for k in keys:  # e.g. "sharpness" -> "curvature_sharpness", "plasticity" -> "plasticity_dead"
        if f.figure_key in k:
            return _anchor(k)
    return None


def _deviations(runs: Sequence[RunData], baseline: RunData | None) -> dict[str, Any]:
    """``compare(run, baseline)`` per run name; a run that cannot be compared gets a warning, not an error."""
    if baseline is None:
        return {}
    from ..analysis.comparison import compare

    out = {}
    for r in runs:
        try:
            out[r.name] = compare(r, baseline)
        except ValueError as exc:
            warnings.warn(f"run {r.name!r} not compared with baseline {baseline.name!r}: {exc}", RuntimeWarning,
                          stacklevel=3)
    return out


def _default_title(runs: Sequence[RunData]) -> str:
    names = ", ".join(r.name for r in runs[:4]) + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")
    return f"dynascope report: {names}"


def _export(drawn, found: list[Finding], out: Path, fmt: str) -> Path:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--format {fmt} writes a folder of figures, but {str(out)!r} is a file")
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for spec, fig, err, _ in drawn:
        if fig is None:
            lines.append(f"{spec.key}: could not be drawn: {err}\n")
            continue
        target = out / f"{spec.order:03d}-{spec.key}.{fmt}"
        with matplotlib.rc_context(_RC):
            fig.savefig(target, format=fmt, dpi=EXPORT_DPI, metadata={"Creator": f"dynascope {__version__}"})
        lines.append(f"{target.name}\n  {spec.title}\n  source: {spec.source}\n  "
                     f"{getattr(fig, CAPTION_ATTR, '') or ''}\n")
    (out / "figures.txt").write_text("\n".join(lines), encoding="utf-8")
    (out / "findings.txt").write_text(
        "\n".join(f"[{f.severity}] {f.run}: {f.message}" for f in found) or "no findings", encoding="utf-8")
    return out


def report(
    runs: str | os.PathLike[str] | RunData | Sequence[str | os.PathLike[str] | RunData],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
    figures: Iterable[str] | None = None,
    fmt: str = "html",
    progress: bool | None = None,
    skipped: Sequence[tuple[str, str]] = (),
    baseline: str | os.PathLike[str] | RunData | None = None,
    refresh: float | None = None,
    live: str | None = None,
) -> Path:
    """Write the report for one or several runs and return its path.

    ``runs``: run directories or :class:`RunData` (compared in one report,
    one colour per run). ``fmt="html"`` writes one self-contained file at
    ``out``; ``"png"`` / ``"pdf"`` write every figure as a file into the
    folder ``out`` (plus ``figures.txt`` with titles, sources and captions and
    ``findings.txt``). ``figures``: registry keys to draw (default: all).
    ``progress``: a progress bar on stderr (default: only when stderr is a terminal).
    ``skipped``: ``(path, problem)`` of runs left out (``dynascope report --skip-bad``), shown as
    error findings at the top of the report.
    ``baseline``: a known-good run; the findings open with where each run leaves its band
    (:func:`dynascope.compare`), a comparison section draws them, and the figures show the baseline too.
    The report opens with the forensics of each run's events (docs/forensics.md).
    ``refresh``: the page reloads itself every ``refresh`` seconds, keeping
    its scroll position (for a report rewritten while runs train); ``live``: a
    line under the title saying so. The file is replaced atomically, so a
    reader never sees half of it. In a notebook the returned path displays
    the report inline (:class:`~dynascope.reports.inline.ReportPath`).
    Raises :class:`~dynascope.store.RunStoreError` (a :class:`~dynascope.store.NotARunError` for a
    path that is not a run) naming the file and the problem of a run that cannot be read.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if refresh is not None and (fmt != "html" or not refresh > 0):
        raise ValueError(f"refresh must be a positive number of seconds for an html report, got {refresh!r}")
    run_list = as_runs(runs, "report()")
    specs = _select(figures)
    out = Path(out)
    base = None if baseline is None else as_runs(baseline, "report()")[0]
    deviations = _deviations(run_list, base)
    found = [Finding("error", f"run {path} was left out of this report: {problem}", "", "", None, None, None, None,
                     run=str(path), rule="store.unreadable") for path, problem in skipped]
    found += collect_findings(run_list, base, deviations=deviations)
    fig_runs = run_list if base is None else [*run_list, base]
    if fmt != "html":
        return _export(_draw(specs, fig_runs, progress), found, out, fmt)
    drawn = _draw(specs, fig_runs, progress, render=_embed)

    rendered: list[_RenderedFigure] = []
    for spec, fig, err, body in drawn:
        caption = "" if fig is None else str(getattr(fig, CAPTION_ATTR, "") or "")
        rendered.append(_RenderedFigure(spec.key, _anchor(spec.key), spec.title, spec.source, caption, body, err,
                                        spec))
    sections: list[dict[str, Any]] = []
    for rf in rendered:
        if not sections or sections[-1]["name"] != rf.spec.section:
            sections.append({"name": rf.spec.section, "anchor": "sec-" + re.sub(r"[^a-z0-9]+", "-",
                                                                                rf.spec.section.lower()),
                             "figures": []})
        sections[-1]["figures"].append(rf)
    keys = [rf.key for rf in rendered if rf.body is not None]
    colors = run_colors(fig_runs)
    forensics = forensics_items(run_list, _embed)
    comparison = [] if base is None else comparison_items(run_list, base, deviations, _embed)
    dev_anchor = {c["run"]: c["anchor"] for c in comparison if c["figure"] is not None}
    summary = _summary(fig_runs)
    if base is not None:
        summary.insert(0, ("role", ["run"] * len(run_list) + ["baseline"]))
    env = Environment(loader=FileSystemLoader(str(_TEMPLATES)), autoescape=select_autoescape(default=True,
                      default_for_string=True, enabled_extensions=("html", "j2")))
    script_hash = _sha256(_SCRIPT)
    reload_js = refresh_script(refresh) if refresh else None
    page = env.get_template("report.html.j2").render(
        title=title or _default_title(run_list),
        version=__version__,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        runs=[{"name": r.name + (" (baseline)" if r is base else ""), "color": c} for r, c in zip(fig_runs, colors)],
        findings=[{"severity": f.severity, "message": f.message, "run": f.run,
                   "anchor": dev_anchor.get(f.run) if f.rule == BASELINE_RULE else _resolve_anchor(f, keys)}
                  for f in found],
        summary=summary,
        forensics=forensics,
        comparison=comparison,
        sections=sections,
        script=Markup(_SCRIPT),
        script_hash=script_hash,
        refresh_script=Markup(reload_js) if reload_js else None,
        refresh_hash=_sha256(reload_js) if reload_js else None,
        live=live,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(page.encode("utf-8")))  # readers (a live report's reload) see old or new
    return ReportPath(out)
