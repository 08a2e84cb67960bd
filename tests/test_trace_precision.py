"""The Hessian trace to a stated precision: the exact trace against a dense float64 Hessian, Hutch++
against its own draws recomputed on the dense matrix, its stopping rule and the coverage of its standard
error over 100 seeded trials; Curvature's trace_method and the step's own batch (batch="step")."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import dynascope
from dynascope.diagnostics.hessian import hessian_trace, operator_trace
from dynascope.diagnostics.hvp import HessianOperator
from dynascope.probes.curvature import Curvature

DT = torch.float64
CE = nn.CrossEntropyLoss()


class Attention(nn.Module):
    def __init__(self, d: int = 6, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((x + a).mean(1))


def mlp(width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).to(DT)
    return m, torch.randn(24, 5, dtype=DT), torch.randint(0, 3, (24,))


def cnn():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)
    return m, torch.randn(16, 1, 6, 6, dtype=DT), torch.randint(0, 3, (16,))


def attention():
    torch.manual_seed(2)
    return Attention().to(DT), torch.randn(8, 4, 6, dtype=DT), torch.randint(0, 3, (8,))


MODELS = {"mlp": mlp, "cnn": cnn, "attention": attention}


def dense_hessian(model, x, y) -> np.ndarray:
    """The dense float64 Hessian of the mean cross-entropy w.r.t. all parameters (torch.autograd.functional)."""
    model = copy.deepcopy(model).to(DT).eval()
    named = [(n, p) for n, p in model.named_parameters()]
    sizes, shapes = [p.numel() for _, p in named], [p.shape for _, p in named]

    def f(flat):
        parts = {n: t.view(s) for (n, _), t, s in zip(named, flat.split(sizes), shapes)}
        return CE(functional_call(model, parts, (x.to(DT),)), y)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat).numpy()


# --------------------------------------------------------------------------- the exact trace
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_trace_equals_the_dense_float64_trace(name):
    model, x, y = MODELS[name]()
    want = float(np.trace(dense_hessian(model, x, y)))
    got = hessian_trace(model, CE, (x, y), method="exact")
    n = sum(p.numel() for p in model.parameters())
    assert got.method == "exact" and got.stderr == 0 and got.n_hvp == n
    assert abs(got.trace - want) <= 1e-6 * abs(want), (got.trace, want)
    # "auto" on a model this small is the exact trace
    auto = hessian_trace(model, CE, (x, y))
    assert auto.method == "exact" and auto.trace == got.trace
    # a float32 model with the operator in float64: the dense trace of the float32 weights to 1e-6 as well
    m32 = copy.deepcopy(model).float()
    got32 = hessian_trace(m32, CE, (x.float(), y), method="exact", dtype=DT)
    want32 = float(np.trace(dense_hessian(m32, x.float(), y)))
    assert abs(got32.trace - want32) <= 1e-6 * abs(want32)


def test_batched_products_equal_the_loop_and_the_fallback_counts_products():
    model, x, y = cnn()
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, CE, (x, y))
    X = torch.randn(op.n, 7, dtype=DT)
    batched = op.matmat(X, chunk=4)  # under 8 columns: batched without timing it against the loop
    assert op.n_hvp == 7 and op._batched is None
    np.testing.assert_allclose(batched.numpy(), H @ X.numpy(), rtol=1e-9, atol=1e-12)
    loop = torch.stack([op.matvec(X[:, j]) for j in range(7)], 1)
    np.testing.assert_allclose(batched.numpy(), loop.numpy(), rtol=1e-10, atol=1e-13)

    def refuse(part):
        raise RuntimeError("no batching rule")

    op._matmat_batched = refuse  # a model vmap cannot batch: one product per column, same values
    again = op.matmat(X, chunk=4)
    assert op._batched is False and op.n_hvp == 7 + 7 + 7
    np.testing.assert_allclose(again.numpy(), loop.numpy(), rtol=1e-12, atol=1e-14)
    # from 8 columns the first call times 2 columns each way and keeps the faster: same values either way
    fresh = HessianOperator(model, CE, (x, y))
    Y = torch.randn(fresh.n, 12, dtype=DT)
    got = fresh.matmat(Y, chunk=4)
    assert fresh._batched in (True, False) and fresh.n_hvp == 12
    np.testing.assert_allclose(got.numpy(), H @ Y.numpy(), rtol=1e-9, atol=1e-12)
    fresh._matmat_batched = refuse
    probe = HessianOperator(model, CE, (x, y))
    probe._matmat_batched = refuse  # refused while being timed: the loop for those columns and after
    np.testing.assert_allclose(probe.matmat(Y).numpy(), H @ Y.numpy(), rtol=1e-9, atol=1e-12)
    assert probe._batched is False and probe.n_hvp == 12


# --------------------------------------------------------------------------- Hutch++
def _hutchpp_by_hand(H: np.ndarray, seed: int, rank: int, m: int):
    """Hutch++ on a dense matrix with the same Rademacher draws (the generator's order: S, then G)."""
    n = H.shape[0]
    gen = torch.Generator().manual_seed(seed)
    S = (torch.randint(0, 2, (n, rank), generator=gen).to(DT) * 2 - 1).numpy()
    Q = np.linalg.qr(H @ S)[0]
    G = (torch.randint(0, 2, (n, m), generator=gen).to(DT) * 2 - 1).numpy()
    P = G - Q @ (Q.T @ G)
    return float(np.trace(Q.T @ H @ Q)), np.einsum("ij,ij->j", P, H @ P), Q


def test_hutchpp_is_its_formula_on_the_dense_hessian():
    model, x, y = mlp(width=20)
    H = dense_hessian(model, x, y)
    with pytest.warns(RuntimeWarning, match="not reached"):  # never met: exactly 12 residual vectors
        got = hessian_trace(model, CE, (x, y), method="hutch++", rank=10, n_samples=12, min_samples=12,
                            target_rel_stderr=1e-9)
    deflated, samples, Q = _hutchpp_by_hand(H, 0, 10, 12)
    assert got.method == "hutch++" and got.rank == 10 and got.n_samples == 12 and got.n_hvp == 2 * 10 + 12
    assert got.deflated == pytest.approx(deflated, rel=1e-9)
    np.testing.assert_allclose(got.samples, samples, rtol=1e-8, atol=1e-10)
    assert got.trace == pytest.approx(deflated + samples.mean(), rel=1e-10)
    assert got.stderr == pytest.approx(samples.std(ddof=1) / math.sqrt(12), rel=1e-9)
    assert not got.target_reached
    # the standard error is that of Hutchinson on the residual R = (I - QQ^T) H (I - QQ^T):
    # Var(g^T R g) = 2 sum_{i != j} R_ij^2 for Rademacher g
    P = np.eye(H.shape[0]) - Q @ Q.T
    R = P @ H @ P
    sd = math.sqrt(2 * ((R - np.diag(np.diag(R))) ** 2).sum())
    assert got.stderr == pytest.approx(sd / math.sqrt(12), rel=0.5)
    # deflation pays: the residual's spread is well below plain Hutchinson's on this Hessian
    assert sd < 0.8 * math.sqrt(2 * ((H - np.diag(np.diag(H))) ** 2).sum())


def _synthetic(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A symmetric matrix shaped like a network's Hessian: a few large outliers and a bulk of both signs."""
    rng = np.random.default_rng(seed)
    ev = np.concatenate([[50.0, 30.0, 20.0, 10.0, 5.0], rng.uniform(-0.5, 1.0, n - 5)])
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return torch.tensor((U * ev) @ U.T), float(ev.sum())


def test_hutchpp_reaches_its_target_and_covers_the_exact_trace_in_100_seeded_trials():
    A, exact = _synthetic()
    covered, sizes = 0, []
    for seed in range(100):
        r = operator_trace(lambda v: A @ v, A.shape[0], method="hutch++", seed=seed, target_rel_stderr=0.02,
                           n_samples=1000, matmat=lambda X: A @ X)
        assert r.target_reached and r.rel_stderr <= 0.02, (seed, r.rel_stderr)
        covered += abs(r.trace - exact) <= 3 * r.stderr
        sizes.append(r.n_samples)
    assert covered >= 95, covered
    # plain Hutchinson to the same relative standard error needs many more products on this operator
    hutch = operator_trace(lambda v: A @ v, A.shape[0], method="hutchinson", seed=0, target_rel_stderr=0.02,
                           n_samples=5000)
    assert hutch.n_hvp > 3 * (40 + max(sizes))


def test_hutchpp_on_a_real_network_reaches_the_target_and_covers_the_exact_trace():
    model, x, y = mlp(width=30)  # 273 parameters
    exact = float(np.trace(dense_hessian(model, x, y)))
    covered = 0
    for seed in range(20):
        r = hessian_trace(model, CE, (x, y), method="hutch++", seed=seed, n_samples=2000)
        assert r.target_reached and r.rel_stderr <= 0.02
        covered += abs(r.trace - exact) <= 3 * r.stderr
    assert covered >= 18, covered
    # auto with a smaller exact limit picks Hutch++ and says so
    auto = hessian_trace(model, CE, (x, y), exact_max_params=100, n_samples=2000)
    assert auto.method == "hutch++"


def test_hutchinson_with_a_relative_target_stops_on_it_and_a_missed_target_warns():
    A, exact = _synthetic(n=120)
    r = operator_trace(lambda v: A @ v, 120, method="hutchinson", target_rel_stderr=0.05, n_samples=3000)
    assert r.target_reached and r.stderr <= 0.05 * abs(r.trace) and r.n_samples < 3000
    with pytest.warns(RuntimeWarning, match="not reached"):
        miss = operator_trace(lambda v: A @ v, 120, method="hutch++", rank=2, target_rel_stderr=1e-6, n_samples=20)
    assert not miss.target_reached and miss.n_samples == 20
    with pytest.raises(ValueError, match="method"):
        operator_trace(lambda v: A @ v, 120, method="hutch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one of"):
        hessian_trace(*mlp()[:1], CE, mlp()[1:], method="dense")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Curvature: the estimator recorded
def _rows(run, metric):
    return run.scalars(metric).sort_values("step")


def test_curvature_records_the_estimator_and_hutchinson_keeps_its_old_results(tmp_path):
    model, x, y = mlp(width=30)
    model = model.float()
    x = x.float()
    methods = {"auto": {}, "exact": {}, "hutch++": {"trace_exact_max": 10}, "hutchinson": {}}
    results = {}
    for method, extra in methods.items():
        cur = Curvature(every=1, batch=(x, y), loss_fn=CE, eigenvalues=False, trace=True, trace_method=method,
                        preconditioned=False, seed=4, **extra)
        with dynascope.probe(model, None, tmp_path / method, probes=(), sentinel=False, curvature=cur,
                             on_diagnostic_error="raise") as run:
            run.step(loss=CE(model(x), y))  # no optimizer: the weights stay these
        r = dynascope.load_run(tmp_path / method)
        est = r.scalars("hessian.trace_estimator")
        results[method] = (float(r.scalars("hessian.trace")["value"].iloc[0]), list(est["layer"]),
                           float(est["value"].iloc[0]), float(r.scalars("hessian.trace_stderr")["value"].iloc[0]))
    assert results["auto"][1] == ["exact"] and results["exact"][1] == ["exact"]
    assert results["hutch++"][1] == ["hutch++"] and results["hutchinson"][1] == ["hutchinson"]
    assert results["auto"][0] == results["exact"][0] and results["exact"][3] == 0
    want = hessian_trace(model, CE, (x, y), method="exact", dtype=DT).trace
    assert results["exact"][0] == pytest.approx(want, rel=1e-5)  # float32 products
    # Hutchinson asked for explicitly: dynascope 0.2's Curvature(trace=True): 50 draws of seed + step
    old = hessian_trace(model, CE, (x, y), n_samples=50, seed=4, method="hutchinson")
    assert results["hutchinson"][0] == old.trace and results["hutchinson"][2] == 50
    pp = results["hutch++"]
    assert pp[3] <= 0.02 * abs(pp[0]) and abs(pp[0] - want) <= 3 * pp[3]


# --------------------------------------------------------------------------- Curvature on the step's own batch
def _train(tmp_path, name, curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 5, generator=data), torch.randint(0, 3, (12,), generator=data)) for _ in range(6)]
    ctx = dynascope.probe(model, opt, tmp_path / name, scheduled=curvature) if curvature is not None else None
    run = ctx.__enter__() if ctx is not None else None
    try:
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss, batch=(x, y)) if step != 5 else run.step(loss)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return model, opt, batches, torch.get_rng_state()


