"""Loss landscapes: filter normalization, grids, interpolation, trajectory plane, probe, figures."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynascope.core.guard import preserved_state
from dynascope.diagnostics.landscape import (
    filter_normalized_direction,
    interpolate,
    loss_landscape,
    trajectory_plane,
)

LF = F.cross_entropy


def bn_cnn(seed: int = 0, dtype: torch.dtype = torch.float32, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), act(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), act(),
        nn.LayerNorm(8), nn.Linear(8, 3),
    ).to(dtype)


def data(n: int = 32, seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def trained(model: nn.Module, batch, steps: int = 5, lr: float = 0.1) -> nn.Module:
    """A few SGD steps so BN biases and running statistics are non-trivial."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        LF(model(batch[0]), batch[1]).backward()
        opt.step()
    return model


def eval_loss(model: nn.Module, batch) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = float(LF(model(batch[0]), batch[1]).double())
    model.train(was)
    return out


# ------------------------------------------------------------------------------------------------------------------
# directions
# ------------------------------------------------------------------------------------------------------------------
def test_every_filter_has_the_norm_of_its_weight_filter_and_biases_bn_are_zero():
    model = trained(bn_cnn(), data())
    d = filter_normalized_direction(model, seed=3)
    named = dict(model.named_parameters())
    assert set(d) == set(named)
    for name, p in named.items():
        assert d[name].dtype == p.dtype and d[name].device == p.device and d[name].shape == p.shape
        if name in ("0.weight", "4.weight", "7.weight"):  # conv / linear weights
            dn = d[name].flatten(1).norm(dim=1)
            wn = p.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-5, atol=0)
        else:  # biases, BatchNorm and LayerNorm weight/bias
            assert torch.count_nonzero(d[name]) == 0, name


def test_direction_is_gaussian_reproducible_and_independent_of_bias_option():
    model = bn_cnn()
    a = filter_normalized_direction(model, seed=5)
    b = filter_normalized_direction(model, seed=5)
    c = filter_normalized_direction(model, seed=6)
    inc = filter_normalized_direction(model, seed=5, include_bias_bn=True)
    for k in a:
        assert torch.equal(a[k], b[k])
        if "weight" in k and a[k].ndim >= 2:
            assert torch.equal(a[k], inc[k])  # the weights' stream does not depend on the option
    assert not torch.equal(a["0.weight"], c["0.weight"])
    # Gaussian, not uniform on [0, 1): both signs, roughly symmetric (loss-landscapes uses torch.rand)
    w = a["4.weight"]
    frac_neg = float((w < 0).float().mean())
    assert 0.4 < frac_neg < 0.6
    # rows are rescaled Gaussians: kurtosis of the row-standardized entries near 3
    z = w / w.std(dim=1, keepdim=True)
    kurt = float((z**4).mean())
    assert 2.5 < kurt < 3.5


def test_include_bias_bn_rescales_whole_tensor_and_zero_rows_give_zero_not_nan():
    model = bn_cnn()  # untrained: BatchNorm bias exactly zero
    with torch.no_grad():
        model[0].weight[1].zero_()  # a dead filter
    d = filter_normalized_direction(model, seed=0, include_bias_bn=True)
    for k, v in d.items():
        assert torch.isfinite(v).all(), k
    assert torch.count_nonzero(d["0.weight"][1]) == 0
    assert torch.count_nonzero(d["1.bias"]) == 0  # ||w|| = 0 -> zero direction, no division by zero
    torch.testing.assert_close(d["1.weight"].norm(), model[1].weight.detach().norm(), rtol=1e-5, atol=0)
    torch.testing.assert_close(d["0.bias"].norm(), model[0].bias.detach().norm(), rtol=1e-5, atol=0)


def test_direction_in_float64_model_has_float64_dtype():
    model = bn_cnn(dtype=torch.float64)
    d = filter_normalized_direction(model, seed=0)
    assert all(v.dtype == torch.float64 for v in d.values())
    w = model[0].weight.detach()
    torch.testing.assert_close(d["0.weight"].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2])
