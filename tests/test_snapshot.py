"""snapshot_every: the state kept in host memory, written on an event, reloaded with weights_only=True,
and a replay from it that reproduces the original steps bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import dynascope
from dynascope.capture.snapshot import load_snapshot, rng_state, set_rng_state, snapshots

FAULT = 47  # the learning rate is x100 at steps 47-49


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 1))


def _steps(model, opt, run, start: int, stop: int) -> list[float]:
    """Steps start..stop-1; the batches come from the global RNGs (torch, NumPy, random), so a replay
    needs their state back."""
    losses = []
    for s in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = 0.01 * (100 if FAULT <= s < FAULT + 3 else 1)
        x = torch.randn(32, 8) + float(np.random.rand()) * 0.01 + random.random() * 0.01
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step(loss=loss)
        losses.append(loss.item())
    return losses


def test_snapshot_written_on_an_event_replays_the_steps_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with dynascope.probe(model, opt, tmp_path / "r", every=10**9, snapshot_every=10) as run:
        losses = _steps(model, opt, run, 0, 70)
    data = dynascope.load_run(tmp_path / "r")
    ev = data.events()
    first = int(ev["step"].min())
    assert FAULT <= first <= FAULT + 2, ev
    table = snapshots(data)
    assert table["step"].iloc[0] == 40 and table["event_step"].iloc[0] == first  # the last one before the event
    assert table["nbytes"].iloc[0] > 3 * sum(p.numel() * 4 for p in model.parameters())  # weights + Adam's 2 moments
    # the file is plain tensors and numbers: it loads with weights_only=True
    raw = torch.load(table["file"].iloc[0], weights_only=True)
    assert raw["step"] == 40

    snap = load_snapshot(tmp_path / "r")
    assert data.snapshot().step == snap.step == 40 and data.snapshots().equals(table)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 1))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    torch.manual_seed(123)  # whatever the RNGs hold now, restore puts the snapshot's state back
    np.random.seed(123)
    random.seed(123)
    start = snap.restore(fresh, fresh_opt)
    assert start == 40
    with dynascope.probe(fresh, fresh_opt, tmp_path / "replay", every=1) as replay:
        again = _steps(fresh, fresh_opt, replay, start, 60)
    assert again == losses[40:60]  # bit for bit, the fault included
    assert dynascope.load_run(tmp_path / "replay").has("act.mean")  # every probe on during the replay


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_snapshot_bad_input_and_missing_files(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="snapshot_every must be a positive integer"):
        dynascope.probe(model, opt, tmp_path / "a", snapshot_every=0)
    with pytest.raises(ValueError, match="needs the sentinel"):
        dynascope.probe(model, opt, tmp_path / "b", sentinel=False, snapshot_every=10)
    with dynascope.probe(model, opt, tmp_path / "quiet", snapshot_every=5) as run:  # no event: nothing written
        for _ in range(30):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    assert snapshots(tmp_path / "quiet").empty
    with pytest.raises(FileNotFoundError, match="wrote no snapshot"):
        load_snapshot(tmp_path / "quiet")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="not a readable dynascope snapshot"):
        load_snapshot(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a dynascope snapshot"):
        load_snapshot(other)


def test_the_snapshot_written_is_the_newest_that_precedes_the_event():
    """An event is read one or more steps late on CUDA: the newest snapshot may postdate it."""
    from dynascope.capture.snapshot import Snapshotter

    class Store:
        def __init__(self):
            self.written = []

        def write_file(self, name, step, save, suffix, meta):
            self.written.append((name, step, meta["event_step"]))

    model = _model()
    keeper = Snapshotter(10)
    for step in (30, 40, 50):
        keeper.take(step, model, [])
    store = Store()
    keeper.write(store, "loss_spike", 47)
    keeper.write(store, "warning", 48)  # written once per snapshot
    keeper.write(store, "loss_spike", 20)  # none precedes it (two are kept)
    assert store.written == [("snapshot", 40, 47)]


def test_snapshots_and_their_writes_leave_training_bit_identical(tmp_path):
    class Bare:
        def step(self, **_):
            pass

    def train(run_factory):
        torch.manual_seed(1)
        np.random.seed(1)
        random.seed(1)
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with run_factory(model, opt) as run:
            losses = _steps(model, opt, run, 0, 60)  # the fault at 47: events, a snapshot written
        return losses, [p.detach().clone() for p in model.parameters()], torch.rand(3), np.random.rand(), \
            random.random()

    class Nothing:
        def __init__(self, *_):
            pass

        def __enter__(self):
            return Bare()

        def __exit__(self, *_):
            pass

    plain = train(Nothing)
    probed = train(lambda m, o: dynascope.probe(m, o, tmp_path / "r", every=7, snapshot_every=5))
    assert not snapshots(tmp_path / "r").empty
    assert plain[0] == probed[0]
    assert all(torch.equal(a, b) for a, b in zip(plain[1], probed[1]))
    assert torch.equal(plain[2], probed[2]) and plain[3] == probed[3] and plain[4] == probed[4]  # RNGs untouched


def test_a_snapshot_that_cannot_be_written_turns_snapshots_off_not_training(tmp_path):
    torch.manual_seed(1)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.param_groups[0]["hook"] = lambda: None  # a user's callable in a param group: it does not pickle
    with pytest.warns(RuntimeWarning, match="snapshot_every is off"):
        with dynascope.probe(model, opt, tmp_path / "r", every=10**9, snapshot_every=10) as run:
            losses = _steps(model, opt, run, 0, 60)
    assert len(losses) == 60
    data = dynascope.load_run(tmp_path / "r")
    assert snapshots(data).empty and not data.events().empty
    assert data.scalars("diagnostic.failed", "snapshot")["value"].tolist() == [1.0]
