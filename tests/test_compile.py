"""torch.compile: activation statistics at every recording step, equal to the eager run's; a bounded
number of compiled graphs whatever the number of steps; training bit-identical to the compiled run without
dynascope. Dynamo's hook guards are switched on for the session only (and restored)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynascope

torch_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

EVERY = 2


class Breaks(nn.Module):
    """A module whose forward breaks the graph (fullgraph=False models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return x * 1.5


def _cnn(graph_break: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    if graph_break:
        layers.append(Breaks())
    layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]


def _train(model: nn.Module, call, steps: int, run_dir=None) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = dynascope.probe(model, opt, run_dir, every=EVERY, probes=("activations",)) if run_dir else None
    if run is not None:
        run.start()
    try:
        for x, y in _data(steps):
            loss = nn.functional.cross_entropy(call(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss)
    finally:
        if run is not None:
            run.close()
    return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


def _acts(run_dir) -> dict[tuple[int, str, str], float]:
    data = dynascope.load_run(run_dir)
    out = {}
    for m in ("act.mean", "act.var", "act.channel_sq_mean", "act.absmax", "act.zero_frac"):
        df = data.scalars(m)
        out.update({(int(s), m, la): float(v) for s, la, v in zip(df.step, df.layer, df.value)})
    return out


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("backend,graph_break", [("inductor", False), ("aot_eager", True)])
def test_compiled_model_records_every_step_like_eager(tmp_path, backend, graph_break):
    steps = 6
    eager_model = _cnn(graph_break)
    _train(eager_model, eager_model, steps, tmp_path / "eager")
    eager = _acts(tmp_path / "eager")

    plain_model = _cnn(graph_break)
    torch._dynamo.reset()
    plain_state = _train(plain_model, torch.compile(plain_model, backend=backend), steps)

    model = _cnn(graph_break)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    before = torch._dynamo.config.skip_nnmodule_hook_guards
    state = _train(model, compiled, steps, tmp_path / "compiled")
    assert torch._dynamo.config.skip_nnmodule_hook_guards == before  # the session's scope is restored
    got = _acts(tmp_path / "compiled")
    assert {k[0] for k in got} == set(range(0, steps, EVERY))  # every recording step, not only the first
    assert set(got) == set(eager)
    for k, ref in eager.items():
        assert got[k] == pytest.approx(ref, rel=1e-4, abs=1e-6), k
    for a, b in zip(state, plain_state):  # training bit-identical to the compiled run without dynascope
        assert torch.equal(a, b)
    graphs_short = _graphs()

    # the number of compiled graphs does not grow with the number of steps
    model2 = _cnn(graph_break)
    torch._dynamo.reset()
    counters.clear()
    _train(model2, torch.compile(model2, backend=backend), 3 * steps, tmp_path / "long")
    assert _graphs() == graphs_short
    # measured: 2 graphs (hooks on / off) without a break; 16 with one (the frames on both sides of the
    # break, each with and without the hooks, and Dynamo's resume functions)
    assert graphs_short <= (16 if graph_break else 4)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _train_mlp(model: nn.Module, call, steps: int, run_dir=None, compile_inside=None):
    """SGD on a fixed stream of batches; with ``run_dir`` under dynascope (activations only).
    ``compile_inside``: compile the model once the probe has started (returns the call)."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = dynascope.probe(model, opt, run_dir, every=EVERY, probes=("activations",)) if run_dir else None
    if run is not None:
        run.start()
    try:
        if compile_inside is not None:
            call = compile_inside(model)
        for x, y in batches:
            loss = nn.functional.cross_entropy(call(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss)
        return None if run is None else run.coverage()
    finally:
        if run is not None:
            run.close()


@pytest.mark.parametrize("when", ["compiled before the probe", "compiled under the probe",
                                  "compiled and run before the probe"])
def test_a_model_compiled_after_an_earlier_compiled_model_is_recorded_like_eager(tmp_path, when):
    """A notebook: a compiled model trained without dynascope, then a NEW model of the same architecture
    compiled and trained under dynascope.probe. Dynamo does not guard a module's identity (it inlines nn
    modules and guards their type and structure) and the earlier graph was traced without hook guards, so
    it was reused for the new model with the probe's hooks ignored: no act.* at all, a warning telling the
    user to compile after starting the probe, and every module counted as recorded."""
    import warnings

    steps, backend = 4, "eager"  # the "eager" backend shows it as inductor does (checked by hand), in a second
    torch._dynamo.reset()
    try:
        earlier = _mlp(5)
        _train_mlp(earlier, torch.compile(earlier, backend=backend), steps)  # no dynascope

        model = _mlp()
        call = torch.compile(model, backend=backend)
        if when == "compiled and run before the probe":
            with torch.no_grad():
                call(torch.randn(16, 8))  # traced now, before the session (no training step)
        inside = (lambda m: torch.compile(m, backend=backend)) if when == "compiled under the probe" else None
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "no module output was seen" is an error here
            cov = _train_mlp(model, call, steps, tmp_path / "compiled", compile_inside=inside)
        reference = _mlp()
        _train_mlp(reference, reference, steps, tmp_path / "eager")
    finally:
        torch._dynamo.reset()
    got, eager = _acts(tmp_path / "compiled"), _acts(tmp_path / "eager")
    assert {k[0] for k in got} == set(range(0, steps, EVERY))
    assert set(got) == set(eager) and len({k[2] for k in eager}) == 5
    for k, ref in eager.items():
        assert got[k] == pytest.approx(ref, rel=1e-4, abs=1e-6), k
    assert cov["recorded"].all() and len(cov[cov["kind"] == "module"]) == 5
    assert torch._dynamo.config.skip_nnmodule_hook_guards  # the session's scope is restored


def test_modules_a_compiled_graph_hides_are_counted_as_not_recorded(tmp_path, monkeypatch):
    """If a graph traced without the probe's hooks still runs the model (here: the code caches are not
    dropped, as before the fix), nothing is recorded, and the coverage says so: 0 of 5 modules recorded,
    with the reason, live and in the stored run (what the report's "N of M modules recorded" counts)."""
    steps, backend = 4, "eager"
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo, "reset_code_caches", lambda: None)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    try:
        earlier = _mlp(5)
        _train_mlp(earlier, torch.compile(earlier, backend=backend), steps)
        model = _mlp()
        with pytest.warns(RuntimeWarning, match="no module output was seen"):
            live = _train_mlp(model, torch.compile(model, backend=backend), steps, tmp_path / "r")
    finally:
        monkeypatch.undo()
        torch._dynamo.reset()
    stored = dynascope.load_run(tmp_path / "r").coverage()
    for cov in (live, stored):
        mods = cov[cov["kind"] == "module"]
        assert len(mods) == 5 and not mods["recorded"].astype(bool).any()
        assert all("no output seen in any recording step" in r for r in mods["reason"])
    assert "act.mean" not in dynascope.load_run(tmp_path / "r").metrics()


