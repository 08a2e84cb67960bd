"""Figures as objects (``dynascope.figures()``, ``dynascope.figure(name, runs)``) and the notebook display of
``RunData`` and ``report()``.

One small REAL recording shared by the module: a live run with every probe and every scheduled diagnostic
(curvature with trace, spectrum and per-layer blocks; plasticity; a 2D landscape with trajectory and
interpolation), a second live run with a 1D landscape, and ``dynascope analyze`` over checkpoints the first
run saved (the data-free weight spectra). Every registered figure must draw from them.
"""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from _synthetic import XSS, make_run
from matplotlib.figure import Figure
from torch import nn

import dynascope
from dynascope.commands.analyze import AnalyzeOptions, analyze
from dynascope.reports import html as html_mod
from dynascope.reports.catalog import FigureDataError
from dynascope.reports.figures import REGISTRY, all_figures, register

ROOT = Path(__file__).resolve().parent.parent


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 10))


def _train(run_dir: Path, *, steps: int, extra: dict, ckpt_dir: Path | None = None) -> Path:
    from dynascope.datasets import load_digits

    x, y = load_digits()
    x, y = x[:256], y[:256]
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with dynascope.probe(model, opt, run_dir, every=2, **extra) as run:
        for step in range(steps):
            idx = torch.arange(step * 32, step * 32 + 32) % len(x)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss, batch=(x[idx], y[idx]))  # the step's own batch: Alpha reads it
            if ckpt_dir is not None and step % 10 == 9:
                torch.save({"step": step + 1, "model": model.state_dict()}, ckpt_dir / f"step_{step + 1}.pt")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dynascope.RunData]:
    from dynascope.datasets import load_digits

    d = tmp_path_factory.mktemp("figs")
    x, y = load_digits()
    batch = (x[:128], y[:128])
    ce = nn.functional.cross_entropy
    ckpts = d / "ckpts"
    ckpts.mkdir()
    full = _train(d / "full", steps=30, ckpt_dir=ckpts, extra=dict(
        curvature=dynascope.Curvature(every=10, batch=batch, loss_fn=ce, k=2, trace=True, trace_samples=10,
                                      spectrum=True, spectrum_iter=15, layers=True),
        plasticity=dynascope.Plasticity(every=10, batch=batch),
        landscape=dynascope.Landscape(at="end", batch=batch, loss_fn=ce, resolution=5),
        probes=("activations", "gradients", "updates", "batchnorm", "distance", "spectral"),
        scheduled=[dynascope.Calibration(every=10, batch=batch),
                   dynascope.NoiseScale(every=10, batch=batch, loss_fn=ce, micro_batches=4),
                   dynascope.Collapse(every=10, batch=batch), dynascope.BNGap(every=10, batch=batch, loss_fn=ce),
                   dynascope.GradientTests(every=10, batch=batch, loss_fn=ce, tic=False, hist2d=False),
                   dynascope.Alpha(every=10, loss_fn=ce)],
    ))
    line = _train(d / "line", steps=6, extra=dict(
        landscape=dynascope.Landscape(at="end", batch=batch, loss_fn=ce, resolution=5, dims=1, trajectory=False,
                                      interpolation=False)))
    analyze([ckpts], _model(), d / "analyzed", loss_fn=ce, data=[batch],
            options=AnalyzeOptions(scores=["el2n", "grand"]))
    return [dynascope.load_run(p) for p in (full, line, d / "analyzed")]


def _drawn_artists(fig: Figure) -> int:
    n = 0
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        n += sum(len(line.get_xdata()) > 0 for line in ax.get_lines())
        n += len(ax.collections) + len(ax.patches) + len(ax.images)
    return n


