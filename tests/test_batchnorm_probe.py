"""BatchNorm batch-vs-running statistics (default probe) and the scheduled
train/eval gap: float64 references from the captured BatchNorm inputs and
the running statistics before each forward, and bit-identical training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_invariants import Net, assert_identical, make_optimizer, run_state
from torch import nn

import dynascope
from dynascope.diagnostics.batchnorm import batch_vs_running, train_eval_gap
from dynascope.probes.batchnorm import BNGap


def reference(x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, eps: float) -> tuple[float, float]:
    """float64, one channel at a time, from the definition."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1).numpy()  # (C, everything else)
    rm, rv = rm.double().numpy(), rv.double().numpy()
    shifts, ratios = [], []
    for c in range(x.shape[0]):
        mu = x[c].sum() / x[c].size
        var = ((x[c] - mu) ** 2).sum() / x[c].size  # ddof=0: what BatchNorm normalises with
        shifts.append(abs(mu - rm[c]) / np.sqrt(rv[c] + eps))
        ratios.append(var / (rv[c] + eps))
    return float(np.mean(shifts)), float(np.mean(ratios))


class Capture:
    """Forward pre-hooks (attached after the probe's) recording each BatchNorm call's input and
    running statistics before the forward updates them."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, inputs):
            if mod.training:
                self.calls.setdefault(name, []).append((inputs[0].detach().clone(), mod.running_mean.clone(),
                                                        mod.running_var.clone(), mod.eps))
        return hook

    def expected(self) -> dict[tuple[str, str], float]:
        out = {}
        for name, calls in self.calls.items():
            vals = np.array([reference(*c) for c in calls])
            out[("bn.mean_shift", name)], out[("bn.var_ratio", name)] = vals.mean(0)
        self.calls = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Mixed(nn.Module):
    """BatchNorm 1d/2d/3d, SyncBatchNorm (a plain BatchNorm without a process group), an
    input with |mean| >> std (the shifted-sum path), and one BatchNorm without running stats."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.sync = nn.SyncBatchNorm(6, eps=1e-3, momentum=0.3)
        self.bn3 = nn.BatchNorm3d(2)
        self.fc = nn.Linear(6 * 8 * 8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.free = nn.BatchNorm1d(16, track_running_stats=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn2(self.conv(x)))
        h = self.sync(h + 100.0)  # mean/std ~ 100: catastrophic cancellation in plain float32 sums
        h = self.bn3(h.reshape(h.shape[0], 2, 3, 8, 8)).reshape(h.shape[0], -1)
        return self.head(self.free(F.relu(self.bn1(self.fc(h)))))


def test_probe_matches_float64_reference_per_step(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    expected = {}
    with dynascope.probe(model, opt, tmp_path / "r", every=2) as run:
        cap = Capture(model)
        for s in range(6):
            x = torch.randn(8, 3, 8, 8, generator=g) * (1 + s)  # the input scale drifts: stats move
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=g))
            if s == 4:  # a second train-mode call in a recording step: the mean of the per-call values
                F.cross_entropy(model(x[:4] * 2 + 1), torch.zeros(4, dtype=torch.long)).backward()
            opt.zero_grad()
            loss.backward()
            opt.step()
            got = cap.expected()
            if s % 2 == 0:
                expected.update({(s, *k): v for k, v in got.items()})
            run.step(loss=loss)
        cap.remove()
    data = dynascope.load_run(tmp_path / "r")
    rows = {}
    for metric in ("bn.mean_shift", "bn.var_ratio"):
        df = data.scalars(metric)
        rows.update({(int(s), metric, lay): v for s, lay, v in zip(df["step"], df["layer"], df["value"])})
    assert set(rows) == set(expected), sorted(set(rows) ^ set(expected))
    assert {lay for _, _, lay in rows} == {"bn2", "sync", "bn3", "bn1"}  # not 'free' (no running stats)
    for k, v in expected.items():
        assert rows[k] == pytest.approx(v, rel=2e-5, abs=1e-7), k
    # the drift shows: the later (larger) inputs have batch variances above the running ones
    assert rows[(4, "bn.var_ratio", "bn2")] > 2 and rows[(0, "bn.var_ratio", "bn2")] < 2
    cov = data.coverage().set_index(["kind", "name"])
    assert not bool(cov.loc[("metric", "bn.*@free"), "recorded"])
    assert cov.loc[("metric", "bn.*@free"), "reason"] == "no running statistics (track_running_stats=False)"


