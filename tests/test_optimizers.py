"""Several optimizers: each parameter's gradient is read at ITS optimizer's step, its update measured
around ITS step, lr.effective from its own param group; Muon gets no lr.effective (no published formula).
Training stays bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynascope


def _gan() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return nn.ModuleDict({"gen": gen, "disc": disc}), gen, disc


def _gan_loop(model: nn.ModuleDict, opt_g, opt_d, steps: int, run=None) -> None:
    g = torch.Generator().manual_seed(1)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        real = torch.randn(8, 6, generator=g) + 2
        z = torch.randn(8, 4, generator=g)
        fake = model["gen"](z)
        d_loss = bce(model["disc"](real), torch.ones(8, 1)) + bce(model["disc"](fake.detach()), torch.zeros(8, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(model["disc"](fake), torch.ones(8, 1))  # also fills the discriminator's .grad
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        if run is not None:
            run.step(loss=g_loss.detach(), d_loss=d_loss.detach())


def _state(model: nn.Module, *opts: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for o in opts:
        for st in o.state.values():
            out += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def test_gan_two_optimizers_each_read_at_its_own_step(tmp_path):
    model, gen, disc = _gan()
    ref_model = copy.deepcopy(model)
    ref_g = torch.optim.Adam(ref_model["gen"].parameters(), lr=2e-3, betas=(0.5, 0.999))
    ref_d = torch.optim.SGD(ref_model["disc"].parameters(), lr=0.05, momentum=0.9)
    _gan_loop(ref_model, ref_g, ref_d, 4)

    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.05, momentum=0.9)
    # independent reference: each optimizer's own pre-hook reads the gradients of its parameters
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[tuple[int, str], float] = {}
    live: dict[str, dynascope.Session] = {}
    for opt in (opt_d, opt_g):
        opt.register_step_pre_hook(lambda o, a, k: seen.update(
            {(live["run"].step_index, names[id(p)]): float(p.grad.norm()) for gr in o.param_groups
             for p in gr["params"]}))
    with dynascope.probe(model, [opt_g, opt_d], tmp_path / "gan", every=1) as run:
        live["run"] = run
        _gan_loop(model, opt_g, opt_d, 4, run=run)
    for a, b in zip(_state(model, opt_g, opt_d), _state(ref_model, ref_g, ref_d)):
        assert torch.equal(a, b)  # training bit-identical

    data = dynascope.load_run(tmp_path / "gan")
    gn = data.scalars("grad.norm")
    got = {(int(s), la): v for s, la, v in zip(gn.step, gn.layer, gn.value)}
    for key, ref in seen.items():
        assert got[key] == pytest.approx(ref, rel=1e-5), key
    # the discriminator's gradient at ITS step is the d_loss gradient, not the one g_loss left behind
    assert len({k for k in seen if k[1].startswith("disc")}) == 4 * 4

    upd = data.pivot("update.relative")
    assert (upd[[c for c in upd.columns if c.endswith("weight")]] > 0).all().all()
    lr_eff = data.pivot("lr.effective")
    w = data.pivot("weight.norm")
    for layer in ("gen.0.weight", "gen.2.weight"):  # Adam: lr / ||w||
        assert lr_eff[layer].iloc[0] == pytest.approx(2e-3 / w[layer].iloc[0], rel=1e-5)
    for layer in ("disc.0.weight", "disc.2.weight"):  # SGD: lr / ||w||^2
        assert lr_eff[layer].iloc[0] == pytest.approx(0.05 / w[layer].iloc[0] ** 2, rel=1e-5)
    meta = data.meta
    assert [o["class"] for o in meta["optimizers"]] == ["Adam", "SGD"]
    assert meta["optimizers"][1]["hyperparameters"][0]["momentum"] == 0.9


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_plus_adamw(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Linear(16 * 3, 32), nn.ReLU(),
                          nn.Linear(32, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))
    hidden = [model[2].weight, model[4].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    ref_model = copy.deepcopy(model)

    def opts(m: nn.Module):
        hid = [m[2].weight, m[4].weight]
        oth = [p for p in m.parameters() if all(p is not h for h in hid)]
        return torch.optim.Muon(hid, lr=0.02), torch.optim.AdamW(oth, lr=3e-3)

    def loop(m, ms, run=None):
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randint(0, 20, (8, 3), generator=g)
            y = torch.randint(0, 5, (8,), generator=g)
            loss = nn.functional.cross_entropy(m(x), y)
            for o in ms:
                o.zero_grad()
            loss.backward()
            for o in ms:
                o.step()
            if run is not None:
                run.step(loss=loss.detach())

    ref_opts = opts(ref_model)
    loop(ref_model, ref_opts)
    muon, adamw = opts(model)
    assert {id(p) for p in hidden} == {id(p) for g in muon.param_groups for p in g["params"]}
    assert len(rest) == sum(len(g["params"]) for g in adamw.param_groups)
    with dynascope.probe(model, (muon, adamw), tmp_path / "muon", every=1) as run:
        loop(model, (muon, adamw), run)
    for a, b in zip(_state(model, muon, adamw), _state(ref_model, *ref_opts)):
        assert torch.equal(a, b)
    data = dynascope.load_run(tmp_path / "muon")
    upd = data.pivot("update.relative")
    for layer in ("0.weight", "2.weight", "4.weight", "7.weight"):
        assert (upd[layer] > 0).all(), layer
    lr_eff = data.pivot("lr.effective")
    assert "2.weight" not in lr_eff.columns and "4.weight" not in lr_eff.columns  # Muon: no formula, no row
    assert {"0.weight", "7.weight"} <= set(lr_eff.columns)
    assert [o["class"] for o in data.meta["optimizers"]] == ["Muon", "AdamW"]
    cov = data.coverage().set_index(["kind", "name"])
    assert "no published effective-learning-rate formula for Muon" in cov.loc[("metric", "lr.effective@2.weight"),
                                                                               "reason"]


def test_curvature_thresholds_follow_each_layers_own_optimizer(tmp_path):
    from dynascope.diagnostics.stability import stability_threshold

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)

    def mse(out, target):
        return ((out - target) ** 2).mean()

    curv = dynascope.Curvature(every=1, batch=(x, y), loss_fn=mse, k=1, layers=True)
    with dynascope.probe(model, [sgd, adam], tmp_path / "r", every=1, curvature=curv) as run:
        for _ in range(2):
            loss = mse(model(x), y)
            sgd.zero_grad()
            adam.zero_grad()
            loss.backward()
            sgd.step()
            adam.step()
            run.step(loss=loss)
    data = dynascope.load_run(tmp_path / "r")
    assert not data.has("hessian.threshold")  # no whole-model threshold with two learning rates
    thr = data.pivot("hessian.layer_threshold")
    assert thr["0"].iloc[-1] == pytest.approx(stability_threshold(sgd))  # (2 + 2 beta) / lr
    assert thr["2"].iloc[-1] == pytest.approx(stability_threshold(adam))
    assert thr["0"].iloc[-1] == pytest.approx((2 + 2 * 0.9) / 0.1)
    assert set(data.layers("hessian.layer_eig")) >= {"0", "2"}