def test_center_point_equals_the_models_loss(dims):
    batch = data()
    model = trained(bn_cnn(), batch)
    ref = eval_loss(model, batch)
    res = loss_landscape(model, LF, batch, dims=dims, resolution=5, span=0.5, progress=False)
    mid = 2
    assert res.alphas[mid] == 0.0
    center = res.losses[mid] if dims == 1 else res.losses[mid, mid]
    assert center == ref
    assert res.center_loss == ref
    assert res.losses.shape == ((5,) if dims == 1 else (5, 5))
    assert res.batch_size == 32 and res.bn_policy == "eval" and res.seed == 0
    np.testing.assert_array_equal(res.coords[0], np.linspace(-0.5, 0.5, 5))
    if dims == 2:
        assert res.axis_cosine is not None and abs(res.axis_cosine) < 0.3
        # filter normalization: each direction's norm equals the norm of the directed weights
        assert res.direction_norms == pytest.approx([res.weight_norm] * 2, rel=1e-5)


def test_grid_orientation_losses_i_j_is_at_alpha_i_beta_j():
    batch = data()
    model = trained(bn_cnn(), batch)
    res = loss_landscape(model, LF, batch, dims=2, resolution=3, span=1.0, progress=False)
    d1, d2 = res.directions
    # evaluate (alpha=1, beta=-1) by hand
    check = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in check.named_parameters():
            p.add_(d1[n]).sub_(d2[n])
    assert res.losses[2, 0] == pytest.approx(eval_loss(check, batch), rel=1e-6)
    assert res.losses[0, 2] != pytest.approx(res.losses[2, 0], rel=1e-6)


def test_quadratic_model_of_the_1d_curve_near_the_center():
    """L(a) - L(0) = a g.d + a^2/2 d^T H d + O(a^3), with the HVP from autograd double backward."""
    batch = data(dtype=torch.float64)
    model = trained(bn_cnn(dtype=torch.float64, act=nn.Tanh), batch)
    span = 1e-4
    res = loss_landscape(model, LF, batch, dims=1, resolution=5, span=span, progress=False)
    (d,) = res.directions
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    vec = [d[n] for n in names]
    with preserved_state(model):
        model.eval()
        loss = LF(model(batch[0]), batch[1])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gd = sum((g * v).sum() for g, v in zip(grads, vec))
        hv = torch.autograd.grad(gd, params)
    g_dot_d = float(gd.detach())
    dHd = float(sum((h * v).sum() for h, v in zip(hv, vec)))
    hvp_dHd = _hvp_from_diagnostics(model, batch, names, vec)
    if hvp_dHd is not None:
        assert hvp_dHd == pytest.approx(dHd, rel=1e-8)
    a = res.alphas
    quad = 0.5 * a**2 * dHd
    pred = res.center_loss + a * g_dot_d + quad
    # the curvature term is matched to 0.1% (the cubic remainder is ~a^3, roundoff ~1e-16)
    np.testing.assert_allclose(res.losses, pred, rtol=0, atol=1e-3 * np.abs(quad).max())
    assert np.abs(res.losses - res.center_loss - a * g_dot_d).max() > 0.5 * np.abs(quad).max()
    # the second difference isolates the curvature term
    h = a[1] - a[0]
    second = (res.losses[3] - 2 * res.losses[2] + res.losses[1]) / h**2
    assert second == pytest.approx(dHd, rel=1e-3)


def _hvp_from_diagnostics(model, batch, names, vec):
    """d^T H d through dynascope.diagnostics.hessian, when that module offers an operator."""
    try:
        from dynascope.diagnostics.hessian import HessianOperator
    except ImportError:
        return None
    with preserved_state(model):
        op = HessianOperator(model, LF, batch, dtype=torch.float64, mode="eval")
        x = torch.cat([v.reshape(-1) for v in vec])
        if list(op.names) != names:
            return None
        return float(x @ op.matvec(x))