@pytest.mark.parametrize("name", dynascope.figures().names())
def test_every_registered_figure_draws_from_a_recorded_run(runs, name):
    spec = REGISTRY[name]
    recorded = {m for r in runs for m in r.metrics()} | {a for r in runs for a in r.artifacts()["name"]}
    if spec.metrics and not set(spec.metrics) & recorded:
        pytest.fail(f"the shared recording lacks {', '.join(spec.metrics)}: add {spec.recorded_by} to the `runs` "
                    "fixture of this module")
    fig = dynascope.figure(name, runs)
    assert isinstance(fig, Figure)
    assert _drawn_artists(fig) > 0, f"{name}: no data drawn"
    png = fig._repr_png_()  # what a notebook shows
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_figure_is_the_reports_own_function(runs, monkeypatch):
    calls = []
    spec = REGISTRY["loss"]
    original = spec.fn

    def spy(run_list, **kw):
        calls.append([r.name for r in run_list])
        return original(run_list, **kw)

    monkeypatch.setitem(REGISTRY, "loss", spec.__class__(**{**spec.__dict__, "fn": spy}))
    dynascope.figure("loss", runs[0])
    html_mod.report(runs[0], runs[0].path.parent / "spy.html", figures=["loss"])
    assert calls == [[runs[0].name], [runs[0].name]]


def test_catalog_lists_names_titles_sections_sources():
    cat = dynascope.figures()
    assert cat.names() == [s.key for s in all_figures()]
    for info in cat:
        assert info.title and info.section and info.source
        assert info.metrics, f"{info.name} declares no metrics"
        assert info.recorded_by, f"{info.name} does not say what records its metrics"
    text = repr(cat)
    assert "signal_propagation" in text and "Brock, De, Smith 2021" in text
    HTMLParser().feed(cat._repr_html_())
    assert "angular_update" in cat._repr_html_()
    assert dict((i.name, i.options) for i in cat)["angular_update"] == ("layers",)


def test_catalog_for_runs_lists_what_they_can_draw(runs):
    full, line, analyzed = runs
    names = dynascope.figures(full).names()
    assert "curvature_sharpness" in names and "plasticity_units" in names
    assert "weight_esd" not in names and "weight_spectra" not in names
    assert "weight_esd" in dynascope.figures(analyzed).names()
    assert "curvature_sharpness" not in dynascope.figures(str(line.path)).names()


def test_missing_metrics_raise_one_clear_error(runs):
    full, line, analyzed = runs
    with pytest.raises(FigureDataError) as e:
        dynascope.figure("curvature_sharpness", line)
    msg = str(e.value)
    assert "one of hessian.eig, hessian.precond_eig" in msg and "'line'" in msg
    assert "dynascope.Curvature(" in msg and "\n" not in msg
    with pytest.raises(FigureDataError, match=r"needs weight.spectrum, .*dynascope analyze"):
        dynascope.figure("weight_esd", [full, line])
    with pytest.raises(FigureDataError, match="plasticity.dead, plasticity.dormant"):
        dynascope.figure("plasticity_units", line.path)
    assert isinstance(e.value, ValueError)


def test_unknown_names_and_options(runs):
    with pytest.raises(ValueError, match="did you mean 'signal_propagation'"):
        dynascope.figure("signal_propagaton", runs[0])
    with pytest.raises(ValueError, match="has no option colour; it accepts layers"):
        dynascope.figure("angular_update", runs[0], colour="red")
    with pytest.raises(ValueError, match="takes no options"):
        dynascope.figure("loss", runs[0], layers=["x"])
    with pytest.raises(dynascope.store.NotARunError):
        dynascope.figure("loss", "/nonexistent/run")


def test_layers_option_chooses_the_panels(runs):
    full = runs[0]
    weights = [p for p in full.layers("update.angle_row")]
    assert len(weights) == 3
    fig = dynascope.figure("angular_update", full, layers=[weights[-1]])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [weights[-1]]
    default = dynascope.figure("angular_update", full)
    assert len([ax for ax in default.axes if ax.get_visible()]) == 3
    with pytest.raises(ValueError, match="was not recorded for"):
        dynascope.figure("angular_update", full, layers=["nope.weight"])


def test_registering_a_figure_is_one_decorator(runs, monkeypatch):
    monkeypatch.setattr("dynascope.reports.figures.REGISTRY", dict(REGISTRY))
    from dynascope.reports import figures as figmod

    @register("test_only_loss_hist", title="Histogram of the loss", section="Tests", source="none",
              metrics=("loss",), recorded_by="run.step(loss=...)")
    def loss_hist(run_list, *, bins: int = 10):
        fig = Figure()
        fig.add_subplot().hist(run_list[0].scalars("loss")["value"], bins=bins)
        return fig

    assert "test_only_loss_hist" in figmod.REGISTRY
    assert "test_only_loss_hist" in dynascope.figures().names()
    fig = dynascope.figure("test_only_loss_hist", runs[0], bins=4)
    assert len(fig.axes[0].patches) == 4
    page = html_mod.report(runs[0], runs[0].path.parent / "reg.html", figures=["test_only_loss_hist"]).read_text()
    assert 'id="fig-test_only_loss_hist"' in page and "Histogram of the loss" in page