def test_curvature_on_the_steps_batch_equals_the_same_batch_fixed_and_training_is_bit_identical(tmp_path):
    base, base_opt, batches, base_rng = _train(tmp_path, "none", None)
    opts = dict(loss_fn=CE, k=2, tol=1e-6, trace=True, preconditioned=False, seed=2)
    with pytest.warns(RuntimeWarning, match="batch='step'"):  # step 5 gives no batch: recorded, training goes on
        model, opt, _, rng = _train(tmp_path, "step", [Curvature(every=2, batch="step", at=[5], **opts)])
    fixed = [Curvature(every=None, at=[s], batch=batches[s], **opts) for s in (0, 2, 4)]
    _train(tmp_path, "fixed", fixed)
    for p, q in zip(base.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(base_rng, rng)
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(base_opt.state.values(), opt.state.values()))
    a, b = dynascope.load_run(tmp_path / "step"), dynascope.load_run(tmp_path / "fixed")
    for metric in ("hessian.eig", "hessian.trace", "hessian.trace_estimator"):
        ra, rb = _rows(a, metric), _rows(b, metric)
        assert list(ra["step"].unique()) == [0, 2, 4]
        np.testing.assert_array_equal(ra["value"].to_numpy(), rb["value"].to_numpy())
    # the batches differ from step to step: the rows do too
    assert len(set(_rows(a, "hessian.trace")["value"])) == 3
    failed = a.scalars("diagnostic.failed")
    assert list(failed["step"]) == [5] and list(failed["layer"]) == ["Curvature"]


def test_the_steps_batch_is_not_kept_after_the_run(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dynascope.probe(model, opt, tmp_path / "r", sentinel=False) as run:
            CE(model(x), y).backward()
            opt.step()
            run.step(1.0, batch=(x, y))
            assert run.ctx.step_batch[0] is x  # held, not copied
    assert run.ctx.step_batch is None
    with pytest.raises(ValueError, match="'step'"):
        Curvature(every=1, batch="steps", loss_fn=CE)
