"""Report figures of the scheduled recorders (calibration, noise scale, neural collapse, example scores) on a
real probed run, and their absence on a run that did not record them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.reports.figures import all_figures
from dynascope.reports.figures.calibration import calibration_curves, reliability_diagrams
from dynascope.reports.figures.collapse import collapse_figure
from dynascope.reports.figures.noise_scale import WINDOW, noise_scale_figure, smoothed_noise_scale
from dynascope.reports.figures.scores import scores_figure
from dynascope.store import RunStore

FIGS = (calibration_curves, reliability_diagrams, collapse_figure, noise_scale_figure, scores_figure)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(400, 4, generator=g)).argmax(1)
    held = (x[300:], y[300:])
    sched = [dynascope.Calibration(every=10, batch=held),
             dynascope.NoiseScale(every=10, batch=(x[:256], y[:256]), loss_fn=F.cross_entropy, micro_batches=8,
                                  batch_size=16),
             dynascope.Collapse(every=10, batch=held)]
    path = tmp_path_factory.mktemp("fig") / "run"
    with dynascope.probe(model, opt, path, every=10, scheduled=sched) as run:
        for _ in range(60):
            idx = torch.randint(0, 300, (16,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    return dynascope.load_run(path)


def test_figures_absent_without_their_metrics(tmp_path):
    store = RunStore(tmp_path / "empty")
    store.write_scalars([(0, "loss", "", 1.0)])
    store.close()
    empty = dynascope.load_run(tmp_path / "empty")
    for fn in FIGS:
        assert fn([empty]) is None, fn.__name__
    keys = {s.key for s in all_figures()}
    assert {"calibration", "calibration_reliability", "gradient_noise_scale", "neural_collapse",
            "example_scores"} <= keys


def test_calibration_figures_show_the_recorded_values(probed):
    fig = calibration_curves([probed])
    ece = probed.scalars("calibration.ece")
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), ece["value"].to_numpy())
    assert [a.get_title() for a in fig.axes][:2] == ["ECE (15 bins)", "NLL on the held-out batch"]
    rel = reliability_diagrams([probed])
    first, last = rel.axes[0], rel.axes[1]
    assert "step 0" in first.get_title() and "step 50" in last.get_title()
    arrays, _ = probed.load_artifact("calibration.reliability", 50)
    ok = arrays["count"] > 0
    heights = [p.get_height() for p in last.patches[:ok.sum()]]
    np.testing.assert_allclose(heights, arrays["accuracy"][ok])


def test_noise_scale_figure_draws_the_batch_size_and_a_running_median(probed):
    fig = noise_scale_figure([probed])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    hlines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert [float(ln.get_ydata()[0]) for ln in hlines] == [16.0]
    s, med = smoothed_noise_scale(probed)
    g = probed.scalars("gns.grad_sq").set_index("step")["value"]
    t = probed.scalars("gns.trace_cov").set_index("step")["value"]
    ratio = np.where(g > 0, t / g, np.inf)
    expected = [np.median(ratio[max(0, i - WINDOW // 2):i + WINDOW // 2 + 1]) for i in range(len(ratio))]
    np.testing.assert_allclose(med, expected, rtol=1e-12)
    assert list(s) == [0, 10, 20, 30, 40, 50]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    np.testing.assert_allclose(solid[0].get_ydata(), np.asarray(expected)[np.isfinite(expected)])


def test_collapse_figure_on_a_log_axis(probed):
    fig = collapse_figure([probed])
    assert fig.axes[0].get_yscale() == "log"
    assert "input of 2" in str(fig.dynascope_caption)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), probed.scalars("collapse.nc1")["value"])


def test_scores_figure(tmp_path):
    store = RunStore(tmp_path / "s")
    rng = np.random.default_rng(0)
    rows = []
    for step in (0, 100):
        v = rng.gamma(2.0, 0.3 if step else 0.5, size=200)
        store.write_artifact("scores.el2n", step, {"scores": v}, {"kind": "el2n"})
        q = np.quantile(v, [0.1, 0.5, 0.9])
        rows += [(step, "scores.el2n", "q10", q[0]), (step, "scores.el2n", "q50", q[1]),
                 (step, "scores.el2n", "q90", q[2]), (step, "scores.el2n", "mean", v.mean())]
    store.write_scalars(rows)
    store.close()
    run = dynascope.load_run(tmp_path / "s")
    fig = scores_figure([run])
    med = fig.axes[0].lines[0]
    np.testing.assert_allclose(med.get_ydata(), [r[3] for r in rows if r[2] == "q50"])
    assert len(fig.axes) == 2  # one kind: quantiles and histogram


def test_report_renders_the_new_sections(probed, tmp_path):
    out = dynascope.report([probed], tmp_path / "r.html")
    html = out.read_text()
    for title in ("Calibration against step", "Reliability diagrams", "Gradient noise scale B_simple",
                  "Neural collapse against step"):
        assert title in html
    # the recorders' rows are not user scalars: the loss figure keeps to the loss
    from dynascope.reports.figures.training import _user_scalars

    assert _user_scalars(probed) == ["loss"]
