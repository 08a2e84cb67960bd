"""Report figures of the BatchNorm statistics, the distance from initialisation
and the spectral norms: drawn from what the probes record, absent when nothing
was recorded, the log-step fit recovers a planted slope, names are escaped."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dynascope
from dynascope.reports.figures import dynamics
from dynascope.reports.figures._helpers import CAPTION_ATTR
from dynascope.store import RunStore

XSS = "<script>alert(1)</script>"


def write_run(path, *, bn: bool = True, slope: float = 2.0):
    store = RunStore(path)
    store.write_meta({"name": path.name, "modules": ["bn0", XSS], "parameters": ["fc.weight", "head.weight"]})
    rows = []
    for s in range(0, 400, 5):
        rows.append((s, "loss", "", 1.0 / (s + 1)))
        if bn:
            for lay in ("bn0", XSS):
                rows.append((s, "bn.mean_shift", lay, 0.5 * math.exp(-s / 50)))
                rows.append((s, "bn.var_ratio", lay, 1.0 - 0.9 * math.exp(-s / 30)))
            if s % 100 == 0:
                rows += [(s, "bn.train_eval_gap", "", 0.1), (s, "bn.eval_loss", "", 0.6), (s, "bn.train_loss", "", 0.5)]
        total = 0.3 + slope * math.log(s + 1)
        rows.append((s, "weight.distance_init", "", total))
        for lay in ("fc.weight", "head.weight"):
            rows += [(s, "weight.distance_init", lay, total / math.sqrt(2)),
                     (s, "weight.spectral_norm", lay, 1.0 + s / 400),
                     (s, "update.spectral_norm", lay, 0.01),
                     (s, "update.rms_to_rms", lay, 0.02 if s != 200 else float("nan"))]
    store.write_scalars(rows)
    store.close()
    return dynascope.load_run(path)


def test_figures_drawn_and_absent(tmp_path):
    run = write_run(tmp_path / "a")
    bare = write_run(tmp_path / "b", bn=False)
    for fn in (dynamics.bn_mean_shift, dynamics.bn_var_ratio, dynamics.bn_gap):
        assert fn([bare]) is None
        fig = fn([run, bare])
        assert fig is not None
        # only the run with BatchNorm rows is in the legend
        assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "a"
        assert "b" not in [t.get_text() for t in fig.legends[0].get_texts()]
    for fn in (dynamics.distance_init, dynamics.spectral_norm, dynamics.update_spectral_norm):
        assert fn([run, bare]) is not None
    # the NaN update is marked, not dropped
    fig = dynamics.update_spectral_norm([run])
    assert "non-finite value" in [t.get_text() for t in fig.legends[0].get_texts()]


@pytest.mark.parametrize("slope", [0.5, 2.0])
def test_distance_log_fit_recovers_the_slope(tmp_path, slope):
    run = write_run(tmp_path / "r", slope=slope)
    fig = dynamics.distance_init([run])
    caption = getattr(fig, CAPTION_ATTR)
    assert f"b = {slope:.3g} per e-fold" in caption and "R^2 = 1.000" in caption
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "whole network"
    a, b, r2 = dynamics._log_fit(np.arange(0, 400, 5), 0.3 + slope * np.log(np.arange(0, 400, 5) + 1))
    assert a == pytest.approx(0.3) and b == pytest.approx(slope) and r2 == pytest.approx(1.0)


def test_report_has_the_figures_and_escapes_names(tmp_path):
    run = write_run(tmp_path / "r")
    keys = ["bn_mean_shift", "bn_var_ratio", "bn_gap", "distance_init", "spectral_norm", "update_spectral_norm"]
    out = dynascope.report([run], tmp_path / "report.html", figures=keys)
    html = out.read_text() if hasattr(out, "read_text") else open(out).read()
    for title in ("Batch mean against running mean", "Distance from initialisation against log step",
                  "Spectral norm of each weight matrix", "RMS-to-RMS operator norm"):
        assert title in html
    assert XSS not in html
    # the BatchNorm gap rows are not plotted again as user scalars in the loss figure
    from dynascope.reports.figures.training import _user_scalars
    assert _user_scalars(run) == ["loss"]
