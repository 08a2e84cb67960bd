"""The always-on sentinel: every-step norms in a ring buffer, events detected from late reads, a window at
full resolution and a burst of recording steps on an event, forensics naming the faulty layer; training
bit-identical; the online spike rule equals the report's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dynascope
from dynascope.analysis.findings import spike_threshold as series_threshold
from dynascope.core.robust import SPIKE_MIN_RISE, spike_threshold

STEPS = 70
FAULT = range(45, 46)  # the step at which the faulty layer's learning rate is multiplied


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 1))


def _train(model: nn.Module, run=None, fault_layer: int | None = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    groups = [{"params": list(m.parameters()), "lr": 0.02} for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(groups, lr=0.02)
    if run is not None:
        run = run(model, opt)
        run.start()
    try:
        for step in range(STEPS):
            x = torch.randn(32, 8, generator=g)
            y = torch.tanh(x @ w)
            k = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)].index(fault_layer) \
                if fault_layer is not None else None
            for i, group in enumerate(opt.param_groups):
                group["lr"] = 0.02 * (5000.0 if (step in FAULT and i == k) else 1.0)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss.detach())
    finally:
        if run is not None:
            run.close()
    return [p.detach().clone() for p in model.parameters()] + \
        [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def test_sentinel_event_window_burst_and_forensics(tmp_path):
    ref = _train(_model())
    got = _train(_model(), lambda m, o: dynascope.probe(m, o, tmp_path / "r", every=10**9))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)  # the sentinel and its bursts never change training
    data = dynascope.load_run(tmp_path / "r")
    events = data.events()
    assert len(events) >= 1 and (events["source"] == "recorded").all()
    first = int(events["step"].min())
    assert FAULT.start <= first <= FAULT.stop + 1, events
    assert set(events["kind"]) <= {"loss_spike", "grad_spike", "loss_nonfinite", "grad_nonfinite", "update_jump",
                                   "grad_jump"}
    # the faulty layer's update jumps at the fault step itself, before the loss moves: an event naming it
    jump = events[events["kind"] == "update_jump"].iloc[0]
    assert jump["step"] == FAULT.start and jump["detail"]["modules"][0] == "2" and jump["value"] >= 100, events
    assert jump["detail"]["metric"] == "update.norm"
    # the window before the event at full resolution (every step, though every=10**9)
    un = data.scalars("update.norm", "2")
    assert set(range(first - 20, first + 1)) <= set(un["step"].astype(int))
    # a burst: the full probes recorded every step after the event
    act_steps = set(data.scalars("act.var")["step"].astype(int))
    assert {0} | set(range(first + 1, first + 1 + 20)) <= act_steps
    # the layer whose learning rate jumped moves first
    table = data.forensics(first)
    # the cause: the lr of layer 2's param group (named after the module it holds), then its update
    assert (table.iloc[0]["metric"], table.iloc[0]["module"]) == ("optim.lr", "2"), table.head()
    assert table[table["metric"] != "optim.lr"].iloc[0]["module"] == "2", table.head()


def test_sentinel_quiet_run_has_no_event_and_writes_update_norm_only_at_recording_steps(tmp_path):
    _train(_model(), lambda m, o: dynascope.probe(m, o, tmp_path / "r", every=10), fault_layer=None)
    data = dynascope.load_run(tmp_path / "r")
    assert not any(m.startswith("event.") for m in data.metrics())
    steps = sorted(set(data.scalars("update.norm")["step"].astype(int)))
    assert steps == list(range(0, STEPS, 10))
    # update.norm = ||w_{t+1} - w_t|| over the module's parameters, against update.relative x weight.norm
    # of its weight when the bias moves little: checked exactly below on a one-step run
    assert data.meta["sentinel"] == {"window": 64, "burst": 20, "updates": True, "drift": True, "announce": True}


def test_update_norm_is_the_norm_of_the_step(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        for _ in range(3):
            before = copy.deepcopy(model)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    d = dynascope.load_run(tmp_path / "r").scalars("update.norm", "4")
    ref = torch.cat([(a - b).detach().reshape(-1)
                     for a, b in zip(model[4].parameters(), before[4].parameters())]).norm()
    assert float(d[d.step == 2]["value"].iloc[0]) == pytest.approx(float(ref), rel=1e-5)


def test_sentinel_off_and_bad_input(tmp_path):
    model = _model()
    with dynascope.probe(model, None, tmp_path / "r", sentinel=False) as run:
        assert run.sentinel is None
    with pytest.raises(TypeError, match="sentinel must be"):
        dynascope.probe(model, None, tmp_path / "x", sentinel="yes")
    with pytest.raises(ValueError, match="window must be an integer >= 2"):
        dynascope.Sentinel(window=1)


def test_online_spike_rule_equals_the_report_rule():
    rng = np.random.default_rng(0)
    v = np.abs(rng.normal(1.0, 0.05, 80))
    v[50] = 3.0
    v[60] = np.nan
    series = series_threshold(v, SPIKE_MIN_RISE)
    start = float(np.nanmedian(v[:20]))
    for i in range(len(v)):
        online = spike_threshold(v[:i], start, SPIKE_MIN_RISE)
        assert online == pytest.approx(series[i], nan_ok=True, rel=1e-12), i


def _drive(grad_norms, tmp_path):
    """The sentinel driven step by step with gradients of the given global norms (no optimizer)."""
    model = nn.Linear(4, 1, bias=False)
    events = []
    with dynascope.probe(model, None, tmp_path / "g", every=10**9, probes=(),
                         sentinel=dynascope.Sentinel(drift=False)) as run:
        for g in grad_norms:
            model.weight.grad = torch.full_like(model.weight, g / 2.0)  # ||grad|| = g (4 entries)
            run.step(loss=1.0)
        events = run.sentinel.events
    return [(e.step, e.kind) for e in events]


def test_gradient_spike_needs_a_rise_of_the_starting_norm(tmp_path):
    rng = np.random.default_rng(0)
    calm = list(2.0 * np.exp(0.1 * rng.standard_normal(5))) + list(0.01 * np.exp(0.1 * rng.standard_normal(45)))
    below = calm + [0.5] + calm[-10:]  # 50x the running median, below where it started (2.0): noise
    assert _drive(below, tmp_path / "a") == []
    above = calm + [5.0] + calm[-10:]  # and above the starting norm: a spike
    assert _drive(above, tmp_path / "b") == [(50, "grad_spike")]


def test_parameters_without_a_gradient_this_step(tmp_path):
    """A branch used on odd steps only: on even steps its parameters have no gradient; the sentinel's norms
    count the others, and each module's update norm is ||w_{t+1} - w_t|| whichever subset stepped."""
    torch.manual_seed(0)
    trunk, branch = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.ModuleDict({"trunk": trunk, "branch": branch})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {}
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=()) as run:
        for step in range(6):
            x = torch.randn(8, 4)
            out = trunk(x) if step % 2 == 0 else branch(trunk(x))
            loss = out.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            after = {n: p.detach() for n, p in model.named_parameters()}
            run.step(loss=loss)
            before[step] = {m: float(torch.cat([(after[n] - before[step][n]).reshape(-1) for n in after
                                                 if n.startswith(m + ".")]).norm()) for m in ("trunk", "branch")}
    data = dynascope.load_run(tmp_path / "r")
    for m in ("trunk", "branch"):
        got = data.scalars("update.norm", m).set_index("step")["value"]
        for step in range(6):
            assert got[step] == pytest.approx(before[step][m], rel=1e-5, abs=1e-12), (m, step)
    assert all(before[s]["branch"] == 0 for s in (0, 2, 4)) and all(before[s]["branch"] > 0 for s in (1, 3, 5))