def test_eval_mode_calls_are_not_recorded(tmp_path):
    model = Net()
    opt = make_optimizer("sgd", model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        for s in range(3):
            model.train(s != 1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    data = dynascope.load_run(tmp_path / "r")
    assert list(data.steps("bn.mean_shift")) == [0, 2]
    assert list(data.steps("act.mean")) == [0, 1, 2]


def test_function_matches_reference_and_rejects_bad_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, 7, generator=g) * 3 + 2
    rm, rv = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    assert batch_vs_running(x, rm, rv, 1e-5) == pytest.approx(reference(x, rm, rv, 1e-5), rel=1e-5)
    # running statistics equal to the batch's: no shift, ratio var/(var + eps) ~ 1
    var, mu = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    shift, ratio = batch_vs_running(x.double(), mu, var, 0.0)
    assert shift == pytest.approx(0, abs=1e-12) and ratio == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        batch_vs_running(torch.randn(5), rm, rv)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_training_bit_identical_with_batchnorm_probe_and_gap(tmp_path, kind):
    def session(model, opt, data):
        gap = BNGap(every=3, batch=data[0], loss_fn=F.cross_entropy)
        return dynascope.probe(model, opt, tmp_path / kind, every=1, probes=("batchnorm",), scheduled=[gap])

    plain = run_state(kind, 8, seed=3)
    probed = run_state(kind, 8, session, seed=3)
    assert_identical(plain, probed)
    data = dynascope.load_run(tmp_path / kind)
    assert list(data.steps("bn.var_ratio")) == list(range(8))
    assert list(data.steps("bn.train_eval_gap")) == [0, 3, 6]


def test_train_eval_gap_against_copies_and_state_restored():
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer("sgd", model)
    for _ in range(3):  # running statistics away from their initial values
        x = torch.randn(8, 3, 8, 8) * 2 + 1
        F.cross_entropy(model(x), torch.randint(0, 5, (8,))).backward()
        opt.step()
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))
    ev = copy.deepcopy(model).eval()
    tr = copy.deepcopy(model).eval()
    for m in tr.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.train()
    with torch.no_grad():
        # float32 losses, as the diagnostic computes them (a float64 cross entropy of the same logits differs by
        # ~1e-6 relative, more than rel=1e-6 allows at some thread counts)
        e_ref = F.cross_entropy(ev(batch[0]), batch[1]).item()
        t_ref = F.cross_entropy(tr(batch[0]), batch[1]).item()
    model.train()
    before = {"p": {k: v.clone() for k, v in model.state_dict().items()}, "rng": torch.get_rng_state().clone()}
    res = train_eval_gap(model, F.cross_entropy, batch)
    assert res.eval_loss == pytest.approx(e_ref, rel=1e-6) and res.train_loss == pytest.approx(t_ref, rel=1e-6)
    assert res.gap == pytest.approx(e_ref - t_ref, rel=1e-6, abs=1e-9) and res.n_modules == 2
    assert abs(res.gap) > 1e-3  # the running statistics differ from the batch's: a real gap
    assert_identical(before, {"p": model.state_dict(), "rng": torch.get_rng_state()})
    assert model.training and all(m.training for m in model.modules())
    # two pairs: the size-weighted mean of the per-pair losses, each pair normalised with its own statistics
    pairs = [(batch[0][:4], batch[1][:4]), (batch[0][4:], batch[1][4:])]
    with torch.no_grad():
        t2 = (F.cross_entropy(tr(pairs[0][0]), pairs[0][1]).item() * 4
              + F.cross_entropy(tr(pairs[1][0]), pairs[1][1]).item() * 12) / 16
    assert train_eval_gap(model, F.cross_entropy, pairs).train_loss == pytest.approx(t2, rel=1e-6)


def test_gap_errors_are_clear():
    with pytest.raises(ValueError, match="no BatchNorm"):
        train_eval_gap(nn.Linear(3, 2), F.mse_loss, (torch.randn(4, 3), torch.randn(4, 2)))
    with pytest.raises(ValueError, match="batch"):
        BNGap(every=2, loss_fn=F.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn"):
        BNGap(every=2, batch=(torch.randn(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="every"):
        BNGap(every=0, batch=(torch.randn(2, 3), torch.zeros(2)), loss_fn=F.cross_entropy)
