"""Architecture invariants 1, 3 and 5 for the live probes: probing never
changes training; no host-device transfer on steps that do not flush (one per
flush); hooks are removed on exit and on exceptions; memory stays flat.
Also: non-finite values are recorded as such and never crash."""

from __future__ import annotations

import gc
import math
import random
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope

DYNASCOPE_DIR = str(Path(dynascope.__file__).parent)


class Net(nn.Module):
    """BatchNorm and dropout (both consume state or RNG during training)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.drop2 = nn.Dropout(0.2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.bn(self.conv(x))))
        h = F.max_pool2d(h, 2).flatten(1)
        return self.head(self.drop2(F.relu(self.bn1(self.fc1(h)))))


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def scheduled_diagnostics(x: torch.Tensor, y: torch.Tensor) -> list:
    """Every scheduled diagnostic available in dynascope.probes (cheap settings)."""
    out = []
    try:
        from dynascope.probes.plasticity import Plasticity
        out.append(Plasticity(every=4, batch=x, layers=["drop", "drop2"]))
    except ImportError:  # pragma: no cover
        pass
    try:
        from dynascope.probes.landscape import Landscape
        out.append(Landscape(every=5, batch=(x, y), loss_fn=F.cross_entropy, resolution=3, dims=1,
                             keep_checkpoints=3))
    except ImportError:  # pragma: no cover
        pass
    try:
        from dynascope.probes.curvature import Curvature  # type: ignore[import-not-found]
        out.append(Curvature(every=5, batch=(x, y), loss_fn=F.cross_entropy, k=1))
    except ImportError:  # pragma: no cover
        pass
    return out


def run_state(kind: str, steps: int, session=None, *, seed: int = 1234, data_seed: int = 7, batches: int = 3,
              scalars=None) -> dict:
    """Net trained ``steps`` steps on ``batches`` fixed batches: the invariant tests' one training loop.
    ``session(model, opt, data)`` opens a probe around the loop (None: the bare loop); ``scalars(model)``,
    extra keywords of each ``run.step``. Returns what must not change (weights, gradients, buffers,
    optimizer state, the torch / Python / NumPy RNGs, the next random numbers, train mode)."""
    torch.manual_seed(seed)
    random.seed(1)
    np.random.seed(1)
    model = Net()
    opt = make_optimizer(kind, model)
    g = torch.Generator().manual_seed(data_seed)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(batches)]

    def loop(run=None):
        for s in range(steps):
            x, y = data[s % len(data)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss, **(scalars(model) if scalars else {}))

    if session is None:
        loop()
    else:
        with session(model, opt, data) as run:
            loop(run)
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # removed at close
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "opt": opt.state_dict(),
        "rng": torch.get_rng_state().clone(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
        "next_rand": torch.rand(3),
        "training": model.training,
    }


def train(kind: str, run_dir: Path | None, steps: int = 12) -> dict:
    def session(model, opt, data):
        return dynascope.probe(model, opt, run_dir, every=1, all_params=True,
                               scheduled=scheduled_diagnostics(*data[0]), flush_every=5)

    return run_state(kind, steps, None if run_dir is None else session, batches=4,
                     scalars=lambda model: {"acc": model.head.weight.sum() * 0})


def assert_identical(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_probing_never_changes_training(tmp_path, kind):
    plain = train(kind, None)
    probed = train(kind, tmp_path / "run")
    assert_identical(plain, probed)
    data = dynascope.load_run(tmp_path / "run")
    assert {"act.mean", "grad.norm", "update.angle", "plasticity.dead", "landscape.center_loss",
            "hessian.eig"} <= set(data.metrics())
    assert len(data.steps("update.angle")) == 12
    # and the probes really ran: an untouched copy of training would pass trivially otherwise
    assert "bn.running_mean" in plain["buffers"] and plain["opt"]["state"]


# ----------------------------------------------------------------------------- invariant 3
TRANSFERS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__",
             "__complex__")


class TransferCounter:
    """Counts calls of tensor-to-host conversions, split by whether dynascope code is on the stack."""

    def __init__(self) -> None:
        self.ours: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in TRANSFERS:
            orig = getattr(torch.Tensor, name, None)
            if orig is None:
                continue
            self._saved[name] = orig

            def wrapper(t, *a, __orig=orig, __name=name, **k):
                self.total[__name] = self.total.get(__name, 0) + 1
                f = sys._getframe(1)
                while f is not None:
                    if f.f_code.co_filename.startswith(DYNASCOPE_DIR):
                        self.ours[__name] = self.ours.get(__name, 0) + 1
                        break
                    f = f.f_back
                return __orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)

    def reset(self) -> None:
        self.ours.clear()
        self.total.clear()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_no_host_transfer_on_steps_without_flush_and_one_per_flush(tmp_path, kind):
    torch.manual_seed(0)
    model = Net()
    opt = make_optimizer(kind, model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    flush_every = 4
    per_step_ours, per_step_total, flush_counts = [], [], []
    with dynascope.probe(model, opt, tmp_path / "r", every=1, all_params=True, flush_every=flush_every,
                         flush_seconds=1e9) as run, TransferCounter() as counter:
        for s in range(12):
            counter.reset()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss, lr=torch.tensor(0.1))
            flushed = (s + 1) % flush_every == 0
            if flushed:
                flush_counts.append(dict(counter.ours))
            else:
                per_step_ours.append(dict(counter.ours))
                per_step_total.append(dict(counter.total))
    assert all(c == {} for c in per_step_ours), per_step_ours
    # a flush moves everything in exactly one .cpu() (then .numpy() of that host copy), nothing else
    assert len(flush_counts) == 3
    for c in flush_counts:
        assert c.get("cpu") == 1 and c.get("numpy", 0) <= 1, c
        assert not {k for k in c if k not in ("cpu", "numpy")}, c
    # the same loop without dynascope makes the same conversions (the optimizer's own, if any)
    counts_plain = []
    with TransferCounter() as counter:
        for _ in range(3):
            counter.reset()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            counts_plain.append(dict(counter.total))
    assert per_step_total[-1] == counts_plain[-1]
    data = dynascope.load_run(tmp_path / "r")
    assert list(data.steps("act.mean")) == list(range(12))


def test_counter_detects_a_syncing_probe(tmp_path):
    """The counter is able to fail: a probe calling .item() per step is caught."""

    class Syncing(dynascope.Probe):
        name = "syncing"

        def collect(self, step):
            v = self.session.model.head.weight.norm().item()
            return dynascope.Collected([("norm", "")], torch.tensor([v]))

    model = Net()
    opt = make_optimizer("sgd", model)
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=(Syncing(),), flush_every=100) as run, \
            TransferCounter() as counter:
        model(torch.randn(8, 3, 8, 8)).sum().backward()
        opt.step()
        run.step()
        assert counter.ours.get("item") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_no_cuda_sync_on_steps_without_flush(tmp_path):  # pragma: no cover - GPU only
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    with dynascope.probe(model, opt, tmp_path / "r", every=1, flush_every=1000, flush_seconds=1e9) as run:
        for s in range(6):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s >= 1:  # the first step builds cached layouts
                torch.cuda.set_sync_debug_mode("error")
            try:
                run.step(loss=loss)
            finally:
                torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- invariant 5
def hook_counts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    fwd = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return fwd, len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


def test_hooks_removed_on_exit_and_on_exception(tmp_path):
    model = Net()
    opt = make_optimizer("sgd", model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    assert hook_counts(model, opt) == (0, 0, 0)
    with dynascope.probe(model, opt, tmp_path / "a", every=1) as run:
        assert hook_counts(model, opt)[0] > 0 and hook_counts(model, opt)[1:] == (1, 1)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        run.step()
    assert hook_counts(model, opt) == (0, 0, 0)

    with pytest.raises(RuntimeError, match="boom"):
        with dynascope.probe(model, opt, tmp_path / "b", every=1) as run:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            run.step()
            model(x)  # mid-step
            raise RuntimeError("boom")
    assert hook_counts(model, opt) == (0, 0, 0)
    data = dynascope.load_run(tmp_path / "b")
    assert data.meta["status"] == "failed" and "boom" in data.meta["error"]
    assert list(data.steps("act.mean")) == [0]  # what was recorded before the error is kept

    # every=N: hooks are attached only on recording steps
    with dynascope.probe(model, opt, tmp_path / "c", every=3) as run:
        counts = []
        for _ in range(6):
            counts.append(hook_counts(model, opt)[0])
            F.cross_entropy(model(x), y).backward()
            opt.step()
            run.step()
    # one forward pre-hook stays on the root model while the session is open (it counts forward passes)
    assert [c > 1 for c in counts] == [True, False, False, True, False, False] and min(counts) == 1
    assert hook_counts(model, opt) == (0, 0, 0)


def test_no_reference_to_activations_survives_a_step(tmp_path):
    model = Net()
    opt = make_optimizer("sgd", model)
    refs = []
    model.fc1.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    with dynascope.probe(model, opt, tmp_path / "r", every=1, flush_every=1000) as run:
        for _ in range(3):
            loss = F.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 5, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            del loss
            gc.collect()
            assert all(r() is None for r in refs), "an activation outlived its step"


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for RSS")
def test_memory_flat_over_thousands_of_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    marks = {}
    with dynascope.probe(model, opt, tmp_path / "r", every=1, all_params=True, flush_every=50) as run:
        for s in range(2000):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            if s in (399, 1999):
                del loss
                gc.collect()
                marks[s] = (_live_tensors(), _rss_mb(), len(run._device_buf), len(run._scalar_buf))
    (t1, r1, _, _), (t2, r2, d2, s2) = marks[399], marks[1999]
    assert t2 <= t1, f"live tensors grew from {t1} to {t2}"
    assert d2 <= 50 * 3 and s2 <= 50, (d2, s2)
    assert r2 - r1 < 20, f"RSS grew by {r2 - r1:.1f} MB over 1600 steps"
    assert len(dynascope.load_run(tmp_path / "r").steps("act.mean")) == 2000


# ----------------------------------------------------------------------------- non-finite values
def test_nonfinite_values_are_recorded_not_crashing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x_inf = x.clone()
    x_inf[0, 0] = float("inf")  # one infinite input: +-inf (not NaN) in the first layer's outputs
    inputs = [x, x_inf, x.clone().fill_(float("nan"))]
    with dynascope.probe(model, opt, tmp_path / "r", every=1, flush_every=1) as run:
        with torch.no_grad():
            model[0].weight.mul_(1.0)  # keep finite for step 0
        for s, xi in enumerate(inputs):
            out = model(xi)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss, big=float("inf") if s == 1 else 1.0, nan=float("nan"))
    data = dynascope.load_run(tmp_path / "r")
    loss = data.scalars("loss")["value"].to_numpy()
    assert np.isfinite(loss[0]) and not np.isfinite(loss[1]) and np.isnan(loss[2])
    big = data.scalars("big")["value"].to_numpy()
    assert big[1] == math.inf and big[0] == 1.0
    assert np.isnan(data.scalars("nan")["value"]).all()
    absmax = data.pivot("act.absmax")
    assert absmax.loc[1, "0"] == math.inf, absmax
    assert np.isnan(absmax.loc[2, "0"])
    gn = data.scalars("grad.global_norm")["value"].to_numpy()
    assert np.isfinite(gn[0]) and not np.isfinite(gn[1:]).any()
    upd = data.pivot("update.angle")
    assert np.isfinite(upd.loc[0]).all() and upd.loc[2].isna().all()
    assert data.meta["status"] == "finished"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [16, 800, 5000])  # var_mean, float64-sums and shifted-sums bands of the hook
def test_activation_hook_never_modifies_outputs(tmp_path, dtype, width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Identity(), nn.Linear(width, 2)).to(dtype)
    x = torch.randn(8, 4, dtype=dtype)
    with torch.no_grad():
        want = model[0](x).clone()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with dynascope.probe(model, None, tmp_path / "r", every=1, probes=("activations",)) as run:
        model(x)
        run.step()
    assert torch.equal(seen[0], want)  # Identity's output is Linear's output: untouched by the probe's hooks