def test_n_directions_band_and_reuse_of_directions():
    batch = data()
    model = trained(bn_cnn(), batch)
    res = loss_landscape(model, LF, batch, dims=1, resolution=7, n_directions=4, seed=2, progress=False)
    assert res.losses_per_direction.shape == (4, 7)
    np.testing.assert_array_equal(res.band_min, res.losses_per_direction.min(0))
    np.testing.assert_array_equal(res.band_max, res.losses_per_direction.max(0))
    np.testing.assert_array_equal(res.losses, np.median(res.losses_per_direction, 0))
    assert len(res.direction_norms) == 4
    # same seed -> same directions and losses; reuse -> same losses
    again = loss_landscape(model, LF, batch, dims=1, resolution=7, n_directions=4, seed=2, progress=False)
    np.testing.assert_array_equal(again.losses_per_direction, res.losses_per_direction)
    reused = loss_landscape(model, LF, batch, dims=1, resolution=7, n_directions=4, directions=res.directions,
                            progress=False)
    np.testing.assert_array_equal(reused.losses_per_direction, res.losses_per_direction)
    assert reused.seed is None
    # reuse on another checkpoint of the same architecture
    other = trained(copy.deepcopy(model), batch, steps=3)
    o = loss_landscape(other, LF, batch, dims=1, resolution=7, n_directions=4, directions=res.directions,
                       progress=False)
    assert o.center_loss == eval_loss(other, batch)
    with pytest.raises(ValueError, match="shape"):
        bad = [dict(d) for d in res.directions]
        bad[0]["0.weight"] = torch.zeros(3)
        loss_landscape(model, LF, batch, dims=1, resolution=7, n_directions=4, directions=bad, progress=False)
    with pytest.raises(ValueError, match="needs 2 directions"):
        loss_landscape(model, LF, batch, dims=2, resolution=3, directions=res.directions[:1], progress=False)


def test_vmap_evaluation_equals_the_loop():
    batch = data()
    model = trained(bn_cnn(), batch)
    loop = loss_landscape(model, LF, batch, dims=2, resolution=5, method="loop", progress=False)
    vm = loss_landscape(model, LF, batch, dims=2, resolution=5, method="vmap", chunk=3, progress=False)
    assert loop.method == "loop" and vm.method == "vmap"
    np.testing.assert_allclose(vm.losses, loop.losses, rtol=1e-5)
    auto = loss_landscape(model, LF, batch, dims=2, resolution=5, progress=False)
    assert auto.method == "loop"  # chosen by measurement on CPU (benchmarks/bench_landscape.py)
    measured = loss_landscape(model, LF, batch, dims=2, resolution=5, method="measure", chunk=4, progress=False)
    assert measured.method in ("loop", "vmap")
    np.testing.assert_allclose(measured.losses, loop.losses, rtol=1e-5)
    ada = loss_landscape(model, LF, batch, dims=2, resolution=9, method="vmap", adaptive=True, progress=False)
    assert ada.method == "vmap" and ada.losses[4, 4] == pytest.approx(loop.losses[2, 2], rel=1e-6)
    with pytest.raises(ValueError, match="needs bn_policy='eval'"):
        loss_landscape(model, LF, batch, dims=1, method="vmap", bn_policy="recompute", progress=False)


def test_several_pairs_give_the_sample_weighted_mean_and_metric_fn():
    x, y = data(40)
    model = trained(bn_cnn(), (x, y))
    one = loss_landscape(model, LF, (x, y), dims=1, resolution=3, progress=False)
    pairs = [(x[:10], y[:10]), (x[10:], y[10:])]

    def acc(out, t):
        return {"accuracy": (out.argmax(1) == t).float().mean()}

    two = loss_landscape(model, LF, pairs, dims=1, resolution=3, metric_fn=acc, progress=False)
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-6)
    assert two.batch_size == 40
    assert two.extra["accuracy"].shape == (1, 3)
    model.eval()
    with torch.no_grad():
        ref_acc = float((model(x).argmax(1) == y).float().mean())
    assert two.extra["accuracy"][0, 1] == pytest.approx(ref_acc)


def test_recompute_policy_uses_statistics_of_the_batch():
    batch = data()
    model = trained(bn_cnn(), batch)
    res = loss_landscape(model, LF, batch, dims=1, resolution=3, bn_policy="recompute", progress=False)
    ref = copy.deepcopy(model)
    ref[1].reset_running_stats()
    ref[1].momentum = None
    ref.train()
    with torch.no_grad():
        ref(batch[0])
    assert res.center_loss == pytest.approx(eval_loss(ref, batch), rel=1e-6)
    assert res.center_loss != pytest.approx(eval_loss(model, batch), rel=1e-6)
    assert model[1].momentum == 0.1  # momentum put back
    assert res.bn_policy == "recompute"


