"""Cockpit's normalised step length alpha (dynascope.diagnostics.alpha, dynascope.Alpha): the quadratic fit on
noise-free parabolas, the closed form alpha = lr * h - 1 of SGD on a quadratic, and a live run against an
independent per-example loop with Cockpit's formulas written out here; training bit-identical."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.diagnostics.alpha import alpha_from_fit, fit_quadratic


@pytest.mark.parametrize("t,want", [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (3.0, 2.0)])
def test_fit_of_a_noise_free_parabola(t, want):
    """q(x) = 1 - x + x^2 / 2 (minimum at x = 1): a step of length t has alpha = t / 1 - 1."""
    q, dq = (lambda x: 1 - x + x * x / 2), (lambda x: x - 1)
    mu = fit_quadratic(t, (q(0), q(t)), (dq(0), dq(t)), (0.0, 0.0), (0.0, 0.0))
    np.testing.assert_allclose(mu, [1.0, -1.0, 0.5], atol=1e-8)
    assert alpha_from_fit(mu, t) == pytest.approx(want, abs=1e-8)


def test_zero_variances_take_cockpits_floor():
    """A zero variance is 1e-10 (Cockpit): exact loss values against noisy slopes, solved here as weighted least
    squares (rows scaled by 1 / sqrt(variance))."""
    t, fs, dfs, var_f, var_df = 1.0, (1.0, 0.5), (-1.2, 0.3), (0.0, 0.0), (1e-2, 4e-2)
    phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=float)
    w = 1 / np.sqrt([1e-10, 1e-10, *var_df])
    want = np.linalg.lstsq(phi * w[:, None], np.array([*fs, *dfs]) * w, rcond=None)[0]
    np.testing.assert_allclose(fit_quadratic(t, fs, dfs, var_f, var_df), want, rtol=1e-6)


def test_concave_and_failed_fits():
    q, dq = (lambda x: 1 - x - x * x), (lambda x: -1 - 2 * x)
    assert alpha_from_fit(fit_quadratic(1.0, (q(0), q(1)), (dq(0), dq(1)), (1e-3, 1e-3), (1e-3, 1e-3)), 1.0) == -1
    assert alpha_from_fit(None, 0.0) == -1 and math.isnan(alpha_from_fit(None, 1.0))


def _train(run_dir, lr, steps, scheduled=None, model_fn=None, batches=None, give_batch=lambda s: True,
           opt_fn=None):
    torch.manual_seed(0)
    model = model_fn()
    opt = opt_fn(model) if opt_fn else torch.optim.SGD(model.parameters(), lr=lr)
    weights = []
    ctx = dynascope.probe(model, opt, run_dir, scheduled=scheduled, sentinel=False) if scheduled else None
    run = ctx.__enter__() if ctx else None
    try:
        for s in range(steps):
            x, y = batches[s]
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            loss = F.mse_loss(model(x), y) if y.is_floating_point() else F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss, batch=(x, y)) if give_batch(s) else run.step(loss)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, weights


@pytest.mark.parametrize("lr_h", [0.5, 1.0, 1.5])
def test_sgd_on_a_quadratic_has_alpha_lr_times_curvature_minus_one(tmp_path, lr_h):
    """mean (w x - y)^2 over identical examples: curvature h = 2 x^2 along the line, the loss exactly quadratic
    and noise-free; SGD moves w - w* by -lr h (w - w*), so t / x* = lr h and alpha = lr h - 1."""
    x = torch.full((6, 1), 1.5)
    h = 2 * 1.5 ** 2
    batches = [(x, torch.full((6, 1), 3.0))] * 4
    _train(tmp_path / "r", lr_h / h, 4, [dynascope.Alpha(every=2, loss_fn=F.mse_loss)],
           model_fn=lambda: nn.Linear(1, 1, bias=False), batches=batches)
    data = dynascope.load_run(tmp_path / "r")
    got = data.scalars("step.alpha")
    # lr h = 1 lands on the minimum at once: step 2 does not move (t = 0), so it has no alpha
    assert list(got["step"]) == ([0] if lr_h == 1.0 else [0, 2])
    np.testing.assert_allclose(got["value"].to_numpy(), lr_h - 1.0, atol=1e-6)
    assert list(data.scalars("step.alpha_t")["step"]) == [0, 2]


def _cockpit_alpha(model, w_start, w_end, batch_start, batch_end) -> float:
    """Cockpit's Alpha written out: per-example losses and gradients by an autograd loop over the examples at
    each point, projections on d = w_end - w_start, np.var(ddof=1), the ML fit and _get_alpha."""
    names = list(w_start)
    d = [w_end[n] - w_start[n] for n in names]
    t = math.sqrt(sum(float((v.double() ** 2).sum()) for v in d))
    obs = []
    for w, (x, y) in ((w_start, batch_start), (w_end, batch_end)):
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(w[n])
        losses, proj = [], []
        for i in range(len(x)):
            loss = F.cross_entropy(m(x[i:i + 1]), y[i:i + 1])
            gs = torch.autograd.grad(loss, list(m.parameters()))
            losses.append(float(loss))
            proj.append(sum(float((g.double() * v.double()).sum()) for g, v in zip(gs, d)) / t)
        obs.append((np.mean(losses), np.var(losses, ddof=1), np.mean(proj), np.var(proj, ddof=1)))
    (f0, vf0, df0, vdf0), (f1, vf1, df1, vdf1) = obs
    phi = np.array([[1, 0, 0], [1, t, t ** 2], [0, 1, 0], [0, 1, 2 * t]]).T
    lam_inv = np.linalg.inv(np.diag([vf0, vf1, vdf0, vdf1]))
    mu = np.linalg.inv(phi @ lam_inv @ phi.T) @ phi @ lam_inv @ np.array([f0, f1, df0, df1])
    return -1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1


def test_live_alpha_equals_cockpits_formulas_and_training_is_bit_identical(tmp_path):
    g = torch.Generator().manual_seed(1)
    sizes = [12, 7, 12, 7, 12, 7]  # start and end batches of different sizes: the ddof of the variances counts
    batches = [(torch.randn(b, 5, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in sizes]

    def mlp():
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)

    base, weights = _train(None, None, 6, model_fn=mlp, batches=batches, opt_fn=adamw)
    with pytest.warns(RuntimeWarning, match="batch='step'"):  # step 5 (an end point) gives no batch
        model, _ = _train(tmp_path / "r", None, 6, [dynascope.Alpha(every=2, loss_fn=F.cross_entropy, chunk=5)],
                          model_fn=mlp, batches=batches, opt_fn=adamw, give_batch=lambda s: s != 5)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters()))
    data = dynascope.load_run(tmp_path / "r")
    got = data.scalars("step.alpha")
    assert list(got["step"]) == [0, 2]  # step 4's end point (step 5) had no batch
    ref = mlp()
    for s, value in zip(got["step"], got["value"]):
        want = _cockpit_alpha(ref, weights[s], weights[s + 1], batches[s], batches[s + 1])
        assert value == pytest.approx(want, rel=1e-6, abs=1e-9), s
    ts = data.scalars("step.alpha_t")
    for s, value in zip(ts["step"], ts["value"]):
        d = [weights[s + 1][n] - weights[s][n] for n in weights[s]]
        assert value == pytest.approx(math.sqrt(sum(float((v.double() ** 2).sum()) for v in d)), rel=1e-6)
    failed = data.scalars("diagnostic.failed")
    assert list(failed["step"]) == [5] and list(failed["layer"]) == ["Alpha"]


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(TypeError, match="loss_fn= is required"):
        dynascope.Alpha(every=1)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        dynascope.Alpha(every=1, loss_fn=F.mse_loss, chunk=0)


def test_the_report_draws_the_alpha_figure(tmp_path):
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(8)]
    _train(tmp_path / "r", 0.5, 8, [dynascope.Alpha(every=1, loss_fn=F.cross_entropy)],
           model_fn=lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), batches=batches)
    from dynascope.reports.figures.alpha import alpha_figure

    data = dynascope.load_run(tmp_path / "r")
    got = data.scalars("step.alpha")
    assert len(got) == 7
    fig = alpha_figure([data])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), got["value"].to_numpy())
    dynascope.report(tmp_path / "r", tmp_path / "report.html", figures=["step_alpha"], progress=False)
    assert "Normalised step length alpha" in (tmp_path / "report.html").read_text()


def test_a_direction_over_some_parameters_and_unknown_names(tmp_path):
    """params= restricts the direction (and t) to those parameters; a name the model lacks is a one-line error
    recorded as a failed diagnostic, training goes on."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]

    def mlp():
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    _, weights = _train(tmp_path / "r", 0.3, 3, [dynascope.Alpha(at=[0], loss_fn=F.cross_entropy,
                                                                   params=["2.weight", "2.bias"])],
                        model_fn=mlp, batches=batches)
    t = dynascope.load_run(tmp_path / "r").scalars("step.alpha_t")["value"].iloc[0]
    d = [weights[1][n] - weights[0][n] for n in ("2.weight", "2.bias")]
    assert t == pytest.approx(math.sqrt(sum(float((v.double() ** 2).sum()) for v in d)), rel=1e-6)
    with pytest.warns(RuntimeWarning, match="params names no trainable parameter"):
        _train(tmp_path / "bad", 0.3, 2, [dynascope.Alpha(at=[0], loss_fn=F.cross_entropy, params=["nope"])],
               model_fn=mlp, batches=batches)
    failed = dynascope.load_run(tmp_path / "bad").scalars("diagnostic.failed")
    assert list(failed["step"]) == [0, 1] and set(failed["layer"]) == {"Alpha"}  # the start and its end point
