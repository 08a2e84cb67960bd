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