def test_adaptive_grid_matches_full_grid_at_fewer_evaluations():
    batch = data()
    model = trained(bn_cnn(), batch)
    full = loss_landscape(model, LF, batch, dims=2, resolution=17, span=1.0, progress=False)
    ada = loss_landscape(model, LF, batch, dims=2, resolution=17, span=1.0, adaptive=True, adaptive_tol=0.01,
                         progress=False)
    assert ada.n_evaluations == int(ada.evaluated.sum()) < 17 * 17
    # evaluated points are exact; the rest within a small fraction of the loss range
    np.testing.assert_allclose(ada.losses[ada.evaluated], full.losses[ada.evaluated], rtol=1e-6)
    rng = full.losses.max() - full.losses.min()
    assert np.abs(ada.losses - full.losses).max() < 0.05 * rng
    assert np.isfinite(ada.losses).all()
    # any resolution, also even ones (the centre is then off the grid and evaluated on its own)
    for R in (12,):
        odd = loss_landscape(model, LF, batch, dims=2, resolution=R, adaptive=True, adaptive_tol=0.05,
                             progress=False)
        assert np.isfinite(odd.losses).all() and odd.losses.shape == (R, R)
        assert odd.n_evaluations == int(odd.evaluated.sum()) + (R % 2 == 0)


# ------------------------------------------------------------------------------------------------------------------
# restoring the model
# ------------------------------------------------------------------------------------------------------------------
def _snapshot(model: nn.Module):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
        [b.clone() for b in model.buffers()],
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        torch.get_rng_state(),
        [getattr(m, "momentum", None) for m in model.modules()],
    )


def _assert_same(model: nn.Module, snap) -> None:
    params, grads, bufs, modes, flags, rng, moms = snap
    for p, v in zip(model.parameters(), params):
        assert torch.equal(p.detach(), v)
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is g[0] and torch.equal(p.grad, g[1])
    for b, v in zip(model.buffers(), bufs):
        assert torch.equal(b, v)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert [getattr(m, "momentum", None) for m in model.modules()] == moms


def _messy_model(batch):
    model = trained(bn_cnn(), batch)
    model.train()
    model[6].eval()  # mixed modes
    LF(model(batch[0]), batch[1]).backward()
    model[7].bias.grad = None  # some grads None, others set
    torch.rand(3)  # advance the RNG
    return model


@pytest.mark.parametrize("policy", ["eval", "recompute"])
def test_model_restored_exactly_after_landscape(policy):
    batch = data()
    model = _messy_model(batch)
    snap = _snapshot(model)
    loss_landscape(model, LF, batch, dims=2, resolution=3, bn_policy=policy, progress=False)
    _assert_same(model, snap)