def test_scheduled_diagnostics_run_on_the_eager_module_of_a_compiled_model(tmp_path):
    """Curvature, Cockpit's gradient tests, the noise scale and alpha on a torch.compile'd model: they used to
    fail (its compiled backward refuses create_graph: "compiled with non-empty donated buffers"); they run
    the eager module (the same parameters), so at the end of the run they equal the functions called on it,
    with the model's own layer names."""
    import torch.nn.functional as F

    from dynascope.diagnostics.gradient_tests import gradient_tests
    from dynascope.diagnostics.hessian import hessian_eigenvalues

    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)),
                          backend="aot_eager")
    g = torch.Generator().manual_seed(5)
    probe = (torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = [dynascope.Curvature(at="end", batch=probe, loss_fn=F.cross_entropy, k=1, trace=False, layers=True),
             dynascope.GradientTests(at="end", batch=probe, loss_fn=F.cross_entropy, lr=0.01),
             dynascope.NoiseScale(at="end", batch=probe, loss_fn=F.cross_entropy, micro_batches=4),
             dynascope.Alpha(every=2, loss_fn=F.cross_entropy)]
    with dynascope.probe(model, opt, tmp_path / "run", every=2, scheduled=sched) as run:
        for _ in range(6):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss.detach(), batch=(x, y))
    data = dynascope.load_run(tmp_path / "run")
    assert "diagnostic.failed" not in data.metrics()
    eager = model._orig_mod
    eig = float(data.scalars("hessian.eig")["value"].iloc[-1])
    assert eig == pytest.approx(float(hessian_eigenvalues(eager, F.cross_entropy, probe, k=1).eigenvalues[0]),
                                rel=1e-6)
    gt = gradient_tests(eager, F.cross_entropy, probe, lr=0.01)
    assert float(data.scalars("gradtest.norm_test")["value"].iloc[-1]) == pytest.approx(gt.norm_test, rel=1e-6)
    assert set(data.scalars("hessian.layer_eig")["layer"]) == {"0", "1", "3"}  # not "_orig_mod.0"
    assert len(data.scalars("gns.grad_sq")) == 1 and len(data.scalars("step.alpha")) >= 2
