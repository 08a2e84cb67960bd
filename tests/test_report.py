"""The HTML report, PNG/PDF export and the report / ls subcommands, on synthetic runs."""

from __future__ import annotations

import html
import re
import warnings

import pytest
from _synthetic import XSS, make_run

from dynascope import load_run
from dynascope.commands.cli import main
from dynascope.reports import html as html_mod
from dynascope.reports.figures import REGISTRY, FigureSpec, run_colors
from dynascope.reports.html import report
from dynascope.store import RunStore

MY_FIGURES = ["loss", "grad_norm_depth", "grad_norm_step", "weight_norm", "angular_update", "effective_lr",
              "grad_weight_cos", "signal_propagation", "hidden_variance_depth", "massive_activations"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    a = make_run(d / "a", name=f"sgd {XSS}", nan_at=180, massive=True, hessian="above")
    # the hostile module name becomes a block, so it is drawn as a tick label of the depth figures
    store = RunStore(a, mode="resume")
    store.write_meta({"blocks": [f"blocks.{i}" for i in range(6)] + [XSS]})
    store.close()
    b = make_run(d / "b", name="adamw", optimizer="AdamW", lr=1e-3, weight_decay=0.1, seed=1)
    out = report([a, b], d / "report.html")
    return d, a, b, out, out.read_text(encoding="utf-8")


def _figure_html(page: str, key: str) -> str:
    m = re.search(rf'<figure class="fig" id="fig-{key}">(.*?)</figure>', page, re.S)
    assert m, f"figure {key} missing"
    return m.group(1)


def test_one_self_contained_file(two_runs):
    d, a, b, out, page = two_runs
    assert out.exists() and out.suffix == ".html"
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', page)
    assert "<link" not in page and "@import" not in page and "url(http" not in page
    for src in re.findall(r'<img[^>]*src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,")
    assert "Content-Security-Policy" in page
    assert out.stat().st_size < 10_000_000


def test_layout_findings_summary_figures(two_runs):
    *_, page = two_runs
    i_find, i_sum = page.index('id="findings"'), page.index('id="summary"')
    i_fig = page.index('class="fig"')
    assert i_find < i_sum < i_fig
    for key in MY_FIGURES:
        body = _figure_html(page, key)
        assert "<svg" in body or "<img" in body
        assert "Source:" in body and "<figcaption>" in body
    # findings link to figures present in the page
    anchors = set(re.findall(r'id="(fig-[^"]+)"', page))
    links = re.findall(r'<a href="#(fig-[^"]+)">', page)
    assert links and set(links) <= anchors
    # summary table: optimizer, hyper-parameters, torch version, wall time
    summary = page[i_sum:i_fig]
    for text in ("SGD", "AdamW", "lr=0.1", "weight_decay=0.1", "betas=(0.9, 0.999)", "2.13.0+cpu", "5.0 min",
                 "200 recorded (loss), steps 0 to 199", "ResMLP", "12,345"):
        assert text in summary, text


def test_everything_from_the_user_is_escaped(two_runs):
    *_, page = two_runs
    assert "<script>alert(1)</script>" not in page
    assert len(re.findall(r"<script\b", page)) == 1  # the report's own toggle script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # the hostile module name is drawn as an (escaped) SVG tick label of the signal propagation plot
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _figure_html(page, "signal_propagation")


def test_runs_overlay_in_consistent_colours(two_runs):
    d, a, b, out, page = two_runs
    c0, c1 = run_colors([load_run(a), load_run(b)])
    for key in ("loss", "grad_norm_step", "signal_propagation", "angular_update"):
        body = _figure_html(page, key).lower()
        assert c0 in body and c1 in body, key
    # run toggles: one checkbox per run; every tagged group belongs to a run
    assert page.count('class="runtoggle"') == 2
    assert 'class="dsrun0"' in page and 'class="dsrun1"' in page


def test_non_finite_values_are_marked_not_dropped(two_runs):
    *_, page = two_runs
    assert "non-finite value" in _figure_html(page, "loss")
    assert "non-finite" in page[page.index('id="findings"'):page.index('id="summary"')]


def test_equilibrium_line_caption(two_runs):
    *_, page = two_runs
    cap = _figure_html(page, "angular_update")
    # the line follows each step's lr and is drawn only for scale-invariant weights: none among these panels
    # (tests/test_recipe_reports.py draws it); the caption says so per run
    assert "at each step&#39;s learning rate" in cap
    assert "adamw: not drawn (no scale-invariant weight among the panels)" in cap


def test_figures_without_data_are_omitted(tmp_path):
    store = RunStore(tmp_path / "lossonly")
    store.write_meta({"name": "loss only"})
    store.write_scalars((s, "loss", "", 1.0 / (s + 1)) for s in range(50))
    store.close()
    page = report([tmp_path / "lossonly"], tmp_path / "r.html").read_text()
    assert 'id="fig-loss"' in page
    assert page.count('class="fig"') == 1
    assert "Signal propagation" not in page and "No rule fired" in page


def test_per_layer_figures_limit_and_name_layers(two_runs):
    *_, page = two_runs
    cap = _figure_html(page, "weight_norm")
    assert "8 of 14 layers, evenly spaced in model order" in cap and "stem.weight" in cap and "head.weight" in cap


def test_png_and_pdf_export(two_runs, tmp_path):
    d, a, b, *_ = two_runs
    out = report([a, b], tmp_path / "figs", fmt="png")
    pngs = sorted(out.glob("*.png"))
    assert {p.stem.split("-", 1)[1] for p in pngs} >= set(MY_FIGURES)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "angular_update" in (out / "figures.txt").read_text()
    assert "non-finite" in (out / "findings.txt").read_text()
    pdf = report([a], tmp_path / "pdfs", fmt="pdf", figures=["loss", "signal_propagation"])
    files = sorted(p.name for p in pdf.glob("*.pdf"))
    assert files == ["100-loss.pdf", "200-signal_propagation.pdf"]
    assert (pdf / files[0]).read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="fmt must be one of"):
        report([a], tmp_path / "x", fmt="svgz")
    with pytest.raises(ValueError, match="unknown figure key"):
        report([a], tmp_path / "x.html", figures=["nope"])


def test_report_while_the_run_is_being_written(tmp_path):
    path = make_run(tmp_path / "live", steps=50, status="running")
    store = RunStore(path, mode="resume")
    store.write_scalars((s, "loss", "", 0.5) for s in range(50, 60))
    page = report(path, tmp_path / "live.html").read_text()  # the writer still holds its connection
    store.close()
    assert "running" in page


def test_a_failing_figure_is_reported_not_fatal(tmp_path, monkeypatch):
    path = make_run(tmp_path / "r", steps=20)

    def broken(runs):
        raise RuntimeError("kaput <b>")

    monkeypatch.setitem(REGISTRY, "zz_broken", FigureSpec("zz_broken", "Broken", "broken", "none", 999, broken))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        page = report(path, tmp_path / "r.html").read_text()
    assert any("zz_broken" in str(x.message) for x in w)
    assert "could not be drawn: RuntimeError: kaput &lt;b&gt;" in page


def test_large_figures_fall_back_to_png(two_runs, tmp_path, monkeypatch):
    d, a, *_ = two_runs
    monkeypatch.setattr(html_mod, "SVG_LIMIT", 1000)
    page = report(a, tmp_path / "png.html", figures=["loss"]).read_text()
    assert "<svg" not in page and "data:image/png;base64," in page


def test_cli_report_and_ls(two_runs, tmp_path, capsys):
    d, a, b, *_ = two_runs
    out = tmp_path / "cli.html"
    assert main(["report", str(a), str(b), "-o", str(out), "--title", "my <title>"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "<title>my &lt;title&gt;</title>" in out.read_text()
    assert main(["report", str(a), "--format", "png", "-o", str(tmp_path / "pngs"), "--figures", "loss"]) == 0
    assert (tmp_path / "pngs" / "100-loss.png").exists()
    capsys.readouterr()
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynascope report: error:") and "not a dynascope run" in err and "\n" not in err
    assert main(["ls", str(a)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"act\.var\s+\d+ layers\s+steps 0\.\.199 \(200 recorded\)", text)
    assert re.search(r"loss\s+run-level", text)
    assert "weights.spectrum" in text and "note = 'halfway'" in text
    assert main(["ls", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["report"])
    assert exc.value.code == 2


def test_report_accepts_rundata_and_single_path(two_runs, tmp_path):
    d, a, *_ = two_runs
    p1 = report(load_run(a), tmp_path / "one.html", title="T")
    p2 = report(str(a), tmp_path / "two.html")
    assert "<h1>T</h1>" in p1.read_text() and p2.exists()
    with pytest.raises(ValueError, match="at least one run"):
        report([], tmp_path / "none.html")
    # without a title, the page is titled after the run (its hostile name escaped), and draws the same figures
    page2 = p2.read_text()
    assert f"<h1>dynascope report: {html.escape(load_run(a).name)}</h1>" in page2
    ids = re.compile(r'<figure class="fig" id="(fig-[^"]+)"')
    assert ids.findall(page2) == ids.findall(p1.read_text()) != []


def test_report_on_a_real_probed_run(tmp_path):
    """End to end with the live probes: a small residual MLP with BatchNorm trained for 30 steps."""
    torch = pytest.importorskip("torch")
    import dynascope

    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.fc = nn.Linear(w, w)
            self.norm = nn.BatchNorm1d(w)

        def forward(self, x):
            return x + torch.relu(self.norm(self.fc(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[Block(16) for _ in range(4)], nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with dynascope.probe(model, opt, tmp_path / "real", every=1, name="real <run>") as run:
        for _ in range(30):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss, lr=0.1)
    page = dynascope.report([tmp_path / "real"], tmp_path / "real.html").read_text()
    for key in MY_FIGURES:
        assert f'id="fig-{key}"' in page, key
    assert "real &lt;run&gt;" in page and "real <run>" not in page
    # the depth heuristic finds the Sequential's children ('#' pattern) without meta 'blocks'
    assert "matching &#39;#&#39;" in _figure_html(page, "signal_propagation")
    cap = _figure_html(page, "angular_update")
    # sqrt(2*0.1*5e-4/1.9), only for the weights BatchNorm makes scale-invariant (not the stem, not the head)
    assert ("SGD, from each recorded step&#39;s learning rate, up to 0.00725 rad, in the panels of 1.fc.weight, "
            "2.fc.weight, 3.fc.weight, 4.fc.weight.") in cap
