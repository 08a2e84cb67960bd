"""Events and spike forensics: the detector, the stored event format, the ranking of modules, and a real
fault (one layer's learning rate multiplied for a few steps) found first."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from _digits_runs import train
from _synthetic import make_run

import dynascope
from dynascope import load_run
from dynascope.analysis import findings as F
from dynascope.analysis import forensics as FZ
from dynascope.store import RunStore


def _brute_band(y: np.ndarray, window: int, center: bool) -> tuple[list[float], list[float]]:
    med, mad = [], []
    for i in range(len(y)):
        if center:
            lo = i - window // 2
            w = [y[j] for j in range(lo, lo + window) if 0 <= j < len(y) and math.isfinite(y[j])]
        else:
            w = [y[j] for j in range(i - window, i) if j >= 0 and math.isfinite(y[j])]
        if len(w) < 5:
            med.append(math.nan)
            mad.append(math.nan)
            continue
        m = statistics.median(w)
        med.append(m)
        mad.append(statistics.median([abs(v - m) for v in w]))
    return med, mad


@pytest.mark.parametrize("center", [False, True])
def test_rolling_band_matches_a_python_loop(center):
    rng = np.random.default_rng(0)
    y = rng.lognormal(0, 1, 120)
    y[[7, 40, 41]] = np.nan
    y[90] = np.inf
    med, mad = FZ.rolling_band(y, 9, center=center)
    ref_med, ref_mad = _brute_band(y, 9, center)
    np.testing.assert_allclose(med, ref_med, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(mad, ref_mad, rtol=1e-12, equal_nan=True)
    # 2-D: one column per series, the same per column
    m2, d2 = FZ.rolling_band(np.stack([y, 2 * y], axis=1), 9, center=center)
    np.testing.assert_allclose(m2[:, 1], 2 * np.asarray(ref_med), rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(d2[:, 0], ref_mad, rtol=1e-12, equal_nan=True)


def test_detect_events_spike_nonfinite_and_quiet_noise():
    rng = np.random.default_rng(3)
    s = np.arange(300)
    loss = 2.0 * np.exp(-s / 100) + 0.3 + 0.02 * rng.standard_normal(300)
    assert FZ.detect_events(loss).empty  # smooth decay with noise: no event
    loss[150] = 3.0
    loss[151] = 2.5  # the same episode
    loss[220:230] = np.nan
    grad = pd.Series(1 + 0.05 * rng.standard_normal(300), index=s)
    grad[100] = 10.0
    ev = FZ.detect_events(pd.Series(loss, index=s), grad_norm=grad)
    assert ev[["step", "kind"]].values.tolist() == [[100, "grad_spike"], [150, "loss_spike"],
                                                    [220, "loss_nonfinite"]]
    spike = ev[ev["kind"] == "loss_spike"].iloc[0]
    assert spike["value"] == 3.0 and spike["threshold"] < 3.0
    # the threshold is the findings' rule: 2x the median of the previous 20 losses at least
    med = np.median(loss[130:150])
    assert spike["threshold"] >= 2 * med - 1e-12
    assert math.isnan(ev[ev["kind"] == "loss_nonfinite"].iloc[0]["threshold"])
    # the findings and the events agree on which losses are spikes
    assert 150 in F.spikes(s, loss, min_rise=F.SPIKE_MIN_RISE).tolist()


def test_detect_events_rejects_mismatched_input():
    with pytest.raises(ValueError, match="one value per step"):
        FZ.detect_events([1.0, 2.0], steps=[0])


def test_events_detected_then_recorded_round_trip(tmp_path):
    run = load_run(make_run(tmp_path / "r", loss_spike_at=120, nan_at=180))
    ev = run.events()
    assert list(ev.columns) == ["step", "kind", "value", "threshold", "source", "detail"]
    assert (ev["source"] == "detected").all()
    assert {(120, "loss_spike"), (180, "loss_nonfinite"), (120, "grad_spike")} <= set(zip(ev["step"], ev["kind"]))
    # stored events (the format a sentinel writes) take precedence over detection
    stored = pd.DataFrame({"step": [42, 50], "kind": ["loss_spike", "grad_nonfinite"], "value": [9.0, math.inf],
                           "threshold": [3.0, math.nan]})
    store = RunStore(tmp_path / "r", mode="resume")
    store.write_scalars(FZ.event_rows(stored))
    store.close()
    again = load_run(tmp_path / "r")
    rec = again.events()
    assert rec[["step", "kind"]].values.tolist() == [[42, "loss_spike"], [50, "grad_nonfinite"]]
    assert (rec["source"] == "recorded").all() and rec["value"].iloc[1] == math.inf
    assert rec["threshold"].iloc[0] == 3.0 and math.isnan(rec["threshold"].iloc[1])
    assert set(again.events(detect=True)["source"]) == {"detected"}
    # a stored non-finite event value is not reported again as a non-finite metric
    assert not [f for f in F.findings([again]) if f.metric.startswith("event.")]
    with pytest.raises(ValueError, match="without dots"):
        FZ.event_rows(pd.DataFrame({"step": [1], "kind": ["a.b"], "value": [1.0], "threshold": [1.0]}))


def _planted(tmp_path) -> dynascope.RunData:
    """update.norm per module, lognormal noise (5%), with planted jumps before a loss spike at step 102."""
    rng = np.random.default_rng(7)
    store = RunStore(tmp_path / "planted")
    mods = ["enc", "enc.a", "enc.b", "dec", "head"]
    store.write_meta({"modules": mods, "parameters": ["enc.a.weight", "enc.b.weight", "dec.weight", "head.weight"],
                      "every": 1})
    steps = np.arange(120)
    rows = []
    loss = 1.0 + 0.02 * rng.standard_normal(120)
    loss[102:] = 5.0
    rows += [(int(s), "loss", "", float(v)) for s, v in zip(steps, loss)]
    jumps = {"enc.a": (100, 20.0), "dec": (101, 3.0), "head": (101, 8.0)}
    for m in ["enc.a", "enc.b", "dec", "head"]:
        v = 0.01 * np.exp(0.05 * rng.standard_normal(120))
        if m in jumps:
            st, f = jumps[m]
            v[st:] *= f
        rows += [(int(s), "update.norm", m, float(x)) for s, x in zip(steps, v)]
    # parameter-level grad.norm: enc.b.weight goes non-finite at step 101
    g = 0.5 * np.exp(0.05 * rng.standard_normal(120))
    g[101:] = np.inf
    rows += [(int(s), "grad.norm", "enc.b.weight", float(x)) for s, x in zip(steps, g)]
    store.write_scalars(rows)
    store.close()
    return load_run(tmp_path / "planted")


def test_forensics_ranks_planted_jumps_by_size_against_a_recent_band(tmp_path):
    run = _planted(tmp_path)
    tab = run.forensics(102)
    assert list(tab.columns[:4]) == ["module", "metric", "first_step", "ratio"]
    assert tab[["module", "metric", "first_step"]].values.tolist() == [
        ["enc.a", "update.norm", 100],  # a rise before anything went non-finite: what broke it
        ["enc.b", "grad.norm", 101],    # non-finite
        ["head", "update.norm", 101],   # the other rises, largest first; dec's 3x is minibatch-sized: left out
    ]
    assert tab["ratio"].iloc[0] == pytest.approx(20.0, rel=0.15)
    assert tab["ratio"].iloc[2] == pytest.approx(8.0, rel=0.15)
    assert tab["direction"].tolist() == ["up", "non-finite", "up"]
    assert tab["layer"].iloc[1] == "enc.b.weight"  # reported under its module
    assert tab.attrs["loss_step"] == 102 and tab["lead"].tolist() == [2, 1, 1]
    # before the jumps nothing has left its band; a lookback of 0 only searches the event step
    assert run.forensics(99).empty
    assert (run.forensics(102, lookback=0)["first_step"] == 102).all()
    with pytest.raises(ValueError, match="min_ratio"):
        run.forensics(102, min_ratio=0.5)


def test_forensics_lists_a_module_s_rise_before_any_drop(tmp_path):
    """A minibatch dip of one layer's norm before the event is not its cause: rises rank first; a module
    that dipped and later rose is reported at its rise."""
    _planted(tmp_path)
    rng = np.random.default_rng(3)
    rows = []
    for m, dip, rise in (("aux", 96, None), ("aux2", 95, 101)):
        v = 0.01 * np.exp(0.05 * rng.standard_normal(120))
        v[dip] /= 15
        if rise is not None:
            v[rise:] *= 6
        rows += [(int(s), "update.norm", m, float(x)) for s, x in enumerate(v)]
    store = RunStore(tmp_path / "planted", mode="resume")
    store.write_scalars(rows)
    store.close()
    tab = load_run(tmp_path / "planted").forensics(102)
    assert tab["module"].iloc[0] == "enc.a"
    assert tab["direction"].tolist() == ["up", "non-finite", "up", "up", "down"]
    aux2 = tab[tab["module"] == "aux2"].iloc[0]
    assert aux2["first_step"] == 101 and aux2["ratio"] == pytest.approx(6.0, rel=0.15)
    last = tab.iloc[-1]
    assert last["module"] == "aux" and last["first_step"] == 96 and last["ratio"] == pytest.approx(15, rel=0.15)


def test_forensics_ratio_against_an_independent_median(tmp_path):
    run = _planted(tmp_path)
    row = run.forensics(102).iloc[0]
    s, v = run.scalars("update.norm", "enc.a")[["step", "value"]].to_numpy().T
    # the band lives in log space: the median of the logs of the 5 recorded values before step 100
    ref = math.exp(statistics.median([math.log(x) for x in v[95:100]]))
    assert row["median"] == pytest.approx(ref, rel=1e-9)
    assert row["ratio"] == pytest.approx(v[100] / ref, rel=1e-9)


@pytest.fixture(scope="module", params=["0.linear", "3.linear"])
def fault_run(request, tmp_path_factory):
    # Adam: the update size follows the learning rate, so x100 for 5 steps is a 100x larger update
    layer = request.param
    path = train(tmp_path_factory.mktemp("fault") / f"fault-{layer}", steps=48, optimizer="adam", lr=2e-3,
                 lr_change=(layer, 40, 100.0, 5))
    return layer, load_run(path)


def test_injected_fault_layer_ranks_first(fault_run):
    layer, run = fault_run
    ev = run.events()
    loss_ev = ev[ev["kind"] == "loss_spike"]
    assert len(loss_ev) and int(loss_ev["step"].iloc[0]) in (41, 42)  # the loss moves after the bad update
    assert not ev[(ev["step"] >= 30) & (ev["step"] < 40)].shape[0]  # nothing before the fault
    tab = run.forensics(int(loss_ev["step"].iloc[0]))
    top = tab.iloc[0]
    # the cause: the faulty param group's learning rate (the group is named after its layer) ...
    assert (top["module"], top["metric"], top["first_step"]) == (layer, "optim.lr", 40)
    assert top["ratio"] == pytest.approx(100.0) and top["lead"] >= 1
    # ... then the layer's own update, above every other module (update.norm: the sentinel's every-step module
    # update norm; update.relative: the update probe's)
    top = tab[tab["metric"] != "optim.lr"].iloc[0]
    assert top["module"] == layer and top["first_step"] == 40
    assert top["metric"] in ("update.norm", "update.relative") and top["ratio"] > 10 and top["lead"] >= 1
    # every other module that moved did so later (the effect, one step after the cause); the faulty layer's
    # parent modules (the sentinel's update.norm of "0" holds "0.linear") move with it
    others = tab[~tab["module"].map(lambda m: layer == m or layer.startswith(m + "."))]
    assert (others["first_step"] > 40).all()


def test_report_opens_with_forensics_of_the_event(fault_run, tmp_path):
    layer, run = fault_run
    out = dynascope.report(run, tmp_path / "r.html")
    page = out.read_text(encoding="utf-8")
    i_for, i_find = page.index('id="forensics"'), page.index('id="findings"')
    assert i_for < i_find
    section = page[i_for:i_find]
    assert "loss_spike at step" in section
    first_row = section[section.index('<tr class="top">'):]
    assert f"<td>{layer}</td>" in first_row[:300]
    assert section.count("<svg") >= 1 and f"#1 {layer}" in section
    # a gradient-norm spike of the same episode is not shown twice
    step = int(run.events().query("kind == 'loss_spike'")["step"].iloc[0])
    assert f"grad_spike at step {step} " not in section and f"grad_spike at step {step + 1} " not in section


def test_spike_threshold_against_a_loop():
    """The findings' and the events' spike threshold: max(2 x median, median + 6 x 1.4826 x MAD, median + 0.1 x
    starting loss) over the previous 20 finite values, computed here with statistics.median."""
    rng = np.random.default_rng(11)
    v = 1.0 + 0.3 * rng.standard_normal(80)  # noisy enough that the MAD term dominates 2 x median
    v[33] = np.nan
    thr = F.spike_threshold(v, min_rise=0.1)
    start = statistics.median([x for x in v[:20] if math.isfinite(x)])
    for i in (10, 34, 60, 79):
        w = [x for x in v[max(i - 20, 0):i] if math.isfinite(x)]
        m = statistics.median(w)
        mad = statistics.median([abs(x - m) for x in w])
        ref = max(2 * m, m + 6 * 1.4826 * mad, m + 0.1 * start)
        assert thr[i] == pytest.approx(ref, rel=1e-12)
    assert (6 * 1.4826 * mad) > m  # the MAD term is the binding one here
    assert np.isnan(thr[:5]).all()  # fewer than 5 previous values


def test_forensics_section_escapes_module_names(tmp_path):
    from _synthetic import XSS

    rng = np.random.default_rng(2)
    store = RunStore(tmp_path / "x")
    store.write_meta({"name": f"run {XSS}", "modules": [XSS, "ok"], "every": 1})
    loss = 1.0 + 0.02 * rng.standard_normal(60)
    loss[50:] = 6.0
    rows = [(s, "loss", "", float(v)) for s, v in enumerate(loss)]
    for m in (XSS, "ok"):
        v = 0.01 * np.exp(0.05 * rng.standard_normal(60))
        if m == XSS:
            v[49:] *= 20
        rows += [(s, "update.norm", m, float(x)) for s, x in enumerate(v)]
    store.write_scalars(rows)
    store.close()
    run = load_run(tmp_path / "x")
    assert run.forensics(50)["module"].tolist() == [XSS]
    page = dynascope.report(run, tmp_path / "x.html").read_text(encoding="utf-8")
    section = page[page.index('id="forensics"'):page.index('id="findings"')]
    assert XSS not in page  # only escaped forms, in the tables, headings and figure text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section


def test_zero_norms_do_not_break_the_ratio(tmp_path):
    """A module frozen at update norm 0 that starts moving: a departure with an infinite ratio, no overflow."""
    store = RunStore(tmp_path / "z")
    store.write_meta({"modules": ["frozen"], "every": 1})
    v = np.zeros(40)
    v[30:] = 1e10
    store.write_scalars([(s, "update.norm", "frozen", float(x)) for s, x in enumerate(v)]
                        + [(s, "loss", "", 1.0) for s in range(40)])
    store.close()
    tab = load_run(tmp_path / "z").forensics(31)
    assert tab[["module", "first_step", "direction"]].values.tolist() == [["frozen", 30, "up"]]
    assert math.isinf(tab["ratio"].iloc[0])


def test_a_sentinel_run_without_events_is_not_second_guessed(tmp_path):
    """The sentinel judged every step: a run it watched with no stored event has none (the report's looser
    offline rule would find minibatch 'spikes' near zero loss); detect=True still detects."""
    path = make_run(tmp_path / "r", loss_spike_at=120)
    assert len(load_run(path).events())  # no sentinel: detected from the loss
    store = RunStore(path, mode="resume")
    store.write_meta({"sentinel": {"window": 64, "burst": 20, "updates": True, "drift": True}})
    store.close()
    run = load_run(path)
    assert run.events().empty and list(run.events().columns) == ["step", "kind", "value", "threshold", "source",
                                                                 "detail"]
    assert (run.events(detect=True)["step"] == 120).any()


def test_a_learning_rate_jump_heads_the_table_above_larger_effects_before_a_nan(tmp_path):
    """The lr is set, not caused: its row ranks first even when a module's update rose more and before the
    gradients went non-finite (a rank by size alone would put the effect first)."""
    _planted(tmp_path)
    lr = np.full(120, 1e-3)
    lr[100:] *= 100
    boost = 0.01 * np.exp(0.05 * np.random.default_rng(5).standard_normal(120))
    boost[100:] *= 1000
    store = RunStore(tmp_path / "planted", mode="resume")
    store.write_scalars([(int(s), "optim.lr", "group0", float(v)) for s, v in enumerate(lr)]
                        + [(int(s), "update.norm", "big", float(v)) for s, v in enumerate(boost)])
    store.close()
    tab = load_run(tmp_path / "planted").forensics(102)
    assert tab[["module", "metric"]].values.tolist()[:3] == [
        ["group0", "optim.lr"], ["big", "update.norm"], ["enc.a", "update.norm"]]
    assert tab["ratio"].iloc[0] == pytest.approx(100.0)


def test_forensics_figure_spans_the_steps_a_short_run_has(tmp_path):
    """A 40-step run recorded every 10 steps (dense around its event, as the sentinel writes it): the panels'
    step axis covers the run's steps and the event, not the look-back of 160 steps before step 0 it lacks."""
    from dynascope.reports.forensics_view import forensics_figure

    store = RunStore(tmp_path / "short")
    store.write_meta({"modules": ["a"], "parameters": ["a.weight"], "every": 10})
    rng = np.random.default_rng(0)
    loss = 1.0 + 0.02 * rng.standard_normal(40)
    loss[31:] = 8.0
    upd = 0.01 * np.exp(0.05 * rng.standard_normal(40))
    upd[30:] *= 50.0
    store.write_scalars([(s, "loss", "", float(v)) for s, v in enumerate(loss)]
                        + [(s, "update.norm", "a", float(v)) for s, v in enumerate(upd)])
    store.close()
    run = load_run(tmp_path / "short")
    table = run.forensics(31)
    assert table["module"].tolist()[:1] == ["a"]
    fig = forensics_figure(run, pd.Series({"step": 31, "kind": "loss_spike"}), table)
    lo, hi = fig.axes[0].get_xlim()
    assert 0 <= lo <= 1 and 38 <= hi <= 39, (lo, hi)
