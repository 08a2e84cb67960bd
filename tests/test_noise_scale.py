"""Gradient noise scale (McCandlish et al. 2018, app. A) on linear regression, where per-example gradients
have a closed form: an exact algebraic check on a fixed batch and a statistical check against the truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.diagnostics.noise_scale import gradient_noise_scale, noise_scale_from_norms

D = 20
SIGMA = 0.5


def _model(delta: torch.Tensor) -> nn.Module:
    """f(x) = w . x with w = w* + delta and w* = 0 (targets y = w* . x + noise)."""
    m = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(delta.reshape(1, D))
    return m


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.squeeze(1), y)  # mean over examples of (w . x - y)^2


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, SIGMA * torch.randn(n, generator=g, dtype=torch.float64)


def _per_example(delta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Closed form: the gradient of (w . x - y)^2 is 2 (w . x - y) x."""
    r = x @ delta - y
    return (2 * r[:, None] * x).numpy()


def _delta() -> torch.Tensor:
    return torch.linspace(-0.3, 0.4, D, dtype=torch.float64)


def test_exact_algebra_on_a_fixed_batch():
    delta = _delta()
    x, y = _data(96, seed=1)
    k = 6
    res = gradient_noise_scale(_model(delta), _loss, (x, y), micro_batches=k)
    g = _per_example(delta, x.double(), y)
    b = 96 // k
    micro = g.reshape(k, b, D).mean(1)
    small = float(np.mean((micro**2).sum(1)))
    big = float((g.mean(0) ** 2).sum())
    assert res.small_sq == pytest.approx(small, rel=1e-12) and res.big_sq == pytest.approx(big, rel=1e-12)
    grad_sq = (96 * big - b * small) / (96 - b)
    trace = (small - big) / (1 / b - 1 / 96)
    assert res.grad_sq == pytest.approx(grad_sq, rel=1e-10)
    assert res.trace_cov == pytest.approx(trace, rel=1e-10)
    assert res.b_simple == pytest.approx(trace / grad_sq, rel=1e-10)
    assert (res.b_small, res.b_big, res.micro_batches) == (b, 96, k)
    # the jackknife by brute force: the estimators on the other k - 1 micro-batches, one left out at a time
    loo = []
    for i in range(k):
        rest = np.delete(micro, i, axis=0)
        s_small, s_big, n_big = float(np.mean((rest**2).sum(1))), float((rest.mean(0) ** 2).sum()), (k - 1) * b
        loo.append(((n_big * s_big - b * s_small) / (n_big - b), (s_small - s_big) / (1 / b - 1 / n_big)))
    loo = np.array(loo)
    se = np.sqrt((k - 1) / k * ((loo - loo.mean(0)) ** 2).sum(0))
    assert res.grad_sq_stderr == pytest.approx(se[0], rel=1e-9)
    assert res.trace_cov_stderr == pytest.approx(se[1], rel=1e-9)
    c = (k - 1) / k * np.sum((loo[:, 0] - loo[:, 0].mean()) * (loo[:, 1] - loo[:, 1].mean()))
    r = trace / grad_sq
    se_r = math.sqrt(se[1] ** 2 - 2 * r * c + r * r * se[0] ** 2) / grad_sq
    assert res.b_simple_stderr == pytest.approx(se_r, rel=1e-9)


def test_micro_batches_of_one_give_the_unbiased_sample_covariance():
    # b = 1: tr(Sigma) estimate = trace of the ddof=1 sample covariance of the per-example gradients,
    # |G|^2 estimate = |mean g|^2 - tr(S)/B (the unbiased estimate of |E g|^2)
    delta = _delta()
    x, y = _data(40, seed=2)
    res = gradient_noise_scale(_model(delta), _loss, (x, y), micro_batches=40)
    g = _per_example(delta, x, y)
    tr_s = float(np.trace(np.cov(g.T, ddof=1)))
    assert res.trace_cov == pytest.approx(tr_s, rel=1e-10)
    assert res.grad_sq == pytest.approx(float((g.mean(0) ** 2).sum()) - tr_s / 40, rel=1e-9)


