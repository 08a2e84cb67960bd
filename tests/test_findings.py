"""Each finding rule fires on a synthetic run that has its pattern and stays silent on one that does not."""

from __future__ import annotations

import numpy as np
import pytest
from _synthetic import make_run

from dynascope import load_run
from dynascope.analysis import findings as F
from dynascope.store import RunStore


def _rules(run, name):
    return [f for f in F.findings([run]) if f.rule == name]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("f") / "clean"))


def test_clean_run_has_no_findings(clean):
    assert F.findings([clean]) == []


def test_every_rule_documents_source_and_threshold():
    assert len(F.RULES) >= 10
    for name, fn in F.RULES.items():
        doc = fn.__doc__ or ""
        assert "Source" in doc or "Sources" in doc, name
        assert any(ch.isdigit() for ch in doc), f"{name}: no threshold stated"


def test_sharpness_rule(tmp_path):
    above = load_run(make_run(tmp_path / "above", hessian="above"))
    below = load_run(make_run(tmp_path / "below", hessian="below"))
    (f,) = _rules(above, "sharpness_above_threshold")
    assert f.metric == "hessian.eig" and f.layer == "1"
    assert f.value >= f.threshold == pytest.approx(2 / 0.1)
    assert f.figure_key == "curvature_sharpness" and str(f.step) in f.message
    assert _rules(below, "sharpness_above_threshold") == []


def test_loss_spike_with_and_without_gradient_spike(tmp_path):
    both = load_run(make_run(tmp_path / "both", loss_spike_at=120))
    (f,) = _rules(both, "loss_spikes")
    assert f.severity == "warning" and f.step == 120 and "gradient-norm spike" in f.message
    alone = load_run(make_run(tmp_path / "alone", loss_spike_at=120, grad_spike=False))
    (g,) = _rules(alone, "loss_spikes")
    assert g.severity == "info" and "no gradient-norm or sharpness spike" in g.message
    # a spike while sharpness sits above its threshold counts as coinciding too
    sharp = load_run(make_run(tmp_path / "sharp", loss_spike_at=190, grad_spike=False, hessian="above"))
    (h,) = _rules(sharp, "loss_spikes")
    assert h.severity == "warning" and "sharpness" in h.message


def test_spike_detector_ignores_smooth_decay_and_noise():
    rng = np.random.default_rng(0)
    s = np.arange(2000)
    v = 3 * np.exp(-s / 300) + 0.1 + 0.02 * rng.standard_normal(2000)
    assert len(F.spikes(s, v)) == 0
    v[1500] = 5.0
    assert F.spikes(s, v).tolist() == [1500]


def test_loss_spike_floor_ignores_minibatch_noise_near_zero_loss():
    # heavy-tailed minibatch loss near zero: single batches jump 10x the median, yet by a tiny amount
    rng = np.random.default_rng(1)
    s = np.arange(600)
    v = 2.3 * np.exp(-s / 30) + 0.003 * rng.lognormal(0.0, 1.0, 600)
    v[400] = 0.05  # 10x+ the median, far above 6 MADs, but a rise of 2% of the starting loss
    assert 400 in F.spikes(s, v).tolist()  # the relative test alone flags it
    assert 400 not in F.spikes(s, v, min_rise=F.SPIKE_MIN_RISE).tolist()
    v[500] = 1.0  # back to 40% of the starting loss: an instability
    assert 500 in F.spikes(s, v, min_rise=F.SPIKE_MIN_RISE).tolist()


def test_non_finite_rule(tmp_path):
    nan = load_run(make_run(tmp_path / "nan", nan_at=150, inf_grad_at=30))
    found = _rules(nan, "non_finite_values")
    assert found[0].metric == "loss" and found[0].step == 150 and found[0].severity == "error"
    by_metric = {f.metric: f for f in found}
    assert by_metric["grad.norm"].step == 30 and "inf" in by_metric["grad.norm"].message
    assert any(f.metric.startswith("act.") and "NaN" in f.message for f in found)


def test_variance_growth_rule(tmp_path, clean):
    grow = load_run(make_run(tmp_path / "grow", var_growth=True))
    (f,) = _rules(grow, "variance_grows_with_depth")
    assert f.layer == "blocks.5" and f.figure_key == "hidden_variance_depth"
    assert f.value >= f.threshold
    assert _rules(clean, "variance_grows_with_depth") == []
    # without meta 'blocks' the depth heuristic finds blocks.# and still fires
    grow2 = load_run(make_run(tmp_path / "grow2", var_growth=True, mark_blocks=False))
    assert len(_rules(grow2, "variance_grows_with_depth")) == 1


def test_massive_activation_rule(tmp_path, clean):
    big = load_run(make_run(tmp_path / "big", massive=True))
    (f,) = _rules(big, "massive_activations")
    assert f.layer == "blocks.3" and f.value > 100 and "weaker" in f.message
    assert _rules(clean, "massive_activations") == []


