"""The scheduled Curvature diagnostic: what it records, and that it leaves training bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynascope.core.guard import preserved_state, rng_state
from dynascope.diagnostics.hessian import (
    hessian_eigenvalues,
    hessian_trace,
    layer_sharpness,
    preconditioned_sharpness,
)
from dynascope.probes.curvature import Curvature
from dynascope.probes.scheduled import ScheduledContext
from dynascope.store import RunData, RunStore

CE = nn.CrossEntropyLoss()


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.2), nn.Linear(10, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    return model, x, y


def context(store: RunStore, model, opt, step: int) -> ScheduledContext:
    return ScheduledContext(
        model=model, optimizer=opt, step=step, final=False,
        log_fn=lambda m, v, layer: store.write_scalars([(step, m, layer, v)]),
        artifact_fn=lambda name, arrays, meta: store.write_artifact(name, step, arrays, meta),
    )


def test_records_eigenvalues_threshold_trace_layers_spectrum(tmp_path):
    model, x, y = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = RunStore(tmp_path / "run")
    probe = Curvature(every=2, batch=(x, y), loss_fn=CE, k=3, trace=True, spectrum=True, layers=True,
                      trace_samples=20, spectrum_iter=20, tol=1e-6, trace_method="hutchinson")
    for step in range(3):
        if probe.due(step):
            with preserved_state(model):
                probe.run(context(store, model, opt, step))
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    store.close()
    run = RunData(tmp_path / "run")
    eig = run.pivot("hessian.eig")
    assert list(eig.columns) == ["1", "2", "3"] and list(eig.index) == [0, 2]
    direct = hessian_eigenvalues(model, CE, (x, y), k=3, tol=1e-6)  # model is now at step 3: differs
    assert not np.allclose(eig.loc[2].to_numpy(), direct.eigenvalues)
    assert np.all(np.diff(eig.to_numpy(), axis=1) <= 0)
    thr = run.scalars("hessian.threshold")["value"].to_numpy()
    np.testing.assert_allclose(thr, (2 + 2 * 0.9) / 0.05)
    assert set(run.scalars("hessian.layer_eig")["layer"]) == {"0", "1", "4"}
    assert len(run.scalars("hessian.trace")) == 2 and (run.scalars("hessian.trace_stderr")["value"] > 0).all()
    n_hvp = run.scalars("hessian.n_hvp")["value"].to_numpy()
    assert np.all(n_hvp > 40)  # 20 trace + 20 SLQ + eigen + layers
    arrays, meta = run.load_artifact("hessian.spectrum")
    assert set(arrays) == {"grid", "density", "nodes", "weights"} and meta["n_iter"] == 20
    assert abs(np.trapezoid(arrays["density"], arrays["grid"]) - 1) < 1e-2
    assert not run.has("hessian.precond_eig")


def test_values_match_the_function_at_that_step(tmp_path):
    model, x, y = make(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = RunStore(tmp_path / "run")
    batch = [(x[:10], y[:10]), (x[10:], y[10:])]
    probe = Curvature(every=1, batch=batch, loss_fn=CE, k=2, tol=1e-8, trace=True, trace_samples=7, layers=True,
                      seed=3, trace_method="hutchinson")
    want = hessian_eigenvalues(model, CE, (x, y), k=2, tol=1e-8, seed=8)
    # the probe's seed at step 5 is seed + step = 8: the same Rademacher draws as the direct call
    want_tr = hessian_trace(model, CE, batch, n_samples=7, seed=8, method="hutchinson")
    want_ls = layer_sharpness(model, CE, batch, tol=1e-8, seed=8)
    with preserved_state(model):
        probe.run(context(store, model, opt, 5))
    store.close()
    run = RunData(tmp_path / "run")
    got = run.pivot("hessian.eig").loc[5].to_numpy()
    np.testing.assert_allclose(got, want.eigenvalues, rtol=1e-6)
    assert run.scalars("hessian.threshold")["value"].iloc[0] == pytest.approx(20)
    trace = run.scalars("hessian.trace")["value"].to_numpy()
    stderr = run.scalars("hessian.trace_stderr")["value"].to_numpy()
    assert abs(want_tr.trace) > 3 * want_tr.stderr  # the two rows are told apart
    np.testing.assert_allclose(trace, [want_tr.trace], rtol=1e-9)
    np.testing.assert_allclose(stderr, [want_tr.stderr], rtol=1e-9)
    layer = run.scalars("hessian.layer_eig").set_index("layer")["value"]
    assert want_ls.names == ["0", "1", "4"] and len(set(np.round(want_ls.eigenvalues, 6))) == 3
    for name, v in zip(want_ls.names, want_ls.eigenvalues):
        assert layer[name] == pytest.approx(v, rel=1e-6), name


def test_adam_records_preconditioned_sharpness(tmp_path):
    model, x, y = make(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    store = RunStore(tmp_path / "run")
    probe = Curvature(every=1, batch=(x, y), loss_fn=CE, k=1, tol=1e-6)
    for step in range(2):
        with preserved_state(model):
            probe.run(context(store, model, opt, step))  # step 0: no Adam state yet -> no precond row
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    with preserved_state(model):
        probe.run(context(store, model, opt, 2))
    want = preconditioned_sharpness(model, CE, (x, y), opt, tol=1e-6, seed=2)
    store.close()
    run = RunData(tmp_path / "run")
    pre = run.scalars("hessian.precond_eig")
    assert list(pre["step"]) == [1, 2]
    assert pre["value"].iloc[-1] == pytest.approx(want.eigenvalues[0], rel=1e-5)
    assert run.scalars("hessian.threshold")["value"].iloc[0] == pytest.approx(38 / 1e-3)


def _train(with_probe: bool, tmp_path) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    model, x, y = make(3)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(123)
    store = RunStore(tmp_path / ("a" if with_probe else "b"))
    probe = Curvature(every=3, batch=(x, y), loss_fn=CE, k=2, trace=True, layers=True, spectrum=True,
                      trace_samples=5, spectrum_iter=5, mode="train")
    for step in range(7):
        opt.zero_grad()
        loss = CE(model(x + 0.1 * torch.randn_like(x)), y)
        loss.backward()
        if with_probe and probe.due(step):
            # between backward and step: .grad is live and must survive untouched
            with preserved_state(model):
                probe.run(context(store, model, opt, step))
        opt.step()
    store.close()
    return model, opt, rng_state()


def test_training_is_bit_identical_with_the_probe(tmp_path):
    m1, o1, r1 = _train(True, tmp_path)
    m2, o2, r2 = _train(False, tmp_path)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1.grad, p2.grad)
        assert torch.equal(o1.state[p1]["momentum_buffer"], o2.state[p2]["momentum_buffer"])
    assert torch.equal(r1["cpu"], r2["cpu"])
    assert m1.training and m2.training


def test_bad_arguments():
    _, x, y = make()
    with pytest.raises(ValueError, match="every"):
        Curvature(every=0, batch=(x, y), loss_fn=CE)
    with pytest.raises(ValueError, match="k must"):
        Curvature(batch=(x, y), loss_fn=CE, k=0)
    with pytest.raises(TypeError, match="loss_fn"):
        Curvature(batch=(x, y), loss_fn=None)
    with pytest.raises(ValueError, match="preconditioned"):
        Curvature(batch=(x, y), loss_fn=CE, preconditioned="yes")


# --------------------------------------------------------------------------- figures
def _run_with_curvature(path, seed: int, opt_name: str = "sgd"):
    model, x, y = make(seed)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    store = RunStore(path)
    store.write_meta({"name": path.name})
    probe = Curvature(every=2, batch=(x, y), loss_fn=CE, k=2, trace=True, spectrum=True, layers=True,
                      trace_samples=6, spectrum_iter=12)
    for step in range(5):
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        store.write_scalars([(step, "loss", "", float(loss.detach()))])
        if probe.due(step):
            with preserved_state(model):
                probe.run(context(store, model, opt, step))
        opt.step()
    store.close()
    return RunData(path)


def test_figures_draw_and_skip_runs_without_data(tmp_path):
    from matplotlib.figure import Figure

    from dynascope.reports.figures import REGISTRY, all_figures
    from dynascope.reports.figures import curvature as figs

    a = _run_with_curvature(tmp_path / "sgd", 0)
    b = _run_with_curvature(tmp_path / "adam", 1, "adam")
    empty_store = RunStore(tmp_path / "empty")
    empty_store.write_scalars([(0, "loss", "", 1.0)])
    empty_store.close()
    empty = RunData(tmp_path / "empty")
    keys = {"curvature_sharpness", "curvature_trace", "curvature_spectrum", "curvature_layers"}
    assert keys <= {s.key for s in all_figures()}
    for key in keys:
        spec = REGISTRY[key]
        assert spec.section == "Curvature" and 300 <= spec.order <= 399
        assert spec.fn([empty]) is None
        fig = spec.fn([a, b, empty])
        assert isinstance(fig, Figure), key
        fig.savefig(tmp_path / f"{key}.png", dpi=60)
        assert getattr(fig, "dynascope_caption", "")
    fig = figs.sharpness([a, b])
    ax = fig.axes[-1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("preconditioned" in s for s in labels) and any("threshold" in s for s in labels)
    assert fig.axes[0].get_ylabel() == "training loss"
    # 2/lr = 40 and the Adam threshold 38000 share the axis: more than two decades, log scale
    assert ax.get_yscale() == "log"
    assert figs.sharpness([a]).axes[-1].get_yscale() == "linear"
    assert figs.spectrum([a]).axes[0].get_yscale() == "log"


def test_live_adam_step0_leaves_out_coordinates_without_second_moment(tmp_path):
    """issue 11: in a live run the step-0 diagnostic runs after the first AdamW step; embedding rows that
    step did not use have no second moment (P = eps there gave ~1e7). They are left out: the recorded value
    is the one preconditioned_sharpness gives for the same state, and far below the eps-scaled one."""
    import dynascope
    from dynascope.diagnostics.stability import _has_second_moment

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(30, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(tokens).mean(1)))

    torch.manual_seed(0)
    model = Bag()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    probe_batch = (torch.randint(0, 30, (32, 6), generator=g), torch.randint(0, 3, (32,), generator=g))
    x0, y0 = torch.randint(0, 5, (32, 6), generator=g), torch.randint(0, 3, (32,), generator=g)  # tokens 0..4
    with dynascope.probe(model, opt, tmp_path / "run", probes=(),
                         curvature=Curvature(at=[0], every=None, batch=probe_batch, loss_fn=CE, k=1, tol=1e-6)) as run:
        opt.zero_grad()
        loss = CE(model(x0), y0)
        loss.backward()
        opt.step()
        run.step(loss)
    assert not bool(_has_second_moment(opt)[id(model.emb.weight)].all())  # the case of the issue
    rec = RunData(tmp_path / "run").scalars("hessian.precond_eig")
    assert list(rec["step"]) == [0]
    want = preconditioned_sharpness(model, CE, probe_batch, opt, k=1, tol=1e-6, seed=0)
    assert rec["value"].iloc[0] == pytest.approx(want.eigenvalues[0], rel=1e-5)
    assert rec["value"].iloc[0] < 38 / 1e-2  # below Adam's threshold; ~1e6 with P = eps on the unseen rows
