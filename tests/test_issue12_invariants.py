"""Invariant 1 for the issue-12 recorders: training with Calibration, NoiseScale and Collapse scheduled is
bit-identical to training without them (BatchNorm, dropout, SGD with momentum and AdamW), and a failure in
one of them is recorded, not raised."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope


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


def assert_identical(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _train(kind: str, run_dir, steps: int = 9) -> dict:
    torch.manual_seed(4321)
    random.seed(1)
    np.random.seed(1)
    model = Net()
    opt = make_optimizer(kind, model)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    held = (torch.randn(40, 3, 8, 8, generator=g), torch.arange(40) % 5)

    def loop(run=None):
        for s in range(steps):
            x, y = data[s % len(data)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss)

    if run_dir is None:
        loop()
    else:
        sched = [dynascope.Calibration(every=3, batch=held),
                 dynascope.NoiseScale(every=3, batch=held, loss_fn=F.cross_entropy, micro_batches=4, mode="train"),
                 dynascope.NoiseScale(every=4, batch=held, loss_fn=F.cross_entropy, micro_batches=5),
                 dynascope.Collapse(every=3, batch=held),
                 dynascope.Collapse(every=4, batch=held, layer="bn1", mode="train")]
        with dynascope.probe(model, opt, run_dir, every=2, scheduled=sched, on_diagnostic_error="raise") as run:
            loop(run)
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "grads": {k: v.grad.clone() for k, v in model.named_parameters()},
            "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
            "opt": opt.state_dict(), "rng": torch.get_rng_state().clone(), "next": torch.rand(3),
            "training": model.training}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_training_is_bit_identical_with_the_recorders(tmp_path, kind):
    plain = _train(kind, None)
    probed = _train(kind, tmp_path / "run")
    assert_identical(plain, probed)
    data = dynascope.load_run(tmp_path / "run")
    assert {"calibration.ece", "gns.trace_cov", "collapse.nc1"} <= set(data.metrics())
    assert set(data.layers("collapse.nc1")) == {"head", "bn1"}
    assert not data.has("diagnostic.failed")


def test_a_failing_recorder_is_recorded_and_training_goes_on(tmp_path):
    model = Net()
    opt = make_optimizer("sgd", model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    bad = dynascope.Collapse(every=2, batch=(x, torch.zeros(8, dtype=torch.long)))  # one class: cannot measure
    with pytest.warns(RuntimeWarning, match="Collapse failed"):
        with dynascope.probe(model, opt, tmp_path / "run", every=2, scheduled=[bad]) as run:
            for _ in range(3):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.step(loss=loss)
    data = dynascope.load_run(tmp_path / "run")
    assert set(data.scalars("diagnostic.failed")["layer"]) == {"Collapse"}