def _truth(delta: torch.Tensor) -> tuple[float, float]:
    """x ~ N(0, I_D), y = noise N(0, SIGMA^2): G = 2 delta, E|g|^2 = 4 (|delta|^2 (D + 2) + SIGMA^2 D),
    so |G|^2 = 4 |delta|^2 and tr(Sigma) = 4 (|delta|^2 (D + 1) + SIGMA^2 D)."""
    d2 = float(delta.square().sum())
    return 4 * d2, 4 * (d2 * (D + 1) + SIGMA**2 * D)


def test_the_closed_form_truth_and_dynascopes_estimates_on_a_large_sample():
    """First a check of this file's reference, not of dynascope: the closed-form |G|^2 and tr(Sigma) of
    ``_truth`` (what the next test holds dynascope's estimates against) agree with the statistics of a
    large sample of per-example gradients, so an algebra slip in the truth cannot pass or fail that test
    for the wrong reason. Then dynascope's estimator on the same sample agrees with the truth."""
    delta = _delta()
    grad_sq, trace = _truth(delta)
    x, y = _data(400_000, seed=3)
    g = _per_example(delta, x, y)
    assert float((g.mean(0) ** 2).sum()) == pytest.approx(grad_sq, rel=0.02)
    assert float(np.trace(np.cov(g.T))) == pytest.approx(trace, rel=0.01)
    res = gradient_noise_scale(_model(delta), _loss, (x, y), micro_batches=400)  # micro-batches of 1000
    assert res.b_big == 400_000
    assert res.grad_sq == pytest.approx(grad_sq, rel=0.02) and res.trace_cov == pytest.approx(trace, rel=0.03)
    assert res.b_simple == pytest.approx(trace / grad_sq, rel=0.04)
    for est, truth, se in ((res.grad_sq, grad_sq, res.grad_sq_stderr), (res.trace_cov, trace, res.trace_cov_stderr),
                           (res.b_simple, trace / grad_sq, res.b_simple_stderr)):
        assert abs(est - truth) < 5 * se


def test_estimates_agree_with_the_truth_within_their_standard_errors():
    delta = _delta()
    grad_sq, trace = _truth(delta)
    model = _model(delta)
    z_g, z_t, z_r = [], [], []
    for seed in range(40):
        res = gradient_noise_scale(model, _loss, _data(2048, seed=100 + seed), micro_batches=32)
        z_g.append((res.grad_sq - grad_sq) / res.grad_sq_stderr)
        z_t.append((res.trace_cov - trace) / res.trace_cov_stderr)
        z_r.append((res.b_simple - trace / grad_sq) / res.b_simple_stderr)
    for name, z in (("grad_sq", z_g), ("trace_cov", z_t), ("b_simple", z_r)):
        z = np.asarray(z)
        assert np.all(np.abs(z) < 5), name
        # honest standard errors: the spread of the errors matches them (z has standard deviation ~1)
        assert 0.6 < z.std() < 1.6, (name, z.std())
        assert abs(z.mean()) < 0.6, (name, z.mean())  # unbiased: the mean error is small against its spread


def test_from_norms_validates_and_flags_an_unresolved_gradient():
    with pytest.raises(ValueError, match="at least 2"):
        noise_scale_from_norms([1.0], 0.5, 4, [0.5])
    with pytest.raises(ValueError, match="b_small"):
        noise_scale_from_norms([1.0, 2.0], 0.5, 0, [0.5, 0.5])
    with pytest.raises(ValueError, match="dots"):
        noise_scale_from_norms([1.0, 2.0], 0.5, 2, [0.5])
    # |G|^2 estimate (B big - b small)/(B - b) <= 0: noise dominates, B_simple undefined
    res = noise_scale_from_norms([4.0, 4.0, 4.0], 0.1, 4, [0.1, 0.1, 0.1])
    assert res.grad_sq < 0 and math.isnan(res.b_simple) and res.trace_cov > 0
    # two micro-batches: estimates, but no jackknife standard errors
    two = noise_scale_from_norms([4.0, 3.0], 1.0, 4, [1.2, 0.8])
    assert math.isfinite(two.trace_cov) and math.isnan(two.trace_cov_stderr)


