"""Calibration (Guo et al. 2017) against torchmetrics, a hand loop and F.cross_entropy; the scheduled recorder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.diagnostics.calibration import calibration


def _logits(n: int = 3000, c: int = 10, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    # targets correlated with the logits, so that accuracy and confidence are both informative
    y = torch.where(torch.rand(n, generator=g) < 0.6, z.argmax(1), torch.randint(0, c, (n,), generator=g))
    return z, y


def _hand(z: torch.Tensor, y: torch.Tensor, n_bins: int) -> dict:
    """Guo et al.'s definition written out example by example: bins (b/B, (b+1)/B]."""
    p = torch.softmax(z.double(), 1).numpy()
    yy = y.numpy()
    members: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for i in range(len(yy)):
        conf = float(p[i].max())
        correct = float(int(p[i].argmax()) == int(yy[i]))
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            if lo < conf <= hi:
                members[b].append((conf, correct))
                break
    ece, mce = 0.0, 0.0
    for m in members:
        if not m:
            continue
        acc = sum(c for _, c in m) / len(m)
        conf = sum(c for c, _ in m) / len(m)
        ece += len(m) / len(yy) * abs(acc - conf)
        mce = max(mce, abs(acc - conf))
    zz = z.double().numpy()
    lse = [zz[i].max() + math.log(sum(math.exp(v - zz[i].max()) for v in zz[i])) for i in range(len(yy))]
    nll = float(np.mean([lse[i] - zz[i, yy[i]] for i in range(len(yy))]))
    return {"ece": ece, "mce": mce, "nll": nll, "count": [len(m) for m in members],
            "accuracy": float(np.mean(p.argmax(1) == yy)), "confidence": float(p.max(1).mean())}


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_ece_mce_match_torchmetrics(scale):
    from torchmetrics.classification import MulticlassCalibrationError

    z, y = _logits(scale=scale)
    # torchmetrics puts a float32 confidence of exactly 1.0 into an extra bin (Guo: the last bin): avoid those
    assert torch.softmax(z.float(), 1).max() < 1.0
    res = calibration(z, y, n_bins=15)
    ece_tm = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(z.float(), y)
    mce_tm = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="max")(z.float(), y)
    # torchmetrics works in float32: agreement to its precision
    assert res.ece == pytest.approx(float(ece_tm), abs=2e-6)
    assert res.mce == pytest.approx(float(mce_tm), abs=2e-6)


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_matches_a_hand_loop_including_saturated_confidences(n_bins):
    z, y = _logits(n=600, scale=4.0, seed=3)
    z[:40, 0] = 1000.0  # softmax exactly 1.0: Guo's right-closed last bin, not an extra one
    assert (torch.softmax(z, 1).max(1).values[:40] == 1.0).all()
    res = calibration(z, y, n_bins=n_bins)
    ref = _hand(z, y, n_bins)
    for k in ("ece", "mce", "nll", "accuracy", "confidence"):
        assert getattr(res, k) == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k
    assert res.bins.count.tolist() == ref["count"]
    assert res.bins.count.sum() == len(y) and res.n == len(y)
    np.testing.assert_allclose(res.bins.edges, np.linspace(0, 1, n_bins + 1))


def test_confidences_on_interior_bin_edges_belong_to_the_lower_bin():
    """Bins are right-closed, I_b = (b/B, (b+1)/B] (Guo et al.; docs/metrics.md): a confidence of exactly
    k/B belongs to bin k-1. With B = 4, confidences exactly 0.25, 0.5 and 0.75 (softmax of tied logits,
    exact in float64) against a hand-made reliability table."""
    off = -1000.0  # exp underflows to 0: the class takes no probability
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0],                      # 0.25, predicts 0
                      [0.0, 0.0, off, off],                      # 0.5, predicts 0
                      [0.0, 0.0, off, off],                      # 0.5, predicts 0
                      [math.log(3.0), 0.0, off, off],            # 0.75, predicts 0
                      [math.log(1.5), 0.0, off, off],            # 0.6, predicts 0
                      [math.log(4.0), math.log(3.0), math.log(3.0), off]],  # 0.4, predicts 0
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0, 1, 0])  # correct, correct, wrong, correct, wrong, correct
    conf = torch.softmax(z, 1).max(1).values
    assert conf[:4].tolist() == [0.25, 0.5, 0.5, 0.75]  # exactly on the edges
    res = calibration(z, y, n_bins=4)
    # by hand: (0, .25] {0.25 ok}; (.25, .5] {0.5 ok, 0.5 wrong, 0.4 ok}; (.5, .75] {0.75 ok, 0.6 wrong}; (.75, 1] {}
    assert res.bins.count.tolist() == [1, 3, 2, 0]
    np.testing.assert_allclose(res.bins.accuracy, [1.0, 2 / 3, 0.5, np.nan], rtol=1e-12)
    np.testing.assert_allclose(res.bins.confidence, [0.25, 1.4 / 3, 0.675, np.nan], rtol=1e-12)
    gaps = [0.75, 2 / 3 - 1.4 / 3, 0.675 - 0.5]
    assert res.ece == pytest.approx((1 * gaps[0] + 3 * gaps[1] + 2 * gaps[2]) / 6, rel=1e-12)  # 1.7 / 6
    assert res.mce == pytest.approx(0.75, rel=1e-12)
    # left-closed bins [b/B, (b+1)/B) would give counts [0, 2, 3, 1] and ECE 2.2 / 6
    assert res.ece == pytest.approx(1.7 / 6, rel=1e-12)