def test_gradient_norms_are_computed_once_per_step_for_the_probe_and_the_sentinel(tmp_path, monkeypatch):
    """Architecture invariant 10: on a recording step the gradient probe and the sentinel read one shared
    computation of the per-parameter gradient norms (ProbeContext.grad_norms), and both record its values."""
    from dynascope.probes import base

    calls: list[int] = []
    real = base.gradient_norms

    def counting(grads, plan=None):
        calls.append(len(grads))
        return real(grads, plan)

    monkeypatch.setattr(base, "gradient_norms", counting)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(3)
    steps = 6
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=("gradients",)) as run:
        for _ in range(steps):
            x = torch.randn(16, 8, generator=g)
            loss = (model(x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss.detach())
    n = len(list(model.parameters()))
    assert calls == [n] * steps  # once per step, not once per instrument
    data = dynascope.load_run(tmp_path / "r")
    gn = data.scalars("grad.global_norm").set_index("step")["value"]
    assert len(gn) == steps and np.isfinite(gn.to_numpy()).all()


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.ReLU()),
                                  lambda: nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)])
def test_a_model_without_trainable_parameters_is_probed_without_stopping(tmp_path, make):
    model = make()
    with dynascope.probe(model, None, tmp_path / "r", every=1) as run:
        for _ in range(3):
            out = model(torch.randn(2, 4))
            run.step(loss=out.sum())
    data = dynascope.load_run(tmp_path / "r")
    assert data.meta["status"] == "finished"
    assert sorted(data.scalars("loss")["step"]) == [0, 1, 2]


