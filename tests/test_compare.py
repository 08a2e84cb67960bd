"""Comparison with a known-good run: planted deviations, the band against a loop, real runs that differ in one
layer's learning rate, and null comparisons (same seed; another data order; independent noise)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from _digits_runs import edited_copy, train
from _synthetic import make_run

import dynascope
from dynascope.analysis import comparison as C
from dynascope.analysis.findings import baseline_findings
from dynascope.store import RunStore, load_run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    base = make_run(d / "base", seed=0)
    twin = make_run(d / "twin", seed=0)
    noise = make_run(d / "noise", seed=5)  # same dynamics, independent noise
    planted = edited_copy(base, d / "planted", {("grad.norm", "blocks.3.fc1.weight"): (list(range(120, 200)), 3.0),
                                                ("act.var", "blocks.1"): (list(range(150, 200)), 0.2)})
    return {k: load_run(v) for k, v in (("base", base), ("twin", twin), ("noise", noise), ("planted", planted))}


def test_identical_and_independent_noise_give_no_deviation(synthetic):
    assert dynascope.compare(synthetic["twin"], synthetic["base"]).empty
    assert dynascope.compare(synthetic["noise"], synthetic["base"]).empty
    assert dynascope.compare(synthetic["base"], synthetic["noise"]).empty


def test_planted_deviations_in_order(synthetic):
    dev = dynascope.compare(synthetic["planted"], synthetic["base"].path)  # a RunData and a path
    assert list(dev.columns[:5]) == ["metric", "layer", "first_step", "ratio", "direction"]
    assert dev[["metric", "layer", "first_step", "direction"]].values.tolist() == [
        ["grad.norm", "blocks.3.fc1.weight", 120, "up"],
        ["act.var", "blocks.1", 150, "down"],
    ]
    # ratio: the run against the baseline's rolling median (the planted factor, within the noise)
    assert dev["ratio"].iloc[0] == pytest.approx(3.0, rel=0.25)
    assert dev["ratio"].iloc[1] == pytest.approx(5.0, rel=0.25)
    assert 72 <= dev["n_steps"].iloc[0] <= 80 and 45 <= dev["n_steps"].iloc[1] <= 50  # out of 80 and 50 steps


def test_band_matches_a_loop(synthetic):
    run, base = synthetic["planted"], synthetic["base"]
    b = C.band(run, base, "grad.norm", "blocks.3.fc1.weight")
    s, v = base.scalars("grad.norm", "blocks.3.fc1.weight")[["step", "value"]].to_numpy().T
    y = [math.log(x) for x in v]
    t = 60
    w, h = C.COMPARE_WINDOW, C.COMPARE_WINDOW // 2

    def centre(i: int) -> float:
        return statistics.median(y[max(i - h, 0):i + h + 1])

    def half(i: int) -> float:
        d = [y[j] - y[j - 1] for j in range(max(i - h, 1), min(i + h + 1, len(y)))]
        md = statistics.median(d)
        spread = statistics.median([abs(x - md) for x in d])
        return max(C.COMPARE_MADS * 1.4826 * spread, math.log(C.COMPARE_MIN_RATIO))

    assert w == 2 * h + 1
    sh = C.COMPARE_SHIFT
    lo = min(min(y[j], centre(j)) for j in range(t - sh, t + sh + 1)) - half(t)
    hi = max(max(y[j], centre(j)) for j in range(t - sh, t + sh + 1)) + half(t)
    row = b[b["step"] == t].iloc[0]
    assert row["low"] == pytest.approx(math.exp(lo), rel=1e-9)
    assert row["high"] == pytest.approx(math.exp(hi), rel=1e-9)
    assert row["low"] <= row["baseline"] <= row["high"]  # the band holds the baseline itself
    assert not b[b["step"] < 120]["out"].any() and b[b["step"] >= 120]["out"].mean() > 0.9


def test_persistence_and_nonfinite(tmp_path, synthetic):
    # two single-step outliers: not a deviation (COMPARE_PERSIST = 3); a NaN: a deviation at once
    blip = edited_copy(synthetic["base"].path, tmp_path / "blip", {("act.absmax", "stem"): ([60, 62], 50.0),
                                                                   ("weight.norm", "head.weight"): ([90], None)})
    dev = dynascope.compare(blip, synthetic["base"])
    assert dev[["metric", "layer", "first_step", "direction"]].values.tolist() == [
        ["weight.norm", "head.weight", 90, "non-finite"]]
    assert math.isinf(dev["ratio"].iloc[0])


def test_bad_input(synthetic, tmp_path):
    other = RunStore(tmp_path / "other")
    other.write_scalars([(0, "something.else", "", 1.0), (5000, "loss", "", 1.0)])
    other.close()
    with pytest.raises(ValueError, match="share no recorded metric"):
        dynascope.compare(synthetic["base"], load_run(tmp_path / "other"))
    with pytest.raises(ValueError, match="not recorded in both"):
        dynascope.compare(synthetic["base"], synthetic["twin"], metrics=["nope"])
    with pytest.raises(ValueError, match="window"):
        dynascope.compare(synthetic["base"], synthetic["twin"], window=1)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    kw = dict(steps=60, every=2, probes=("activations", "gradients", "updates"))
    base = train(d / "base", **kw)
    hot = train(d / "hot", lr_change=("2.linear", 30, 10.0, 10**6), **kw)  # lr x10 from step 30 on
    same = train(d / "same", **kw)
    order = train(d / "order", data_seed=1, **kw)  # another data order, same initialisation
    return {k: load_run(v) for k, v in (("base", base), ("hot", hot), ("same", same), ("order", order))}


def test_raised_learning_rate_names_the_layer(digits_runs):
    dev = dynascope.compare(digits_runs["hot"], digits_runs["base"])
    top = dev.iloc[0]
    # the faulty layer: its weight, or its module ("2.linear", "2") through the sentinel's update.norm
    in_fault = ("2", "2.linear", "2.linear.weight")
    assert top["layer"] in in_fault and top["first_step"] == 30 and top["direction"] == "up"
    assert top["ratio"] == pytest.approx(10.0, rel=0.05)
    # at the first step only that layer deviates; the other layers follow later
    first = dev[dev["first_step"] == 30]
    assert "2.linear.weight" in set(first["layer"]) and set(first["layer"]) <= set(in_fault)
    assert set(first["metric"]) >= {"update.relative", "lr.effective"}


def test_same_seed_and_other_data_order_give_no_deviation(digits_runs):
    assert dynascope.compare(digits_runs["same"], digits_runs["base"]).empty
    assert dynascope.compare(digits_runs["order"], digits_runs["base"]).empty
    assert dynascope.compare(digits_runs["base"], digits_runs["order"]).empty


def test_report_with_baseline_lists_deviations_first(digits_runs, tmp_path):
    from dynascope.commands.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(digits_runs["hot"].path), "--baseline", str(digits_runs["base"].path),
                 "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    i_find, i_cmp, i_sum = page.index('id="findings"'), page.index('id="comparison"'), page.index('id="summary"')
    assert i_find < i_cmp < i_sum
    findings = page[i_find:i_cmp]
    items = findings.split("<li ")[1:]
    assert "Deviates from baseline" in items[0] and "2.linear.weight" in items[0]
    assert 'href="#fig-baseline_deviations"' in items[0]
    assert 'id="fig-baseline_deviations"' in page[i_cmp:i_sum] and "<svg" in page[i_cmp:i_sum]
    assert "(baseline)" in page  # the baseline is drawn in the figures too
    assert np.sum([("Deviates" in it) for it in items]) >= 2


def _tiny_run(path, series):
    """A run of 100 steps with ``series[(metric, layer)] = values``."""
    store = RunStore(path)
    store.write_meta({"name": path.name})
    store.write_scalars([(s, m, lay, float(v)) for (m, lay), vals in series.items() for s, v in enumerate(vals)])
    store.close()
    return load_run(path)


def _noisy(level, n=100, seed=0):
    return level * (1 + 0.01 * np.random.default_rng(seed).standard_normal(n))


def test_signed_metrics_have_no_ratio(tmp_path):
    """A signed metric (known signed like act.mean, or one whose values take both signs) is compared on its
    values: ratio NaN and the message gives the difference, not `act.mean 6.48e+296x down`."""
    steps = np.arange(100)
    base = _tiny_run(tmp_path / "base", {("act.mean", "a"): _noisy(0.5), ("my.stat", ""): _noisy(2.0),
                                         ("act.mean", "b"): _noisy(0.5)})
    run = _tiny_run(tmp_path / "run", {("act.mean", "a"): np.where(steps >= 60, -0.5, _noisy(0.5, seed=1)),
                                       ("my.stat", ""): np.where(steps >= 50, -1.0, _noisy(2.0, seed=1)),
                                       ("act.mean", "b"): np.where(steps >= 70, 5.0, _noisy(0.5, seed=1))})
    dev = dynascope.compare(run, base)
    rows = {(r.metric, r.layer): r for r in dev.itertuples()}
    assert set(rows) == {("act.mean", "a"), ("my.stat", ""), ("act.mean", "b")}
    for r in rows.values():
        assert math.isnan(r.ratio) and math.isnan(r.peak_ratio)
    assert rows[("act.mean", "a")].direction == "down" and rows[("act.mean", "a")].first_step == 60
    assert rows[("my.stat", "")].first_step == 50  # positive in the baseline, negative in the run: signed
    assert rows[("act.mean", "b")].direction == "up"  # positive in both runs, but signed by definition
    found = baseline_findings(run, base, dev)
    text = " ".join(f.message for f in found)
    assert "e+" not in text and "x down" not in text
    assert "act.mean down by 0.99" in text and "(-0.5 vs baseline 0.49" in text, text


def test_folded_items_carry_their_own_first_step(tmp_path):
    """`from step 211: lr 1.53x down, loss 1.85x up` dated the loss rise 40 steps early."""
    steps = np.arange(100)
    base = _tiny_run(tmp_path / "base", {("lr", ""): _noisy(1e-3), ("loss", ""): _noisy(2.0)})
    run = _tiny_run(tmp_path / "run", {("lr", ""): np.where(steps >= 40, 1e-3 / 1.53, _noisy(1e-3, seed=1)),
                                       ("loss", ""): np.where(steps >= 80, 2.0 * 1.85, _noisy(2.0, seed=1))})
    found = baseline_findings(run, base)
    assert len(found) == 1
    msg = found[0].message
    assert "from step 40: lr 1.5" in msg and "x down from step 40, loss 1.8" in msg and "x up from step 80" in msg
    assert C.deviation_text({"metric": "loss", "first_step": 7, "ratio": math.inf, "direction": "non-finite",
                             "value": math.nan, "baseline_value": 1.0}) == "loss non-finite from step 7"
