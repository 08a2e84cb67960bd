"""One pass per activation (dynascope.probes._fused): the fused statistics equal a float64 reference and the
eager path, the compiled kernels equal the eager path to 1e-5, training is bit-identical with them, and a
failing compile or kernel leaves the layout eager without losing a value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynascope
import dynascope.probes._fused as fused
from dynascope.probes.activations import ActivationProbe, _eager_statistics


def reference(x: torch.Tensor, cdim: int):
    """Per-channel ddof=0 variance and mean in float64, max |x|, non-zero count (NaN counts as non-zero)."""
    d = x.double()
    dims = tuple(i for i in range(x.ndim) if i != cdim)
    var, mean = torch.var_mean(d, dim=dims, correction=0)
    return var, mean, d.abs().max(), int((x != 0).sum())


CASES = {  # name: (shape, cdim, dtype, scale, offset)
    "rows": ((33, 40), 1, torch.float32, 0.5, 300.0),  # |mean| / std = 600: raw float32 sums would cancel
    "tokens": ((4, 9, 16), 2, torch.float32, 2.0, -1.0),
    "nchw": ((5, 6, 7, 3), 1, torch.float32, 1.0, 0.25),
    "bf16": ((12, 20), 1, torch.bfloat16, 1.0, 3.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_statistics_equal_float64_reference(case):
    shape, cdim, dtype, scale, offset = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(shape) * scale + offset  # negative entries in "tokens": max |x| is not max x there
    x = (x.relu() if case == "nchw" else x).to(dtype)
    x[0].view(-1)[:3] = 0.0
    var, mean, absmax, nnz = fused.output_statistics(x, cdim)
    rv, rm, ra, rn = reference(x, cdim)
    assert var.dtype == mean.dtype == absmax.dtype == torch.float32 and var.shape == (shape[cdim],)
    torch.testing.assert_close(mean.double(), rm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), rv, rtol=1e-5, atol=1e-7)
    assert float(absmax) == pytest.approx(float(ra), rel=1e-7) and int(nnz) == rn


def test_output_statistics_of_a_strided_output_and_nan():
    x = torch.randn(6, 4, 5).transpose(0, 2)  # not contiguous
    x[1, 2, 3] = float("nan")
    var, mean, absmax, nnz = fused.output_statistics(x, 1)
    rv, rm, _, rn = reference(x, 1)
    assert torch.isnan(absmax) and int(nnz) == rn  # NaN is non-zero, as in count_nonzero
    ok = ~torch.isnan(rm)
    assert ok.sum() == 3 and torch.isnan(var[~ok]).all()
    torch.testing.assert_close(var[ok].double(), rv[ok], rtol=1e-6, atol=1e-7)


@pytest.fixture()
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(fused, "_KERNELS", {})
    monkeypatch.setattr(fused, "_HOT", set())


KERNEL_CASES = {"rows": ((64, 40), 1, torch.float32), "nchw": ((4, 8, 5, 5), 1, torch.float32),
                "bf16-tokens": ((3, 7, 16), 2, torch.bfloat16)}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_compiled_kernel_equals_the_eager_path(case):
    shape, cdim, dtype = KERNEL_CASES[case]
    torch.manual_seed(1)
    stats = fused.FusedStatistics("on")
    for offset in (0.0, 200.0):  # the second call reuses the kernel, at |mean| >> std
        x = (torch.randn(shape) + offset).relu().to(dtype)
        entry = stats.kernel(x, cdim)
        got = stats.run(entry, x, cdim)
        assert got is not None, stats.describe()
        want = _eager_statistics(x, cdim)
        for g, w in zip(got[:3], want[:3]):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-6)
        assert int(got[3]) == int(want[3])
    assert stats.compiled == 1 and "1 output layout(s) fused" in stats.describe()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def train(run_dir, mode: str | None, steps: int = 4):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 4, (8,), generator=g))
               for _ in range(steps)]

    def loop(run=None):
        for x, y in batches:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss)

    if mode is None:
        loop()
        return model, None
    probe = ActivationProbe(fused=mode)
    with dynascope.probe(model, opt, run_dir, every=1, probes=(probe,), sentinel=False) as run:
        loop(run)
    return model, probe


def test_fused_run_records_the_eager_values_and_training_is_bit_identical(tmp_path, fresh_kernels):
    plain, _ = train(None, None)
    model, probe = train(tmp_path / "on", "on")
    for (k, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert probe.fused.compiled == 2 and not probe.fused.failures  # conv, bn and relu share a layout; fc
    train(tmp_path / "off", "off")
    on, off = dynascope.load_run(tmp_path / "on"), dynascope.load_run(tmp_path / "off")
    for metric in ("act.mean", "act.var", "act.channel_sq_mean", "act.channel_var", "act.absmax", "act.zero_frac"):
        a, b = on.pivot(metric), off.pivot(metric)
        assert a.shape == (4, 4) and list(a.columns) == list(b.columns)
        torch.testing.assert_close(torch.tensor(a.to_numpy()), torch.tensor(b.to_numpy()), rtol=1e-5, atol=1e-7)
    cov = on.coverage()
    reasons = cov.loc[cov["name"] == "act.*", "reason"].tolist()
    assert reasons and "2 output layout(s) fused" in reasons[0], reasons


def test_auto_compiles_a_layout_once_its_eager_cost_reaches_a_compile(monkeypatch, fresh_kernels):
    monkeypatch.setattr(fused, "FIRST_BUDGET_S", 0.05)
    stats = fused.FusedStatistics("auto")
    x = torch.randn(16, 24)
    entry = stats.kernel(x, 1)
    assert stats.run(entry, x, 1) is None  # nothing spent yet: the caller computes eagerly
    entry[1].spent += 0.049
    assert stats.run(entry, x, 1) is None and stats.compiled == 0
    entry[1].spent += 0.002
    assert stats.run(entry, x, 1) is not None and stats.compiled == 1
    assert stats.budget >= fused.MIN_BUDGET_S  # the next layout waits for the measured compile time
    assert stats.hot(entry)
    again = fused.FusedStatistics("auto")  # a later run of the same process: the kernel is there at once
    assert again.hot(again.kernel(x, 1))  # and small outputs of the layout go to the batched kernels at once
    assert not again.hot(again.kernel(torch.randn(5, 7), 1))
    assert again.run(again.kernel(x, 1), x, 1) is not None and again.compiled == 1
    off = fused.FusedStatistics("off")
    assert off.kernel(x, 1) is None and off.describe().startswith("eager")


def test_a_failing_compile_or_kernel_keeps_the_layout_eager_and_loses_nothing(tmp_path, monkeypatch, fresh_kernels):
    def broken(*args):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(fused, "compile_for", broken)  # the per-output and the batched kernels
    _, probe = train(tmp_path / "a", "on", steps=2)
    assert probe.fused.compiled == 0 and probe.fused.failures
    assert "compile failed: RuntimeError: no C++ compiler" in probe.fused.describe()
    data = dynascope.load_run(tmp_path / "a")
    assert data.pivot("act.var").notna().all().all() and data.pivot("act.var").shape == (2, 4)

    def bad_kernel(*args):
        raise AssertionError("expected size 8==9")

    monkeypatch.setattr(fused, "compile_for", lambda *args: bad_kernel)
    _, probe = train(tmp_path / "b", "on", steps=2)
    assert "kernel failed: AssertionError" in probe.fused.describe()
    assert dynascope.load_run(tmp_path / "b").pivot("act.var").notna().all().all()


def test_bad_mode_is_a_one_line_error():
    with pytest.raises(ValueError, match="fused must be one of 'auto', 'on', 'off', got 'yes'"):
        ActivationProbe(fused="yes")


class Breaks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return x * 1.5


def test_fused_kernels_inside_and_outside_a_compiled_model(tmp_path, fresh_kernels):
    """Hooks that Dynamo traces (on both sides of a graph break) run the eager ops inside the graph: no kernel
    is compiled or called from a traced hook, the values equal the eager run's."""

    def run(run_dir, compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), Breaks(), nn.Linear(12, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch._dynamo.reset()
        call = torch.compile(model, backend="aot_eager") if compiled else model
        probe = ActivationProbe(fused="on" if compiled else "off")
        g = torch.Generator().manual_seed(2)
        with dynascope.probe(model, opt, run_dir, every=1, probes=(probe,), sentinel=False) as r:
            for _ in range(3):
                loss = call(torch.randn(10, 6, generator=g) + 2).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                r.step(loss=loss)
        return [p.detach().clone() for p in model.parameters()], probe

    eager_params, _ = run(tmp_path / "eager", False)
    params, probe = run(tmp_path / "compiled", True)
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    assert probe.fused.compiled == 0 and not probe.fused.failures, probe.fused.describe()
    a, b = dynascope.load_run(tmp_path / "compiled"), dynascope.load_run(tmp_path / "eager")
    for metric in ("act.mean", "act.var", "act.absmax", "act.zero_frac"):
        x, y = a.pivot(metric), b.pivot(metric)
        assert x.shape == y.shape == (3, 4)
        torch.testing.assert_close(torch.tensor(x.to_numpy()), torch.tensor(y.to_numpy()), rtol=1e-5, atol=1e-6)


def test_environment_sets_the_default_mode(monkeypatch):
    monkeypatch.setenv("DYNASCOPE_FUSED", "off")
    assert ActivationProbe().fused.mode == "off" and ActivationProbe(fused="on").fused.mode == "on"
    monkeypatch.setenv("DYNASCOPE_FUSED", "maybe")
    with pytest.raises(ValueError, match="DYNASCOPE_FUSED must be one of auto, on, off, got 'maybe'"):
        ActivationProbe()


def test_batchnorm_probe_with_compiled_kernels_records_the_eager_values(tmp_path, fresh_kernels):
    from dynascope.probes.batchnorm import BatchNormProbe

    def run(run_dir, mode):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        probe = BatchNormProbe(fused=mode)
        g = torch.Generator().manual_seed(0)
        with dynascope.probe(model, opt, run_dir, every=1, probes=(probe,), sentinel=False) as r:
            for _ in range(3):
                loss = model(torch.randn(8, 3, 6, 6, generator=g) * 3 + 2).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                r.step(loss=loss)
        return probe, [b.clone() for b in model.buffers()]

    on, bufs_on = run(tmp_path / "on", "on")
    _, bufs_off = run(tmp_path / "off", "off")
    assert on.fused.compiled == 1 and not on.fused.failures
    assert all(torch.equal(a, b) for a, b in zip(bufs_on, bufs_off))  # the running statistics untouched
    a, b = dynascope.load_run(tmp_path / "on"), dynascope.load_run(tmp_path / "off")
    for metric in ("bn.mean_shift", "bn.var_ratio"):
        x, y = a.pivot(metric), b.pivot(metric)
        assert x.shape == y.shape == (3, 1)
        torch.testing.assert_close(torch.tensor(x.to_numpy()), torch.tensor(y.to_numpy()), rtol=1e-5, atol=1e-7)


class Reuse(nn.Module):
    """Small outputs of one layout, many per step: a module called three times (Chan's merge of deferred
    rows), a BatchNorm whose output an in-place residual add and an in-place ReLU change after its hook."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.relu = nn.ReLU(inplace=True)
        self.heads = nn.ModuleList(nn.Linear(6, 6) for _ in range(5))
        self.out = nn.Linear(6, 3)  # another layout: a block of its own, kept whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.lin(self.lin(x) * 0.5 + 3.0))  # three calls, different scales
        z = self.bn(h)
        z += h  # in place on the BatchNorm's output, after its hook
        z = self.relu(z)  # in place again
        return self.out(sum(head(z) for head in self.heads))


@pytest.mark.parametrize("max_bytes", [64 << 20, 2000], ids=["deferred", "buffer-full"])
def test_deferred_outputs_are_measured_as_returned_and_equal_the_eager_path(tmp_path, monkeypatch, fresh_kernels,
                                                                             max_bytes):
    monkeypatch.setattr(fused, "DEFER_MAX_BYTES", max_bytes)  # 2000 bytes: 4 rows of 384, then full

    def run(run_dir, mode):
        torch.manual_seed(0)
        model = Reuse()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        probe = ActivationProbe(fused=mode)
        g = torch.Generator().manual_seed(0)
        with dynascope.probe(model, opt, run_dir, every=1, probes=(probe,), sentinel=False) as r:
            for _ in range(3):
                loss = model(torch.randn(16, 6, generator=g)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                r.step(loss=loss)
            rows = [b.data.shape[0] for b in probe.fused.batches.values() if b.data is not None]
        assert not probe.fused.batches  # released at the end of the run
        return probe, rows, [p.detach().clone() for p in model.parameters()]

    on, rows, params_on = run(tmp_path / "on", "on")
    _, _, params_off = run(tmp_path / "off", "off")
    assert all(torch.equal(a, b) for a, b in zip(params_on, params_off))
    if max_bytes > 2000:
        assert rows == [16, 4]  # 3 + 1 + 1 + 5 rows a step: grown 4 -> 8 -> 16; out: 4
        assert on.fused.compiled == 2 and not on.fused.failures
    else:
        assert rows == [4]  # full: the other outputs (and the other layout) reduced in their hooks
        assert on.fused.compiled == 3  # the batched kernels and the per-output one
    a, b = dynascope.load_run(tmp_path / "on"), dynascope.load_run(tmp_path / "off")
    for metric in ("act.mean", "act.var", "act.channel_sq_mean", "act.absmax", "act.zero_frac"):
        x, y = a.pivot(metric), b.pivot(metric)
        assert x.shape == y.shape == (3, 9) and list(x.columns) == list(y.columns)
        torch.testing.assert_close(torch.tensor(x.to_numpy()), torch.tensor(y.to_numpy()), rtol=1e-5, atol=1e-6)
    # the BatchNorm's output as it returned it: no zero (the in-place add and ReLU came after its hook)
    assert (a.pivot("act.zero_frac")["bn"] == 0).all() and (a.pivot("act.zero_frac")["relu"] > 0).all()


def test_an_inference_mode_forward_in_a_recording_step(tmp_path, fresh_kernels):
    """An evaluation forward under torch.inference_mode (its outputs are inference tensors) in the same step as
    the training forward: the buffers stay normal tensors, nothing raises, the values equal the eager path's."""

    def run(run_dir, mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        with dynascope.probe(model, opt, run_dir, every=1, probes=(ActivationProbe(fused=mode),),
                             sentinel=False) as r:
            for _ in range(3):
                with torch.inference_mode():
                    model(torch.randn(5, 4, generator=g))
                loss = model(torch.randn(5, 4, generator=g)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                r.step(loss=loss)

    run(tmp_path / "on", "on")
    run(tmp_path / "off", "off")
    a, b = dynascope.load_run(tmp_path / "on"), dynascope.load_run(tmp_path / "off")
    for metric in ("act.mean", "act.var", "act.absmax", "act.zero_frac"):
        x, y = a.pivot(metric), b.pivot(metric)
        assert x.shape == y.shape == (3, 3)
        torch.testing.assert_close(torch.tensor(x.to_numpy()), torch.tensor(y.to_numpy()), rtol=1e-5, atol=1e-6)
