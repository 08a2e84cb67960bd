"""The run directory: durability under SIGKILL, readers during writes,
refusing / resuming / overwriting an existing run, bad-input errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.store import (
    DB_NAME,
    META_NAME,
    NotARunError,
    ResilientWriter,
    RunData,
    RunExistsError,
    RunStore,
    as_run,
)

REPO = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, torch, torch.nn as nn, torch.nn.functional as F
    sys.path.insert(0, {repo!r})
    import dynascope
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    with dynascope.probe(model, opt, {run!r}, every=1, flush_every=5, flush_seconds=1e9) as run:
        for s in range(10**9):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            run.step(loss=loss)
            if (s + 1) % 5 == 0:
                print(s, flush=True)  # steps 0..s are committed
""")


def test_sigkill_keeps_every_flushed_step_and_readers_work_during_writes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), run=str(run_dir))],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        committed = -1
        seen_while_running = None
        deadline = time.monotonic() + 120
        while committed < 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "writer died"
            committed = int(line)
            if committed >= 20 and seen_while_running is None:
                data = dynascope.load_run(run_dir)  # a reader while the writer writes
                seen_while_running = data.steps("loss")
                assert data.meta["status"] == "running"
                assert set(range(20)) <= set(seen_while_running)
                assert {"act.mean", "grad.norm", "update.angle"} <= set(data.metrics())
        assert committed >= 60
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    data = dynascope.load_run(run_dir)
    steps = set(data.steps("loss"))
    assert set(range(committed + 1)) <= steps, "a committed flush was lost"
    assert steps == set(range(max(steps) + 1)), "flushes are all-or-nothing"
    assert (max(steps) + 1) % 5 == 0
    assert set(data.steps("act.mean")) == steps
    for metric in ("act.mean", "grad.norm", "update.angle"):  # whole flushes: every layer at every step
        counts = data.scalars(metric).groupby("step").size()
        assert counts.nunique() == 1, metric
    assert data.meta["status"] == "running"  # it never finished
    try:
        from dynascope import report
    except ImportError:
        report = None
    if report is not None and callable(report):
        out = tmp_path / "killed.html"
        report([run_dir], out)
        assert out.stat().st_size > 1000


def _train(run_dir: Path, steps: int, **options) -> dynascope.Session:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with dynascope.probe(model, opt, run_dir, every=2, **options) as run:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    return run


def test_existing_run_refused_resumed_or_overwritten(tmp_path):
    run_dir = tmp_path / "exp"
    _train(run_dir, 5)
    before = dynascope.load_run(run_dir)
    assert list(before.steps("loss")) == [0, 1, 2, 3, 4]
    with pytest.raises(RunExistsError, match="resume=True.*overwrite=True"):
        _train(run_dir, 3)
    assert list(dynascope.load_run(run_dir).steps("loss")) == [0, 1, 2, 3, 4]  # untouched
    # resume: steps continue after the last recorded one
    _train(run_dir, 3, resume=True)
    data = dynascope.load_run(run_dir)
    assert list(data.steps("loss")) == list(range(8))
    assert list(data.steps("act.mean")) == [0, 2, 4, 6]
    assert data.meta["resumed_at"] == [5] and data.meta["steps"] == 8 and data.meta["status"] == "finished"
    # overwrite: the old rows are gone
    _train(run_dir, 2, overwrite=True)
    data = dynascope.load_run(run_dir)
    assert list(data.steps("loss")) == [0, 1]
    assert "resumed_at" not in data.meta
    with pytest.raises(ValueError, match="contradict"):
        _train(run_dir, 1, resume=True, overwrite=True)
    # a non-empty directory that is not a run is never written into silently
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="not a dynascope run"):
        _train(other, 1)
    assert (other / "notes.txt").read_text() == "keep me"


def test_resume_of_empty_directory_starts_at_zero(tmp_path):
    _train(tmp_path / "fresh", 2, resume=True)
    assert list(dynascope.load_run(tmp_path / "fresh").steps("loss")) == [0, 1]


def test_not_a_run_errors(tmp_path):
    with pytest.raises(NotARunError, match="not a directory"):
        dynascope.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunError, match="not a dynascope run"):
        dynascope.load_run(tmp_path / "empty")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotARunError):
        dynascope.load_run(f)


def test_unknown_metric_names_the_known_ones(tmp_path):
    _train(tmp_path / "r", 2)
    data = dynascope.load_run(tmp_path / "r")
    with pytest.raises(KeyError, match="grad.nrom.*recorded.*grad.norm"):
        data.scalars("grad.nrom")
    assert data.has("grad.norm") and not data.has("grad.nrom")