def test_massive_activation_uses_median_when_recorded(tmp_path):
    path = make_run(tmp_path / "med", massive=True, steps=20)
    store = RunStore(path, mode="resume")
    # median |act| so large that the 1000x-median criterion fails although absmax > 100
    store.write_scalars((s, "act.absmedian", "blocks.3", 50.0) for s in range(20))
    store.close()
    assert _rules(load_run(path), "massive_activations") == []


def test_grad_ratio_rule(tmp_path, clean):
    post = load_run(make_run(tmp_path / "post", grad_growth=100.0))
    (f,) = _rules(post, "grad_norm_depth_ratio")
    assert f.value >= 10 and "Post-LN" in f.message
    pre = load_run(make_run(tmp_path / "pre", grad_growth=0.01))
    (g,) = _rules(pre, "grad_norm_depth_ratio")
    assert g.value <= 0.1 and "early layers" in g.message
    assert _rules(clean, "grad_norm_depth_ratio") == []


def test_effective_lr_rule(tmp_path):
    decay = load_run(make_run(tmp_path / "decay", weight_decay=0.0, scale_invariant=True, eff_lr_decay=30))
    (f,) = _rules(decay, "effective_lr_decay")
    assert ".fc1.weight" in f.layer and f.value < f.threshold
    assert "30x" in f.message or "29" in f.message or "3e+01" in f.message
    # the same decay with weight decay on is not flagged (the norm is then held at equilibrium by design)
    wd = load_run(make_run(tmp_path / "wd", weight_decay=5e-4, scale_invariant=True, eff_lr_decay=30))
    assert _rules(wd, "effective_lr_decay") == []
    # nor a decay of only 3x
    mild = load_run(make_run(tmp_path / "mild", weight_decay=0.0, scale_invariant=True, eff_lr_decay=3))
    assert _rules(mild, "effective_lr_decay") == []


def test_plasticity_rules(tmp_path):
    bad = load_run(make_run(tmp_path / "bad", dead_frac=0.3, dormant_frac=0.5, erank_drop=0.2))
    (d,) = _rules(bad, "dead_units")
    assert d.value == pytest.approx(0.3) and d.threshold == F.DEAD_FRACTION
    (m,) = _rules(bad, "dormant_units")
    assert m.value == pytest.approx(0.5)
    (e,) = _rules(bad, "effective_rank_collapse")
    assert e.value == pytest.approx(6.0) and "20%" in e.message
    ok = load_run(make_run(tmp_path / "ok", dead_frac=0.05, dormant_frac=0.1, erank_drop=0.8))
    assert _rules(ok, "dead_units") == _rules(ok, "dormant_units") == _rules(ok, "effective_rank_collapse") == []


def test_findings_carry_run_name_and_sort_errors_first(tmp_path):
    r = load_run(make_run(tmp_path / "r", name="my run", nan_at=150, massive=True))
    found = F.findings([r])
    assert all(f.run == "my run" for f in found)
    sev = [f.severity for f in found]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)
    with pytest.raises(KeyError, match="unknown finding rule"):
        F.findings([r], rules=["nope"])


def test_broken_rule_becomes_info(tmp_path, monkeypatch, clean):
    def boom(run):
        raise RuntimeError("kaput")

    monkeypatch.setitem(F.RULES, "boom", boom)
    (f,) = F.findings([clean])
    assert f.severity == "info" and "kaput" in f.message and f.rule == "boom"
    assert f.message == "Rule boom could not run: RuntimeError: kaput" and f.run == clean.name
    # the broken rule hides no other rule: a run with a NaN loss still gets its error finding
    nan_run = load_run(make_run(tmp_path / "nan", nan_at=150))
    rules = {g.rule: g.severity for g in F.findings([nan_run])}
    assert rules["boom"] == "info" and "error" in rules.values() and len(rules) >= 2


# -- calibration and gradient noise scale --------------------------------------------------------

def _scalar_run(path, series: dict[str, list[float]], steps: list[int]):
    store = RunStore(path)
    store.write_scalars([(s, m, "", float(v)) for m, vals in series.items() for s, v in zip(steps, vals)])
    store.close()
    return load_run(path)


