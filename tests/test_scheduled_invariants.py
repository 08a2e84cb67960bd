"""Invariant 1 for the calibration, noise-scale and collapse recorders: training with Calibration, NoiseScale and
Collapse scheduled is bit-identical to training without them (BatchNorm, dropout, SGD with momentum and
AdamW), and a failure in one of them is recorded, not raised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_invariants import Net, assert_identical, make_optimizer, run_state  # the invariant tests' harness

import dynascope


def _train(kind: str, run_dir, steps: int = 9) -> dict:
    g = torch.Generator().manual_seed(11)
    held = (torch.randn(40, 3, 8, 8, generator=g), torch.arange(40) % 5)

    def session(model, opt, data):
        sched = [dynascope.Calibration(every=3, batch=held),
                 dynascope.NoiseScale(every=3, batch=held, loss_fn=F.cross_entropy, micro_batches=4, mode="train"),
                 dynascope.NoiseScale(every=4, batch=held, loss_fn=F.cross_entropy, micro_batches=5),
                 dynascope.Collapse(every=3, batch=held),
                 dynascope.Collapse(every=4, batch=held, layer="bn1", mode="train")]
        return dynascope.probe(model, opt, run_dir, every=2, scheduled=sched, on_diagnostic_error="raise")

    return run_state(kind, steps, None if run_dir is None else session, seed=4321, data_seed=3)


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