def test_store_roundtrip_nan_inf_artifacts_marks_meta(tmp_path):
    store = RunStore(tmp_path / "r")
    store.write_meta({"name": "x", "modules": ["b", "a"], "parameters": []})
    store.write_scalars([(0, "m", "a", 1.0), (0, "m", "b", float("nan")), (1, "m", "a", float("inf")),
                         (1, "m", "b", -float("inf")), (2, "loss", "", 0.5)])
    store.write_artifact("spectrum", 3, {"eig": np.arange(4.0)}, {"k": 4})
    store.write_artifact("spectrum", 3, {"eig": np.arange(5.0)}, {"k": 5})  # replaces the same (name, step)
    store.mark(2, "task", 1)
    store.close()
    data = dynascope.load_run(tmp_path / "r")
    assert data.metrics() == ["loss", "m"]
    m = data.pivot("m")
    assert list(m.columns) == ["b", "a"]  # model order from the metadata
    assert np.isnan(m.loc[0, "b"]) and m.loc[1, "a"] == np.inf and m.loc[1, "b"] == -np.inf
    arrays, meta = data.load_artifact("spectrum")
    assert arrays["eig"].tolist() == [0, 1, 2, 3, 4] and meta == {"k": 5}
    assert data.marks("task")["value"].tolist() == [1]
    assert json.loads((tmp_path / "r" / META_NAME).read_text())["name"] == "x"
    assert (tmp_path / "r" / DB_NAME).exists()
    with pytest.raises(KeyError, match="no artifact"):
        data.load_artifact("nope")


def test_as_run_takes_a_path_or_a_run_and_names_a_wrong_type(tmp_path):
    RunStore(tmp_path / "r").close()
    for path in (tmp_path / "r", str(tmp_path / "r")):
        run = as_run(path)
        assert type(run) is RunData and run.path == tmp_path / "r"
    assert type(as_run(tmp_path / "r", cls=dynascope.Run)) is dynascope.Run
    data = dynascope.load_run(tmp_path / "r")
    assert as_run(data) is data and as_run(data, cls=RunData) is data  # passed through unchanged
    with pytest.raises(NotARunError):
        as_run(tmp_path / "nothing")
    for wrong in (3, None, b"bytes", [str(tmp_path / "r")]):
        with pytest.raises(TypeError) as err:
            as_run(wrong)
        msg = str(err.value)
        assert "\n" not in msg and type(wrong).__name__ in msg and "RunData" in msg


def test_resilient_writer_reconnects_through_the_public_method(tmp_path, monkeypatch):
    """After a storage fault (the run directory removed) and after its store was closed, the writer
    makes the store writable again with RunStore.reconnect, and never touches RunStore's private members."""
    import ast
    import shutil
    import warnings

    import dynascope.store.resilient as resilient

    tree = ast.parse(Path(resilient.__file__).read_text())
    private = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, (ast.Name, ast.Attribute))
                      and ast.unparse(n.value) in ("store", "self.store") and n.attr.startswith("_")})
    assert private == []

    calls: list[bool] = []
    real = RunStore.reconnect

    def spy(self):
        calls.append(real(self))
        return calls[-1]

    monkeypatch.setattr(RunStore, "reconnect", spy)
    store = RunStore(tmp_path / "r")
    writer = ResilientWriter(store)
    assert store.busy_timeout == ResilientWriter.busy_timeout
    assert store.con.execute("PRAGMA busy_timeout").fetchone()[0] == int(ResilientWriter.busy_timeout * 1000)
    writer.write_scalars([(0, "loss", "", 1.0)])
    assert calls == []
    shutil.rmtree(tmp_path / "r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer.write_scalars([(1, "loss", "", 2.0)])  # the fault: the rows wait
        assert writer.fault is not None and calls == []
        writer.write_scalars([(2, "loss", "", 3.0)])  # a new database
    assert calls == [True] and writer.fault is None
    assert len([w for w in caught if "cannot write the run store" in str(w.message)]) == 1
    store.close()
    assert store.closed
    writer.write_scalars([(3, "loss", "", 4.0)])  # the same database, connected again
    assert calls == [True, False] and not store.closed
    writer.close()
    data = dynascope.load_run(tmp_path / "r")
    assert data.series("loss")[0].tolist() == [1, 2, 3]
    assert data.series("loss")[1].tolist() == [2.0, 3.0, 4.0]
    assert data.series("store.dropped_rows")[1].tolist() == [0.0]