def test_overconfidence_rule_fires_on_guo_pattern_only(tmp_path):
    steps = [0, 100, 200, 300, 400, 500, 600, 700]
    over = _scalar_run(tmp_path / "over", {
        "calibration.nll": [1.2, 0.6, 0.5, 0.5, 0.55, 0.62, 0.7, 0.75],
        "calibration.accuracy": [0.5, 0.75, 0.80, 0.82, 0.83, 0.84, 0.84, 0.85],
        "calibration.ece": [0.05, 0.03, 0.04, 0.04, 0.07, 0.09, 0.12, 0.15]}, steps)
    (f,) = _rules(over, "overconfidence")
    # trailing means of 3: minimum (0.5 + 0.5 + 0.55) / 3 at step 400, last (0.62 + 0.7 + 0.75) / 3
    assert f.step == 700 and f.value == pytest.approx(0.69) and f.threshold == pytest.approx(1.1 * 1.55 / 3)
    assert "step 400" in f.message and "0.05 -> 0.12" in f.message and f.figure_key == "calibration"
    # NLL still falling; rising but only by 5%; rising while accuracy falls; one noisy last value: silent
    cases = {"falling": ([1.2, 0.9, 0.7, 0.6, 0.55, 0.5, 0.48, 0.47], [0.5, 0.6, 0.7, 0.75, 0.8, 0.82, 0.83, 0.83]),
             "small": ([1.2, 0.6, 0.5, 0.52, 0.53, 0.54, 0.54, 0.55], [0.5, 0.75, 0.8, 0.82, 0.83, 0.84, 0.84, 0.84]),
             "acc_drops": ([1.2, 0.6, 0.5, 0.6, 0.8, 1.0, 1.1, 1.2], [0.5, 0.75, 0.8, 0.78, 0.72, 0.6, 0.55, 0.5]),
             "noise": ([1.2, 0.6, 0.5, 0.55, 0.5, 0.52, 0.5, 0.62], [0.5, 0.75, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])}
    for name, (nll, acc) in cases.items():
        run = _scalar_run(tmp_path / name, {"calibration.nll": nll, "calibration.accuracy": acc}, steps)
        assert _rules(run, "overconfidence") == [], name


def test_noise_scale_rule_both_ways(tmp_path):
    steps = [0, 50, 100, 150, 200, 250, 300, 350, 400]

    def run(name, batch, b, n=9):
        # per-measurement tr/|G|^2: wild in the first half (ignored); in the last half b, an outlier 100 b, an
        # unresolved measurement (|G|^2 estimate < 0: infinite), 0.9 b and 1.1 b -> median 1.1 b
        g = [1.0, 1.0, 1.0, 1.0, 0.5, 0.4, -0.01, 0.6, 0.3][:n]
        t = [1e6, 1e6, 1e6, 1e6, b * 0.5, 100 * b * 0.4, 5.0, 0.9 * b * 0.6, 1.1 * b * 0.3][:n]
        return _scalar_run(tmp_path / name, {"gns.grad_sq": g, "gns.trace_cov": t,
                                             "gns.batch_size": [batch] * n}, steps[:n])

    (above,) = _rules(run("above", 1024, 50.0), "batch_size_vs_noise_scale")
    assert above.severity == "warning" and above.value == pytest.approx(55.0) and "18.6x" in above.message
    assert above.figure_key == "gradient_noise_scale" and above.threshold == pytest.approx(102.4)
    assert "steps 200-400" in above.message
    (below,) = _rules(run("below", 16, 400.0), "batch_size_vs_noise_scale")
    assert below.severity == "info" and "27.5x below" in below.message
    assert _rules(run("near", 64, 200.0), "batch_size_vs_noise_scale") == []
    assert _rules(run("few", 1024, 50.0, n=2), "batch_size_vs_noise_scale") == []


def test_overconfidence_when_accuracy_holds_flat_or_within_its_tolerance(tmp_path):
    """Guo et al.'s over-confidence with the accuracy flat: the NLL rises while accuracy holds (the rule's
    "holds or improves": at least its value at the NLL minimum minus ACC_HOLD = 0.01) and the confidence
    rises past it -> a finding; accuracy rising with the confidence (calibrated progress, the NLL falling)
    -> none; accuracy 0.02 lower (beyond the tolerance) -> none."""
    steps = [0, 100, 200, 300, 400, 500, 600, 700]
    nll_up = [1.2, 0.6, 0.5, 0.5, 0.55, 0.62, 0.7, 0.75]  # smoothed minimum at step 400, last 1.34x it
    conf_up = [0.6, 0.75, 0.8, 0.82, 0.86, 0.9, 0.93, 0.95]
    cases = {
        "flat": (nll_up, [0.8] * 8, conf_up, True),
        "within": (nll_up, [0.8, 0.8, 0.8, 0.8, 0.8, 0.796, 0.795, 0.795], conf_up, True),  # 0.0047 lower
        "beyond": (nll_up, [0.8, 0.8, 0.8, 0.8, 0.8, 0.78, 0.78, 0.78], conf_up, False),  # 0.02 lower
        "rising_with_confidence": ([1.2, 0.9, 0.75, 0.65, 0.58, 0.53, 0.5, 0.48],
                                   [0.6, 0.7, 0.75, 0.8, 0.83, 0.85, 0.87, 0.88],
                                   [0.6, 0.7, 0.75, 0.8, 0.83, 0.85, 0.87, 0.88], False),
    }
    for name, (nll, acc, conf, fires) in cases.items():
        run = _scalar_run(tmp_path / name, {"calibration.nll": nll, "calibration.accuracy": acc,
                                            "calibration.confidence": conf}, steps)
        found = _rules(run, "overconfidence")
        assert len(found) == int(fires), (name, found)
        if fires:
            (f,) = found
            assert f.step == 700 and f.value == pytest.approx((0.62 + 0.7 + 0.75) / 3), name
            assert f.threshold == pytest.approx(1.1 * (0.5 + 0.5 + 0.55) / 3), name