# ---------------------------------------------------------------------------------------------- inline display
class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[list[tuple[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append(attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_rundata_repr_html_is_escaped_and_parseable(tmp_path):
    run = dynascope.load_run(make_run(tmp_path / "x", name=f"run {XSS}", steps=40, hessian="above",
                                      dead_frac=0.5))
    out = run._repr_html_()
    p = _Collect()
    p.feed(out)
    p.close()
    assert "script" not in p.tags  # the module name and run name are text, not elements
    text = "".join(p.text)
    assert XSS in text  # shown as text: the hostile module name is a recorded layer... and the run name
    assert "<script>alert(1)</script>" not in out
    # run table, metrics with layer and step counts, findings naming the figure to call
    for needle in ("ResMLP", "SGD", "lr=0.1", "finished", "40 recorded (loss)"):
        assert needle in text, needle
    assert 'dynascope.figure("curvature_sharpness", run)' in text
    assert 'dynascope.figure("plasticity_units", run)' in text
    rows = {r[0]: r[1:] for r in _table_rows(out, "dynascope-metrics")}
    assert rows["loss"] == ["run-level", "40", "0", "39"]
    assert rows["act.var"][0] == str(1 + 6 * 4 + 2)  # stem, 6 blocks x 4 modules, head and the XSS module
    assert rows["hessian.eig"] == ["2", "10", "0", "36"]


def _table_rows(page: str, cls: str) -> list[list[str]]:
    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.rows, self.cell = False, [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table" and ("class", cls) in attrs:
                self.inside = True
            elif self.inside and tag == "tr":
                self.rows.append([])
            elif self.inside and tag == "td":
                self.cell = ""

        def handle_endtag(self, tag):
            if tag == "table":
                self.inside = False
            elif tag == "td" and self.cell is not None:
                self.rows[-1].append(self.cell.strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    p = P()
    p.feed(page)
    return [r for r in p.rows if r]


def test_report_returns_a_path_that_displays_inline_sandboxed(tmp_path):
    run = make_run(tmp_path / "r", name=f"r {XSS}", steps=20)
    path = dynascope.report(run, tmp_path / "report.html", figures=["loss"])
    assert isinstance(path, Path) and path.read_text(encoding="utf-8").rstrip().endswith("</html>")
    frag = path._repr_html_()
    p = _Collect()
    p.feed(frag)
    assert p.tags == ["iframe"]  # the whole report is one attribute value: nothing of it reaches the notebook page
    assert 'sandbox="allow-scripts"' in frag and "allow-same-origin" not in frag
    # a browser's parse of the attribute gives back exactly the report
    page = path.read_text(encoding="utf-8")
    assert dict(p.attrs[0])["srcdoc"] == page.replace("<head>", '<head>\n<base href="about:srcdoc">', 1)
    assert set(dict(p.attrs[0])) == {"sandbox", "title", "style", "srcdoc"}
    assert "<script>alert(1)</script>" not in frag
    folder = dynascope.report(run, tmp_path / "figs", fmt="png", figures=["loss"])
    assert getattr(folder, "_repr_html_", lambda: None)() is None


def test_nothing_imports_ipython(tmp_path):
    run = make_run(tmp_path / "r", steps=10)
    code = (f"import sys, dynascope\nr = dynascope.load_run({str(run)!r})\n"
            f"dynascope.report(r, {str(tmp_path / 'o.html')!r}, figures=['loss'])._repr_html_()\n"
            "r._repr_html_(); dynascope.figures()._repr_html_()\n"
            "dynascope.figure('loss', r)._repr_png_()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipykernel', 'matplotlib_inline')]\n"
            "print(bad); assert not bad, bad\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr


def test_pickled_notebook_figure_is_still_a_figure(runs):
    import pickle

    fig = dynascope.figure("loss", runs[0])
    back = pickle.loads(pickle.dumps(fig))
    assert isinstance(back, Figure) and np.isclose(back.get_size_inches(), fig.get_size_inches()).all()