def _losses_through_the_sentinel(losses, tmp_path) -> list[tuple[int, str]]:
    """The live sentinel fed the loss series step by step (constant gradients: no gradient event)."""
    model = nn.Linear(4, 1, bias=False)
    with dynascope.probe(model, None, tmp_path, every=10**9, probes=(),
                         sentinel=dynascope.Sentinel(drift=False, announce=False)) as run:
        for v in losses:
            model.weight.grad = torch.full_like(model.weight, 0.5)
            run.step(loss=float(v))
        return [(e.step, e.kind) for e in run.sentinel.events]


def _documented_loss_spikes(losses) -> list[int]:
    """docs/metrics.md, written out without dynascope: a loss is judged once 20 finite losses precede it,
    against the previous 20: above max(2 x median, median + 6 x 1.4826 x MAD) and above the median by at
    least 25% of the starting loss (the median of the first 3)."""
    start = float(np.median(losses[:3]))
    out = []
    for i in range(20, len(losses)):
        prev = np.asarray(losses[i - 20:i])
        med = float(np.median(prev))
        mad = float(np.median(np.abs(prev - med)))
        if losses[i] > max(2 * med, med + 6 * 1.4826 * mad, med + 0.25 * start):
            out.append(i)
    return out


def test_loss_spikes_are_judged_against_the_previous_20_losses(tmp_path):
    """A noisy loss around 1 (5% minibatch noise), a noisy start (step 8 at 2.6x: too early to judge), a run
    of five easy minibatches (0.4) and the loss back at its level after them (no spike: the previous 20
    losses are mostly at 1), and one real spike at step 60. A window of 5 losses would call the loss coming
    back after the easy stretch a spike (its median is 0.4); judging after 5 losses would call step 8 one."""
    rng = np.random.default_rng(7)
    losses = list(np.exp(0.05 * rng.standard_normal(80)))
    losses[8] = 2.6
    losses[40:45] = list(0.4 * np.exp(0.02 * rng.standard_normal(5)))
    losses[60] = 3.0
    assert _documented_loss_spikes(losses) == [60]
    assert _losses_through_the_sentinel(losses, tmp_path / "r") == [(60, "loss_spike")]
    # the same rule as dynascope.core.robust.spike_threshold, the online form the sentinel uses
    start = float(np.median(losses[:3]))
    for i in (45, 60):
        thr = spike_threshold(losses[i - 20:i], start, 0.25, min_history=20)
        assert (losses[i] > thr) == (i == 60), i


def test_module_jump_rule_against_minibatch_noise_and_the_starting_level():
    """The jump rule compares with the module's recent MAXIMUM and asks a rise of its starting level:
    heavy-tailed minibatch noise (values 20-40x the median now and then, as a BatchNorm net's per-module
    gradient norms near zero loss) is not a jump; a 20x rise of a norm that decayed 10,000x below where it
    started is not either; a clean 50x jump is."""
    from dynascope.probes.base import ProbeContext
    from dynascope.probes.sentinel import Sentinel

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ctx = ProbeContext(model, [], list(model.named_parameters()), None, ["0", "1"])
    sentinel = Sentinel(drift=False)
    sentinel.setup(ctx)
    assert sentinel.modules == ["0", "1"]
    rng = np.random.default_rng(0)
    noisy = np.exp(1.2 * rng.standard_normal(300))  # module 0's gradient norm: heavy-tailed noise
    assert (noisy[20:] > 10 * np.median(noisy)).sum() >= 5  # a median-based rule would fire here
    decayed = np.r_[np.full(10, 100.0), np.full(290, 0.01) * np.exp(0.05 * rng.standard_normal(290))]
    decayed[200] = 0.2  # 20x its recent maximum, far below its starting level
    events = []
    for s in range(300):
        buf = np.array([1.0, 1.0, noisy[s], decayed[s], 1.0, 1.0], dtype=np.float32)  # loss, gnorm, grads, updates
        events += sentinel._jumps(s, buf)
    assert events == []
    jump = np.array([1.0, 1.0, 1.0, 50 * decayed[:300].max(), 1.0, 1.0], dtype=np.float32)
    (e,) = sentinel._jumps(300, jump)
    assert e.kind == "grad_jump" and e.detail["modules"] == ["1"]
    assert e.value == pytest.approx(jump[3] / decayed[280:300].max(), rel=1e-5)  # against the last 20 values
