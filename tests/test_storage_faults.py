"""Storage faults never stop training (architecture invariant 2), tested with real faults: a full file
system (a tiny tmpfs), a read-only run directory (``chattr +i``), a removed run directory and a
database locked by another connection. Each time: training bit-identical to the run without
dynascope, exactly one warning naming the problem, the rows written before still load, and what had
to be dropped is recorded as ``store.dropped_rows`` once writing works again; the rows that were
not dropped are the reference run's rows, value for value."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.store import DB_NAME, ResilientWriter, RunStore

STEPS, FAULT_AT, HEAL_AT = 30, 10, 20
CAP = 40  # rows kept while failing (a step records ~70): the oldest are dropped and counted


def _train(run_dir: Path | None, fault: Callable[[], None] | None = None, heal: Callable[[], None] | None = None,
           heal_at: int = HEAL_AT) -> tuple[dict, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = None
        if run_dir is not None:
            run = dynascope.probe(model, opt, run_dir, every=1, flush_every=1)
            run.start()
        try:
            for s in range(STEPS):
                if s == FAULT_AT and fault is not None:
                    fault()
                if s == heal_at and heal is not None:
                    heal()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if run is not None:
                    run.step(loss=loss, lr=1e-2)
                    if s % 5 == 0:
                        run.mark("every5", s)
        finally:
            if run is not None:
                run.close()
    state = {"params": {k: v.clone() for k, v in model.state_dict().items()},
             "opt": opt.state_dict(), "rng": torch.get_rng_state()}
    ours = [str(w.message) for w in caught if "dynascope" in str(w.message)]
    return state, ours


def _same_state(a: dict, b: dict) -> None:
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for i, st in a["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["opt"]["state"][i][k])), (i, k)
    assert torch.equal(a["rng"], b["rng"])


def _rows(run_dir: Path) -> dict[tuple[int, str, str], float]:
    df = dynascope.load_run(run_dir)._query("SELECT step, metric, layer, value FROM scalars")
    return {(int(s), m, lay): float(v) for s, m, lay, v in zip(df["step"], df["metric"], df["layer"], df["value"])}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict]:
    bare, _ = _train(None)
    d = tmp_path_factory.mktemp("ref") / "run"
    probed, warned = _train(d)
    assert not warned
    _same_state(bare, probed)
    return bare, _rows(d)


@pytest.fixture()
def small_cap(monkeypatch):
    monkeypatch.setattr(ResilientWriter, "max_pending_rows", CAP)
    monkeypatch.setattr(ResilientWriter, "busy_timeout", 0.05)


def _check(run_dir: Path, reference: tuple[dict, dict], state: dict, warned: list[str], problem: str,
           before_kept: bool = True) -> dict:
    bare, ref_rows = reference
    _same_state(bare, state)  # training as without dynascope
    assert len(warned) == 1, warned
    assert "cannot write the run store" in warned[0] and problem in warned[0], warned[0]
    rows = _rows(run_dir)
    dropped = {k: v for k, v in rows.items() if k[1].startswith("store.")}
    got = {k: v for k, v in rows.items() if not k[1].startswith("store.")}
    assert set(got) <= set(ref_rows)
    for k, v in got.items():  # what was written is the reference run's value
        assert v == ref_rows[k] or (np.isnan(v) and np.isnan(ref_rows[k])), k
    loss_steps = sorted(s for s, m, _ in got if m == "loss")
    if before_kept:
        assert set(range(FAULT_AT)) <= set(loss_steps), "rows written before the fault were lost"
    assert set(range(HEAL_AT, STEPS)) <= set(loss_steps), "rows after recovery were not written"
    n_dropped = sum(v for (s, m, _), v in dropped.items() if m == "store.dropped_rows")
    assert len([k for k in dropped if k[1] == "store.dropped_rows"]) == 1
    if before_kept:
        assert n_dropped == len(set(ref_rows) - set(got)) > 0  # every missing row is counted, no more
    data = dynascope.load_run(run_dir)
    assert data.meta["status"] == "finished"
    marks = data.marks("every5")["value"].tolist()
    assert {25} <= set(marks)
    return rows


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_disk_full(tmp_path, reference, small_cap):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root")
    try:
        filler = mnt / "filler"
        state, warned = _train(mnt / "run", fault=lambda: _fill(filler), heal=lambda: filler.unlink())
        _check(mnt / "run", reference, state, warned, "full")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _chattr(flag: str, paths: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def test_read_only_run_directory(tmp_path, reference, small_cap):
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        _chattr("+i", [probe])
        _chattr("-i", [probe])
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"chattr +i is not available here ({exc}); as root, permissions alone do not make a "
                    "directory read-only")
    run_dir = tmp_path / "run"
    # the -shm file stays writable: SQLite maps it into memory, and an immutable mapping raises SIGBUS
    frozen = [run_dir, run_dir / DB_NAME, run_dir / (DB_NAME + "-wal"), run_dir / "meta.json", run_dir / "artifacts"]
    try:
        state, warned = _train(run_dir, fault=lambda: _chattr("+i", frozen), heal=lambda: _chattr("-i", frozen))
    finally:
        subprocess.run(["chattr", "-i", *map(str, frozen)], capture_output=True)
    _check(run_dir, reference, state, warned, "OperationalError")


def test_removed_run_directory(tmp_path, reference, small_cap):
    run_dir = tmp_path / "run"
    state, warned = _train(run_dir, fault=lambda: shutil.rmtree(run_dir), heal=lambda: None, heal_at=FAULT_AT + 1)
    rows = _check(run_dir, reference, state, warned, "was removed", before_kept=False)
    # the directory comes back at the next flush, with the rows from then on and the count of the episode
    loss_steps = sorted(s for s, m, _ in rows if m == "loss")
    assert loss_steps[0] >= FAULT_AT and set(range(FAULT_AT + 1, STEPS)) <= set(loss_steps)
    # the flush at FAULT_AT failed: its newest CAP rows waited, the others were dropped and counted
    at_fault = len([k for k in reference[1] if k[0] == FAULT_AT])
    assert len([k for k in rows if k[0] == FAULT_AT and not k[1].startswith("store.")]) == CAP
    assert [v for (s, m, _), v in rows.items() if m == "store.dropped_rows"] == [at_fault - CAP]


def test_locked_database(tmp_path, reference, small_cap):
    run_dir = tmp_path / "run"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        con = sqlite3.connect(run_dir / DB_NAME, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        holder.append(con)

    def unlock() -> None:
        holder[0].execute("COMMIT")
        holder[0].close()

    state, warned = _train(run_dir, fault=lock, heal=unlock)
    _check(run_dir, reference, state, warned, "locked")


def test_fault_that_lasts_past_close_never_raises(tmp_path, reference, small_cap):
    """Locked until after the session closed: close (final flush, meta.json) does not raise, the
    rows written before still load, and the run says it was running (its end could not be written)."""
    run_dir = tmp_path / "run"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        con = sqlite3.connect(run_dir / DB_NAME, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        holder.append(con)

    state, warned = _train(run_dir, fault=lock, heal=None)
    holder[0].execute("COMMIT")
    holder[0].close()
    _same_state(reference[0], state)
    assert len(warned) == 1 and "locked" in warned[0]
    loss = dynascope.load_run(run_dir).steps("loss")
    assert set(range(FAULT_AT)) <= set(loss.tolist()) and max(loss) < FAULT_AT


def test_artifacts_and_meta_during_a_fault_are_dropped_and_counted(tmp_path, small_cap):
    store = ResilientWriter(RunStore(tmp_path / "run"))
    store.write_scalars([(0, "loss", "", 1.0)])
    other = sqlite3.connect(tmp_path / "run" / DB_NAME, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.write_scalars([(1, "loss", "", 2.0)])
        assert store.write_artifact("spectrum", 1, {"eig": np.arange(3.0)}) is None
        store.write_meta({"status": "half"})
        store.mark(1, "task", 2)
        other.execute("COMMIT")
        other.close()
        store.write_scalars([(2, "loss", "", 3.0)])
        assert store.write_artifact("spectrum", 2, {"eig": np.arange(4.0)}) is not None
        store.close()
    assert len([w for w in caught if "dynascope" in str(w.message)]) == 1
    run = dynascope.load_run(tmp_path / "run")
    assert run.series("loss")[1].tolist() == [1.0, 2.0, 3.0]
    assert run.series("store.dropped_artifacts")[1].tolist() == [1.0]
    assert run.series("store.dropped_rows")[1].tolist() == [0.0]
    assert run.meta["status"] == "half" and run.marks("task")["value"].tolist() == [2]
    assert run.artifacts("spectrum")["step"].tolist() == [2]