def test_bad_arguments():
    m = _model(_delta())
    x, y = _data(10, 0)
    with pytest.raises(ValueError, match="micro_batches"):
        gradient_noise_scale(m, _loss, (x, y), micro_batches=1)
    with pytest.raises(ValueError, match="cannot be split"):
        gradient_noise_scale(m, _loss, (x, y), micro_batches=11)
    with pytest.raises(ValueError, match="one \\(inputs, targets\\) batch"):
        gradient_noise_scale(m, _loss, [(x, y), (x, y)])
    with pytest.raises(ValueError, match="scalar"):
        gradient_noise_scale(m, lambda o, t: (o.squeeze(1) - t) ** 2, (x, y), micro_batches=2)
    with pytest.raises(TypeError, match="loss_fn"):
        dynascope.NoiseScale(every=5, batch=(x, y))
    with pytest.raises(ValueError, match="micro_batches"):
        dynascope.NoiseScale(every=5, batch=(x, y), loss_fn=_loss, micro_batches=0)
    with pytest.raises(ValueError, match="batch_size"):
        dynascope.NoiseScale(every=5, batch=(x, y), loss_fn=_loss, micro_batches=2, batch_size=0)


def test_model_and_gradients_restored_in_train_mode_with_batchnorm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    F.cross_entropy(m(x), y).backward()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grads = [p.grad.clone() for p in m.parameters()]
    rng = torch.get_rng_state()
    res = gradient_noise_scale(m, F.cross_entropy, (x, y), micro_batches=4, mode="train")
    assert math.isfinite(res.trace_cov) and res.b_big == 64
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, gr in zip(m.parameters(), grads):
        assert torch.equal(p.grad, gr)
    assert torch.equal(torch.get_rng_state(), rng)


def test_recorder_rows_equal_the_function(tmp_path):
    delta = _delta()
    model = _model(delta)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe_batch = _data(256, seed=9)
    train = _data(640, seed=10)
    refs = {}
    gns = dynascope.NoiseScale(every=3, batch=probe_batch, loss_fn=_loss, micro_batches=8, batch_size=32)
    with dynascope.probe(model, opt, tmp_path / "run", every=2, scheduled=[gns]) as run:
        for s in range(7):
            xb, yb = train[0][32 * s:32 * (s + 1)], train[1][32 * s:32 * (s + 1)]
            loss = _loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            if s % 3 == 0:
                refs[s] = gradient_noise_scale(model, _loss, probe_batch, micro_batches=8)
    data = dynascope.load_run(tmp_path / "run")
    for metric, attr in (("gns.simple", "b_simple"), ("gns.grad_sq", "grad_sq"), ("gns.trace_cov", "trace_cov"),
                         ("gns.grad_sq_stderr", "grad_sq_stderr"), ("gns.trace_cov_stderr", "trace_cov_stderr"),
                         ("gns.simple_stderr", "b_simple_stderr")):
        df = data.scalars(metric)
        assert sorted(df["step"]) == [0, 3, 6]
        for s, v in zip(df["step"], df["value"]):
            assert v == pytest.approx(getattr(refs[s], attr), rel=1e-12), (metric, s)
    assert set(data.scalars("gns.batch_size")["value"]) == {32.0}


def test_recomputing_the_micro_batch_gradients_gives_the_same_result(monkeypatch):
    """Above KEEP_BYTES the gradients are recomputed under the same random state (dropout in train mode)."""
    import dynascope.diagnostics.noise_scale as ns

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    kept = gradient_noise_scale(m, F.cross_entropy, (x, y), micro_batches=6, mode="train")
    monkeypatch.setattr(ns, "KEEP_BYTES", 0)
    again = gradient_noise_scale(m, F.cross_entropy, (x, y), micro_batches=6, mode="train")
    assert again == kept
    assert math.isfinite(kept.b_simple_stderr) and kept.trace_cov_stderr > 0