def test_nll_accuracy_confidence_against_torch():
    z, y = _logits(seed=5)
    res = calibration(z.float(), y)
    assert res.nll == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    assert res.accuracy == pytest.approx(float((z.argmax(1) == y).double().mean()))
    assert res.confidence == pytest.approx(float(torch.softmax(z, 1).max(1).values.mean()), rel=1e-6)
    # bins: count-weighted bin confidences give back the mean confidence
    ok = res.bins.count > 0
    assert np.sum(res.bins.confidence[ok] * res.bins.count[ok]) / res.n == pytest.approx(res.confidence, rel=1e-12)
    assert np.isnan(res.bins.accuracy[~ok]).all()


def test_perfectly_calibrated_bin_has_zero_error_and_overconfidence_does_not():
    # two classes, confidence 0.75 on every example; 3 of 4 correct -> calibrated; 4 of 4 wrong -> gap 0.75
    z = torch.tensor([[math.log(3.0), 0.0]] * 4, dtype=torch.float64)
    res = calibration(z, torch.tensor([0, 0, 0, 1]))
    assert res.ece == pytest.approx(0.0, abs=1e-12) and res.mce == pytest.approx(0.0, abs=1e-12)
    bad = calibration(z, torch.tensor([1, 1, 1, 1]))
    assert bad.ece == pytest.approx(0.75) and bad.mce == pytest.approx(0.75)
    assert bad.nll == pytest.approx(math.log(4.0))


def test_non_finite_logits_give_nan_and_bad_input_is_refused():
    z, y = _logits(n=20)
    z[3, 2] = float("nan")
    res = calibration(z, y)
    assert all(math.isnan(v) for _, v in res.rows()) and res.bins.count.sum() == 0
    with pytest.raises(ValueError, match="examples, classes"):
        calibration(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        calibration(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        calibration(torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
        calibration(torch.zeros(5, 3), torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="n_bins"):
        calibration(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), n_bins=0)


# -- the scheduled recorder ------------------------------------------------------------------------

def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))


def test_recorder_matches_the_function_in_eval_mode_and_saves_the_diagram(tmp_path):
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    y = x[:, :4].argmax(1)
    held = (x[:200], y[:200])
    refs = {}
    with dynascope.probe(model, opt, tmp_path / "run", every=5,
                         scheduled=[dynascope.Calibration(every=4, batch=held)]) as run:
        for s in range(10):
            idx = torch.randint(0, 300, (32,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            if s % 4 == 0:  # what the recorder saw: the model after this step, in eval mode
                assert model.training
                with torch.no_grad():
                    model.eval()
                    refs[s] = calibration(model(held[0]), held[1])
                    model.train()
    data = dynascope.load_run(tmp_path / "run")
    for metric in ("ece", "mce", "nll", "accuracy", "confidence"):
        df = data.scalars(f"calibration.{metric}")
        assert sorted(df["step"]) == [0, 4, 8] and set(df["layer"]) == {""}
        for s, v in zip(df["step"], df["value"]):
            assert v == pytest.approx(getattr(refs[s], metric), rel=1e-12), (metric, s)
    arts = data.artifacts("calibration.reliability")
    assert list(arts["step"]) == [0, 4, 8]
    arrays, meta = data.load_artifact("calibration.reliability", 8)
    assert arrays["count"].tolist() == refs[8].bins.count.tolist() and meta["n"] == 200
    np.testing.assert_allclose(arrays["accuracy"], refs[8].bins.accuracy, equal_nan=True)


def test_recorder_arguments():
    with pytest.raises(ValueError, match="batch"):
        dynascope.Calibration(every=5)
    with pytest.raises(TypeError, match="targets"):
        dynascope.Calibration(every=5, batch=(torch.zeros(3, 2), None))
    with pytest.raises(ValueError, match="mode"):
        dynascope.Calibration(every=5, batch=(torch.zeros(3, 2), torch.zeros(3)), mode="test")
    with pytest.raises(ValueError, match="n_bins"):
        dynascope.Calibration(every=5, batch=(torch.zeros(3, 2), torch.zeros(3)), n_bins=0)
