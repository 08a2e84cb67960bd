"""The step an optimizer took, from its state (dynascope.probes._steps) against w_{t+1} - w_t measured with a
float64 copy, for SGD, Adam and AdamW and each of their flags (1e-4 relative: the copy measures the update
rounded into float32 weights, the state gives the update the optimizer computed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynascope.probes._steps as steps_mod
from dynascope.probes._steps import steps_from_state, supports_state_steps, update_norms_from_state

CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.05)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.05, dampening=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("sgd", dict(lr=0.1, momentum=0.9, maximize=True, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, weight_decay=0.05, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, foreach=False)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, maximize=True)),
    ("adam", dict(lr=1e-2, foreach=False)),
    ("adam", dict(lr=1e-2, fused=True)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adamw", dict(lr=torch.tensor(1e-2), weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, fused=True)),
]


@pytest.mark.parametrize("chunk", [1 << 22, 100], ids=["one-chunk", "chunks-of-100"])
@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(kw)}" for k, kw in CASES])
def test_step_from_state_equals_the_copy(kind, kw, chunk, monkeypatch):
    monkeypatch.setattr(steps_mod, "CHUNK_ELEMENTS", chunk)  # several parameters per chunk, and one per chunk
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": kw["lr"] * 0.5}]
    opt = cls(groups, **kw)
    assert supports_state_steps(opt)
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    for step in range(4):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.step()
        for group in opt.param_groups:
            ds = steps_from_state(opt, group, group["params"])
            assert ds is not None
            for p, d in zip(group["params"], ds):
                ref = p.detach().double() - before[[id(q) for q in model.parameters()].index(id(p))]
                err = (d.double() - ref).norm() / ref.norm()
                assert err < 1e-4, (step, float(err))
            # the norms in closed form, multi-tensor (the sentinel's path)
            norms = update_norms_from_state(opt, group, group["params"])
            assert norms is not None and norms.dtype == torch.float32 and norms.shape == (len(group["params"]),)
            for p, n in zip(group["params"], norms):
                ref = p.detach().double() - before[[id(q) for q in model.parameters()].index(id(p))]
                assert float(n) == pytest.approx(float(ref.norm()), rel=1e-4), step


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_update_norms_with_different_step_counts_per_parameter(kind):
    """A parameter that had no gradient at the first step has a smaller step count (its own bias correction)."""
    torch.manual_seed(1)
    a, b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(7))
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = cls([a, b], lr=0.05, weight_decay=0.1)
    for step in range(4):
        opt.zero_grad()
        loss = (a ** 2).sum() + ((b ** 3).sum() if step >= 2 else 0.0)
        loss.backward()
        before = [a.detach().double().clone(), b.detach().double().clone()]
        opt.step()
        ps = [a, b] if step >= 2 else [a]
        norms = update_norms_from_state(opt, opt.param_groups[0], ps)
        for p, n, w in zip(ps, norms, before):
            assert float(n) == pytest.approx(float((p.detach().double() - w).norm()), rel=1e-4)
    assert float(opt.state[a]["step"]) != float(opt.state[b]["step"])


def test_other_optimizers_are_not_covered():
    p = nn.Parameter(torch.randn(3))

    class MySGD(torch.optim.SGD):
        pass

    assert not supports_state_steps(torch.optim.RMSprop([p]))
    assert not supports_state_steps(MySGD([p], lr=0.1))
    assert not supports_state_steps(None)


def test_a_missing_state_returns_none():
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1)
    assert steps_from_state(opt, opt.param_groups[0], [p]) is None  # no step taken yet


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3),  # not covered: the sentinel keeps its copy
], ids=["adamw", "sgd-nesterov", "rmsprop"])
def test_the_sentinels_update_norms_without_a_copy(tmp_path, make):
    import copy

    import dynascope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = make(model.parameters())
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    ref = []
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=()) as run:
        for _ in range(4):
            before = copy.deepcopy(model)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            ref.append([float(torch.cat([(a.double() - b.double()).reshape(-1) for a, b in
                                         zip(m.parameters(), n.parameters())]).norm())
                        for m, n in zip(model[::2], before[::2])])
        copies = len(run.sentinel._snap)
    assert copies == (1 if isinstance(opt, torch.optim.RMSprop) else 0)  # a copy of the weights only there
    un = dynascope.load_run(tmp_path / "r").scalars("update.norm")
    for step, row in enumerate(ref):
        for name, r in zip(("0", "2"), row):
            got = float(un[(un["step"] == step) & (un["layer"] == name)]["value"].iloc[0])
            assert got == pytest.approx(r, rel=1e-4)