@pytest.mark.parametrize("policy", ["eval", "recompute"])
def test_model_restored_exactly_when_loss_fn_raises_mid_grid(policy):
    batch = data()
    model = _messy_model(batch)
    other = bn_cnn(3).state_dict()  # (bn_cnn seeds the global RNG: build it before the snapshot)
    torch.rand(2)
    snap = _snapshot(model)
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return LF(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(model, flaky, batch, dims=2, resolution=4, bn_policy=policy, progress=False)
    _assert_same(model, snap)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        interpolate(model, model.state_dict(), other, flaky, batch, n_points=5, progress=False)
    _assert_same(model, snap)


def test_model_restored_after_interpolation_and_trajectory():
    batch = data()
    model = _messy_model(batch)
    states = _trajectory(model, batch)
    snap = _snapshot(model)
    interpolate(model, states[0], states[-1], LF, batch, n_points=3, bn_policy="recompute", progress=False)
    _assert_same(model, snap)
    trajectory_plane(model, states, LF, batch, resolution=3, progress=False)
    _assert_same(model, snap)


# ------------------------------------------------------------------------------------------------------------------
# interpolation and trajectory
# ------------------------------------------------------------------------------------------------------------------
def test_interpolation_endpoints_equal_the_checkpoints_losses():
    batch = data()
    a = trained(bn_cnn(0), batch, steps=2)
    b = trained(bn_cnn(1), batch, steps=6)
    model = bn_cnn(2)
    res = interpolate(model, a.state_dict(), b.state_dict(), LF, batch, n_points=9, extend=0.25, progress=False)
    assert res.t[res.index_a] == 0.0 and res.t[res.index_b] == 1.0
    assert res.t[0] == pytest.approx(-0.25) and res.t[-1] == pytest.approx(1.25)
    assert np.all(np.diff(res.t) > 0) and len(res.t) == 13
    assert res.loss_a == eval_loss(a, batch)
    assert res.loss_b == eval_loss(b, batch)
    assert np.isfinite(res.losses).all()  # running variances clamped when extrapolating
    # midpoint: parameters and buffers averaged
    mid = copy.deepcopy(a)
    sb = b.state_dict()
    with torch.no_grad():
        for k, v in mid.state_dict().items():
            if v.is_floating_point():
                v.mul_(0.5).add_(sb[k], alpha=0.5)
    assert res.losses[res.index_a + 4] == pytest.approx(eval_loss(mid, batch), rel=1e-6)


def test_mismatched_state_dicts_give_a_clear_error():
    batch = data()
    model = bn_cnn()
    sa = model.state_dict()
    sb = dict(model.state_dict())
    sb.pop("4.bias")
    sb["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"state_b: missing '4.bias'.*unexpected 'extra.weight'"):
        interpolate(model, sa, sb, LF, batch, progress=False)
    sc = dict(model.state_dict())
    sc["7.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"'7.weight' has shape \(2, 2\), the model has \(3, 8\)"):
        interpolate(model, sa, sc, LF, batch, progress=False)
    with pytest.raises(ValueError, match="states\\[1\\]: missing"):
        trajectory_plane(model, [sa, sb, sa], LF, batch, progress=False)


def _trajectory(model, batch, n=6):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    states = []
    m.train()
    for _ in range(n):
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        opt.zero_grad()
        LF(m(batch[0]), batch[1]).backward()
        opt.step()
    states.append({k: v.clone() for k, v in m.state_dict().items()})
    return states


def test_trajectory_plane_recovers_a_planar_path():
    batch = data()
    model = trained(bn_cnn(), batch)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    names = [n for n, _ in model.named_parameters()]
    u = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    v = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    coeffs = [(3.0, 1.0), (2.0, -1.5), (1.0, 0.5), (0.5, -0.2), (0.0, 0.0)]
    states = []
    for a, b in coeffs:
        s = {k: t.clone() for k, t in final.items()}
        for n in names:
            s[n] = final[n] + 0.01 * (a * u[n] + b * v[n])
        states.append(s)
    res = trajectory_plane(model, states, LF, batch, resolution=5, progress=False)
    assert res.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-9)
    assert res.explained_variance_ratio[0] >= res.explained_variance_ratio[1]
    np.testing.assert_allclose(res.path[-1], [0.0, 0.0], atol=1e-12)
    # projections preserve the distances between checkpoints (the path lies in the plane)
    for i in range(len(states)):
        true = math.sqrt(sum(float((states[i][n].double() - final[n].double()).pow(2).sum()) for n in names))
        assert np.linalg.norm(res.path[i]) == pytest.approx(true, rel=1e-6)
    # the grid covers the path with margin
    assert res.alphas[0] < res.path[:, 0].min() and res.alphas[-1] > res.path[:, 0].max()
    assert res.betas[0] < res.path[:, 1].min() and res.betas[-1] > res.path[:, 1].max()
    assert res.center_loss == eval_loss(model, batch)
    # directions orthonormal
    d1, d2 = res.directions
    dot = sum(float((d1[n].double() * d2[n].double()).sum()) for n in d1)
    n1 = sum(float(d1[n].double().pow(2).sum()) for n in d1)
    assert abs(dot) < 1e-5 and n1 == pytest.approx(1.0, rel=1e-5)


def test_trajectory_plane_on_a_real_training_path_and_errors():
    batch = data()
    model = bn_cnn()
    states = _trajectory(model, batch)
    res = trajectory_plane(model, states, LF, batch, resolution=5, progress=False)
    assert res.losses.shape == (5, 5) and np.isfinite(res.losses).all()
    assert 0 < res.explained_variance_ratio[1] <= res.explained_variance_ratio[0] <= 1
    with pytest.raises(ValueError, match="at least 3"):
        trajectory_plane(model, states[:2], LF, batch, progress=False)
    with pytest.raises(ValueError, match="fewer than two directions"):
        trajectory_plane(model, [states[0]] * 3, LF, batch, progress=False)
    line = []
    for t in (3.0, 2.0, 1.0, 0.0):  # collinear checkpoints: one direction only
        line.append({k: (v + t * (states[0][k] - v) if v.is_floating_point() else v) for k, v in states[-1].items()})
    with pytest.raises(ValueError, match="fewer than two directions"):
        trajectory_plane(model, line, LF, batch, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 1}, "resolution must be an integer >= 2, got 1"),
        ({"span": 0}, "span must be a positive finite number, got 0"),
        ({"span": -1.0}, "span must be a positive"),
        ({"dims": 3}, "dims must be 1 or 2, got 3"),
        ({"bn_policy": "train"}, "bn_policy must be 'eval' or 'recompute'"),
        ({"directions": "random"}, "directions must be 'filter'"),
        ({"dims": 2, "n_directions": 3}, "n_directions > 1 is for dims=1"),
        ({"dims": 1, "adaptive": True}, "adaptive=True refines a 2D grid"),
        ({"method": "fast"}, "method must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    batch = data(8)
    with pytest.raises(ValueError, match=match):
        loss_landscape(bn_cnn(), LF, batch, progress=False, **kwargs)


def test_loss_fn_must_return_a_scalar():
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor .* got \(8,\)"):
        loss_landscape(bn_cnn(), lambda o, t: F.cross_entropy(o, t, reduction="none"), data(8), dims=1,
                       resolution=3, progress=False)


def test_bad_interpolation_arguments():
    batch = data(8)
    m = bn_cnn()
    with pytest.raises(ValueError, match="n_points must be an integer >= 2"):
        interpolate(m, m.state_dict(), m.state_dict(), LF, batch, n_points=1)
    with pytest.raises(ValueError, match="extend must be"):
        interpolate(m, m.state_dict(), m.state_dict(), LF, batch, extend=-0.1)
    with pytest.raises(TypeError, match="state_a must be a state dict"):
        interpolate(m, m, m.state_dict(), LF, batch)


# ------------------------------------------------------------------------------------------------------------------
# probe, store, figures
# ------------------------------------------------------------------------------------------------------------------
def _context(model, store, step, final=False):
    from dynascope.probes.scheduled import ScheduledContext

    return ScheduledContext(
        model=model, optimizer=None, step=step, final=final,
        log_fn=lambda metric, value, layer: store.write_scalars([(step, metric, layer, value)]),
        artifact_fn=lambda name, arrays, meta: store.write_artifact(name, step, arrays, meta),
    )


def _train_with_probe(tmp_path, name="run", **kw):
    from dynascope.probes.landscape import Landscape
    from dynascope.store import RunStore, load_run

    batch = data()
    model = bn_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    probe = Landscape(at="end", batch=batch, loss_fn=LF, resolution=5, keep_checkpoints=4, **kw)
    store = RunStore(tmp_path / name)
    store.write_meta({"name": name})
    steps = 10
    for step in range(steps):
        if probe.due(step):
            with preserved_state(model):
                probe.run(_context(model, store, step))
        model.train()
        opt.zero_grad()
        LF(model(batch[0]), batch[1]).backward()
        opt.step()
    snap = _snapshot(model)
    with preserved_state(model):
        probe.run(_context(model, store, steps, final=True))
        probe.on_close(_context(model, store, steps, final=True))
    _assert_same(model, snap)
    store.close()
    return load_run(tmp_path / name), probe, model, batch


def test_probe_end_to_end_with_a_run_store(tmp_path):
    run, probe, model, batch = _train_with_probe(tmp_path)
    assert len(probe.snapshots) <= 4
    kept = [s for s, _ in probe.snapshots]
    assert kept[0] == 0 and np.all(np.diff(kept) > 0)
    arrays, meta = run.load_artifact("landscape.surface")
    assert arrays["losses"].shape == (5, 5) and arrays["alphas"].shape == (5,) and arrays["betas"].shape == (5,)
    assert meta["bn_policy"] == "eval" and meta["seed"] == 0 and meta["batch_size"] == 32
    assert meta["center_loss"] == pytest.approx(eval_loss(model, batch))
    assert arrays["losses"][2, 2] == pytest.approx(meta["center_loss"])
    assert run.scalars("landscape.center_loss")["value"].iloc[-1] == pytest.approx(meta["center_loss"])
    traj, tmeta = run.load_artifact("landscape.trajectory")
    assert traj["losses"].shape == (5, 5)
    assert traj["path"].shape == (len(traj["path_steps"]), 2) and traj["path_steps"][-1] == 10
    assert len(tmeta["explained_variance_ratio"]) == 2
    interp, imeta = run.load_artifact("landscape.interpolation")
    assert interp["losses"][imeta["index_b"]] == pytest.approx(meta["center_loss"])
    assert imeta["step_a"] == 0 and imeta["step_b"] == 10


def test_probe_every_n_and_1d_band(tmp_path):
    from dynascope.probes.landscape import Landscape

    probe = Landscape(every=5, batch=data(), loss_fn=LF, dims=1, n_directions=3, keep_checkpoints=0)
    assert probe.due(5) and not probe.due(3)
    run, probe, _, _ = _train_with_probe(tmp_path, every=5, dims=1, n_directions=3)
    df = run.artifacts("landscape.surface")
    assert list(df["step"]) == [0, 5, 10]
    arrays, meta = run.load_artifact("landscape.surface")
    assert arrays["losses_per_direction"].shape == (3, 5) and meta["n_directions"] == 3
    with pytest.raises(ValueError, match="keep_checkpoints"):
        Landscape(at="end", batch=data(), loss_fn=LF, keep_checkpoints=-1)


def test_figures_render_for_several_runs_and_return_none_without_data(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dynascope.reports.figures import REGISTRY, all_figures
    from dynascope.store import RunStore, load_run

    all_figures()
    keys = [k for k, s in REGISTRY.items() if s.section == "Loss landscape"]
    assert len(keys) >= 4
    assert all(400 <= REGISTRY[k].order < 500 for k in keys)
    r1, *_ = _train_with_probe(tmp_path, "a")
    r2, *_ = _train_with_probe(tmp_path, "b", bn_policy="recompute")
    r3, *_ = _train_with_probe(tmp_path, "c", dims=1, n_directions=3)
    empty = RunStore(tmp_path / "empty")
    empty.write_scalars([(0, "loss", "", 1.0)])
    empty.close()
    e = load_run(tmp_path / "empty")
    for k in keys:
        assert REGISTRY[k].fn([e]) is None, k
    fig2d = REGISTRY["landscape_contour"].fn([r1, r2, e])
    assert fig2d is not None and len([a for a in fig2d.axes if a.get_label() != "<colorbar>"]) >= 2
    texts = " ".join(t.get_text() for a in fig2d.axes for t in [a.title])
    assert "eval" in texts and "recompute" in texts  # BN policy stated
    fig3d = REGISTRY["landscape_surface3d"].fn([r1, r2])
    assert any(a.name == "3d" for a in fig3d.axes)
    fig3d.canvas.draw()  # it actually renders
    assert REGISTRY["landscape_1d"].fn([r3]) is not None
    assert REGISTRY["landscape_1d"].fn([r1]) is None
    assert REGISTRY["landscape_trajectory"].fn([r1, r2]) is not None
    assert REGISTRY["landscape_interpolation"].fn([r1, r2]) is not None


def test_landscape_through_a_probe_session(tmp_path):
    """dynascope.probe(..., landscape=Landscape(...)): artifacts land in the run, training is unchanged."""
    import dynascope
    from dynascope.probes.landscape import Landscape

    batch = data()

    def train_run(run_dir):
        model = bn_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        ls = Landscape(at="end", batch=batch, loss_fn=LF, resolution=3, keep_checkpoints=3) if run_dir else None
        torch.manual_seed(7)
        ctx = dynascope.probe(model, opt, run_dir, landscape=ls, probes=()) if run_dir else None
        if ctx is not None:
            ctx.__enter__()
        for _ in range(6):
            model.train()
            opt.zero_grad()
            loss = LF(model(batch[0]), batch[1])
            loss.backward()
            opt.step()
            if ctx is not None:
                ctx.step(loss=loss)
        if ctx is not None:
            ctx.__exit__(None, None, None)
        return model, torch.get_rng_state()

    probed, rng_a = train_run(tmp_path / "run")
    plain, rng_b = train_run(None)
    for p, q in zip(probed.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(probed.buffers(), plain.buffers()):
        assert torch.equal(p, q)
    assert torch.equal(rng_a, rng_b)
    run = dynascope.load_run(tmp_path / "run")
    arrays, meta = run.load_artifact("landscape.surface")
    assert arrays["losses"].shape == (3, 3) and meta["center_loss"] == pytest.approx(eval_loss(probed, batch))
    traj, _ = run.load_artifact("landscape.trajectory")
    assert traj["path_steps"][-1] == 5 and len(traj["path_steps"]) >= 3
    assert not run.artifacts("landscape.interpolation").empty
