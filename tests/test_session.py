"""The session API: bad input errors, extra scalars, custom probes through the
documented protocol, and the end-to-end rotational-equilibrium check of the
angular-update probe (Kosson et al. 2024)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope import Collected, Probe


def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_step(model, opt, run, **scalars):
    loss = F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    run.step(loss=loss, **scalars)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(tmp_path):
    model, opt = small()
    with pytest.raises(TypeError, match="nn.Module.*function"):
        dynascope.probe(lambda x: x, opt, tmp_path / "a")
    with pytest.raises(TypeError, match="optimizer must be .* got a str in the sequence"):
        dynascope.probe(model, [opt, "adam"], tmp_path / "a")
    with pytest.raises(TypeError, match="optimizer must be .* got dict"):
        dynascope.probe(model, {"opt": opt}, tmp_path / "a")
    with pytest.raises(ValueError, match="the same optimizer is given twice"):
        dynascope.probe(model, [opt, opt], tmp_path / "a")
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="optimizer holds none of the model's parameters"):
        dynascope.probe(model, torch.optim.SGD(other.parameters(), lr=0.1), tmp_path / "a")
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match=f"every must be an integer >= 1, got {bad!r}"):
            dynascope.probe(model, opt, tmp_path / "a", every=bad)
    with pytest.raises(ValueError, match="unknown probe 'activation'.*activations, gradients, updates"):
        dynascope.probe(model, opt, tmp_path / "a", probes=("activation",))
    with pytest.raises(ValueError, match="no module matches"):
        dynascope.probe(model, opt, tmp_path / "a", blocks="nothing.*")
    assert not (tmp_path / "a").exists()  # nothing was written by a refused call
    with dynascope.probe(model, opt, tmp_path / "b") as run:
        with pytest.raises(TypeError, match="scalar 'acc' must be a number.*str"):
            run.step(acc="high")
        with pytest.raises(ValueError, match=r"scalar 'loss' must have one element, got shape \(2,\)"):
            run.step(loss=torch.ones(2))
    with pytest.raises(RuntimeError, match="outside"):
        run.step(loss=1.0)


def test_partial_optimizer_is_accepted(tmp_path):
    """Fine-tuning: an optimizer over part of the model is fine; frozen weights just have no update metrics."""
    model, _ = small()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        one_step(model, opt, run)
    data = dynascope.load_run(tmp_path / "r")
    upd = data.pivot("update.angle")
    assert upd.loc[0, "2.weight"] > 0 and upd.loc[0, "0.weight"] == 0


def test_scalars_log_mark_and_metadata(tmp_path):
    model, opt = small()
    with dynascope.probe(model, opt, tmp_path / "r", every=5, seed=123, name="exp", meta={"note": "hi"}) as run:
        for s in range(4):
            one_step(model, opt, run, acc=torch.tensor(0.25 * s), lr=0.1, n=np.float32(s))
            run.log("val.loss", 1.0 / (s + 1))
            if s == 2:
                run.mark("task", 1)
    data = dynascope.load_run(tmp_path / "r")
    assert data.scalars("acc")["value"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert data.scalars("n")["value"].tolist() == [0, 1, 2, 3]
    assert data.scalars("val.loss")["value"].tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert list(data.steps("val.loss")) == [1, 2, 3, 4]  # logged after step() advanced the counter
    assert data.marks("task")["step"].tolist() == [3]
    meta = data.meta
    assert meta["seed"] == 123 and meta["name"] == "exp" and meta["user"] == {"note": "hi"}
    assert meta["optimizer"]["class"] == "SGD" and meta["optimizer"]["hyperparameters"][0]["lr"] == 0.1
    assert meta["model"]["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["torch_version"] == torch.__version__ and meta["status"] == "finished" and meta["steps"] == 4
    assert meta["modules"] == ["0", "1", "2"]


# ----------------------------------------------------------------------------- custom probes
class WeightAbsMax(Probe):
    """The docstring example of dynascope.probes.base."""

    name = "weight_max"

    def collect(self, step):
        ps = list(self.session.model.parameters())
        return Collected([("weight.absmax", "")], torch.stack([p.detach().abs().max() for p in ps]).max()[None])


class ForwardCounter(Probe):
    """Hooks attached by arm() on recording steps only; host-side rows through ``post``."""

    name = "forward_counter"

    def __init__(self) -> None:
        self.handles = []
        self.calls = 0
        self.armed_steps = []

    def arm(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.session.model.children()]

    def _hook(self, mod, inp, out):
        self.calls += 1

    def disarm(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def collect(self, step):
        self.armed_steps.append(step)
        calls, self.calls = self.calls, 0
        out_norm = self.session.model[2].weight.detach().norm()[None]
        return Collected([("custom.w_norm", "2")], out_norm,
                         post=lambda vals: [("custom.calls", "", float(calls)),
                                            ("custom.w_norm_sq", "2", vals[("custom.w_norm", "2")] ** 2)])


def test_custom_probes_through_the_protocol(tmp_path):
    model, opt = small()
    counter = ForwardCounter()
    norms = []
    with dynascope.probe(model, opt, tmp_path / "r", every=2, probes=("gradients", WeightAbsMax(), counter)) as run:
        for s in range(5):
            loss = F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            norms.append(model[2].weight.detach().norm().item())  # collect() runs after the step
            if s % 2 == 0:
                last_max = max(p.detach().abs().max().item() for p in model.parameters())
            run.step(loss=loss)
            assert run._recording == (run.step_index % 2 == 0)  # hooks armed for the next step only if it records
    assert counter.armed_steps == [0, 2, 4]
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    data = dynascope.load_run(tmp_path / "r")
    assert data.meta["probes"] == ["gradients", "weight_max", "forward_counter"]
    assert data.scalars("custom.calls")["value"].tolist() == [3, 3, 3]  # 3 children, one forward each
    w = data.scalars("custom.w_norm")["value"].to_numpy()
    assert w == pytest.approx([norms[0], norms[2], norms[4]], rel=1e-6)
    assert data.scalars("custom.w_norm_sq")["value"].to_numpy() == pytest.approx(w ** 2, rel=1e-6)
    assert data.scalars("weight.absmax")["value"].iloc[-1] == pytest.approx(last_max, rel=1e-6)
    assert "act.mean" not in data.metrics()


# ----------------------------------------------------------------------------- rotational equilibrium
def _digits_random_labels():
    try:
        from dynascope.datasets import load_digits
        x, _ = load_digits()
    except ImportError:  # pragma: no cover - parse the bundled file directly
        import gzip
        from importlib import resources
        with (resources.files("dynascope.datasets") / "digits.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
            x = torch.from_numpy(np.loadtxt(f, delimiter=",", dtype=np.float32)[:, :64] / 16.0)
    # random labels keep the gradient noise-dominated (the equilibrium's assumption) for the whole run
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    return x, y


def equilibrium_run(tmp_path, kind: str, steps: int) -> tuple[dict[str, float], float]:
    x, y = _digits_random_labels()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
                          nn.Linear(128, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    if kind == "sgd":
        eta, lam, mom = 0.1, 5e-4, 0.9
        opt = torch.optim.SGD(model.parameters(), lr=eta, momentum=mom, weight_decay=lam)
        predicted = math.sqrt(2 * eta * lam / (1 + mom))
    else:
        eta, lam, beta1 = 1e-3, 0.1, 0.9
        opt = torch.optim.AdamW(model.parameters(), lr=eta, weight_decay=lam, betas=(beta1, 0.999))
        predicted = math.sqrt(2 * eta * lam * (1 - beta1) / (1 + beta1))
    g = torch.Generator().manual_seed(0)
    with dynascope.probe(model, opt, tmp_path / kind, every=10, probes=("updates",)) as run:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    angles = dynascope.load_run(tmp_path / kind).pivot("update.angle_row")
    tail = angles[angles.index >= int(0.75 * steps)]  # the last quarter, after the norm settled
    return {layer: float(tail[layer].mean()) for layer in ("0.weight", "3.weight")}, predicted


def test_rotational_equilibrium_sgd_momentum(tmp_path):
    """SGD, eta=0.1, lambda=5e-4, momentum 0.9: sqrt(2 eta lambda / (1 + alpha)) = 7.255e-3 rad per row."""
    measured, predicted = equilibrium_run(tmp_path, "sgd", 4000)
    assert predicted == pytest.approx(7.255e-3, rel=1e-3)
    for layer, angle in measured.items():  # measured: ~1.03x at both BN-fed weights
        assert angle == pytest.approx(predicted, rel=0.15), (layer, angle, predicted)


@pytest.mark.slow
def test_rotational_equilibrium_adamw(tmp_path):
    """AdamW, eta=1e-3, lambda=0.1, beta1=0.9: sqrt(2 eta lambda (1-beta1)/(1+beta1)) = 3.244e-3 rad per row.

    Checked on the hidden BN-fed weight (128 -> 128). The first layer sees the
    digits' always-zero pixels: those weight columns get no gradient, so Adam
    moves fewer coordinates and its equilibrium angle is lower (~0.75x, measured)."""
    measured, predicted = equilibrium_run(tmp_path, "adamw", 10000)
    assert predicted == pytest.approx(3.244e-3, rel=1e-3)
    assert measured["3.weight"] == pytest.approx(predicted, rel=0.15), measured
    assert measured["0.weight"] < predicted  # fewer live coordinates: a smaller angle, as explained above


class _Broken(dynascope.Scheduled):
    """A scheduled diagnostic that moves the weights and then fails."""

    def run(self, ctx):
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.add_(1.0)
        raise RuntimeError("diagnostic bug")


def _train_with(tmp_path, name, **opts):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with dynascope.probe(model, opt, tmp_path / name, every=1, **opts) as run:
        for _ in range(6):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    return model


def test_a_failing_scheduled_diagnostic_warns_records_and_leaves_training_unchanged(tmp_path):
    reference = _train_with(tmp_path, "plain")
    with pytest.warns(RuntimeWarning, match="_Broken failed at step 0 .*diagnostic bug"):
        probed = _train_with(tmp_path, "broken", scheduled=[_Broken(every=3)])
    for a, b in zip(reference.parameters(), probed.parameters()):
        assert torch.equal(a, b)
    failed = dynascope.load_run(tmp_path / "broken").scalars("diagnostic.failed")
    assert failed["step"].tolist() == [0, 3] and set(failed["layer"]) == {"_Broken"}


def test_a_failing_scheduled_diagnostic_raises_when_asked(tmp_path):
    with pytest.raises(RuntimeError, match="diagnostic bug"):
        _train_with(tmp_path, "strict", scheduled=[_Broken(every=3)], on_diagnostic_error="raise")
    with pytest.raises(ValueError, match="on_diagnostic_error must be 'warn' or 'raise'"):
        _train_with(tmp_path, "bad", on_diagnostic_error="ignore")
