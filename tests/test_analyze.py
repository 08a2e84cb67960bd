"""``dynascope analyze`` end to end on checkpoints the test writes."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynascope.commands import analyze as analyze_mod
from dynascope.commands.cli import main
from dynascope.diagnostics.weights import angular_change, stable_rank
from dynascope.store import RunStore, load_run

MODEL_SRC = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

def other():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)

def wrong_data():
    return torch.randn(10, 3), torch.zeros(10, dtype=torch.long)

def not_a_model():
    return 42
'''


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "usermodel.py").write_text(MODEL_SRC)
    return tmp_path


def _write_checkpoints(d: Path, steps=(0, 50, 100), name="ckpt_{step}.pt", key: str | None = "global_step") -> list:
    import importlib.util

    spec = importlib.util.spec_from_file_location("um", d.parent / "usermodel.py")
    um = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(um)
    model = um.make()
    x, y = um.data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    d.mkdir(exist_ok=True)
    states = []
    for step in range(max(steps) + 1):
        if step in steps:
            obj = {"model_state_dict": model.state_dict()}
            if key:
                obj[key] = step
            torch.save(obj, d / name.format(step=step))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            time.sleep(0.01)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return states


def _model_arg(workdir: Path) -> list[str]:
    return ["--model", f"{workdir / 'usermodel.py'}:make"]


def test_data_free_end_to_end(workdir: Path, capsys) -> None:
    states = _write_checkpoints(workdir / "ck")
    out = workdir / "run"
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "3 checkpoint(s) analyzed" in printed and "file key 'global_step'" in printed
    assert "stable_rank" in printed.splitlines()[0]  # the summary table header
    run = load_run(out)
    assert run.meta["source"] == "analyze"
    assert run.meta["parameters"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "0" in run.meta["modules"]
    assert list(run.steps("weight.norm")) == [0, 50, 100]
    norms = run.pivot("weight.norm")
    assert norms.loc[50, "0.weight"] == pytest.approx(float(states[1]["0.weight"].double().norm()))
    sr = run.pivot("weight.stable_rank")
    assert sr.loc[100, "2.weight"] == pytest.approx(stable_rank(states[2]["2.weight"]))
    assert set(run.layers("weight.alpha")) == {"0.weight", "2.weight"}
    ang = run.pivot("weight.angle_prev")
    assert list(ang.index) == [50, 100]
    expected = angular_change(states[0], states[1])
    assert ang.loc[50, "0.weight"] == pytest.approx(expected["0.weight"], rel=1e-9)
    assert ang.loc[50, ""] == pytest.approx(expected[""], rel=1e-9)
    assert set(run.layers("weight.magnitude")) == {"0", "2", ""}
    arrays, _ = run.load_artifact("weight.spectrum", step=100)
    np.testing.assert_allclose(arrays["0.weight"], torch.linalg.svdvals(states[2]["0.weight"].double()).numpy())
    marks = run.marks("checkpoint")
    assert list(marks["step"]) == [0, 50, 100]
    assert all(m["step_source"] == "file key 'global_step'" for m in marks["value"])
    from dynascope.reports.figures.plasticity import plasticity_units, weight_esd, weight_spectra_figure

    fig = weight_spectra_figure([run])
    assert fig is not None and [a.get_title() for a in fig.axes][:2] == [
        "stable rank", "power-law alpha of the ESD of W^T W"]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), sr["0.weight"].to_numpy())
    assert weight_esd([run]) is not None
    assert plasticity_units([run]) is None  # no data, no plasticity metrics


def test_with_data_loss_and_plasticity(workdir: Path) -> None:
    _write_checkpoints(workdir / "ck", steps=(0, 30))
    out = workdir / "run"
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "--data", f"{workdir / 'usermodel.py'}:data",
               "--plasticity", "-o", str(out), "--no-progress", "--report", str(workdir / "report.html")])
    assert rc == 0
    html = (workdir / "report.html").read_text()
    assert "Dead and dormant units" in html and "Weight spectra of checkpoints" in html
    run = load_run(out)
    assert run.meta["status"] == "finished"
    loss = run.pivot("loss")[""]
    assert loss.loc[30] < loss.loc[0]
    assert 0.0 <= run.pivot("accuracy").loc[30, ""] <= 1.0
    for metric in ("plasticity.dead", "plasticity.dormant", "plasticity.erank", "plasticity.srank"):
        assert run.layers(metric) == ["1"]
    assert run.meta["data"] == {"n_batches": 1, "n_samples": 64}


def test_curvature_and_landscape_flags(workdir: Path) -> None:
    _write_checkpoints(workdir / "ck", steps=(0, 20, 40))
    out = workdir / "run"
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "--data", f"{workdir / 'usermodel.py'}:data",
               "--hessian", "--hessian-k", "2", "--trace", "--trace-samples", "5", "--landscape", "--interpolate",
               "--resolution", "11", "-o", str(out),
               "--no-progress"])
    assert rc == 0
    run = load_run(out)
    eig = run.pivot("hessian.eig")
    assert list(eig.columns) == ["1", "2"] and (eig["1"] >= eig["2"]).all()
    assert run.has("hessian.trace")
    assert set(run.artifacts("landscape.surface")["step"]) == {0, 20, 40}
    interp = run.artifacts("landscape.interpolation")
    assert list(interp["step"]) == [20, 40] and interp["meta"].iloc[0]["step_a"] == 0
    arrays, _ = run.load_artifact("landscape.interpolation", step=40)
    t = arrays["t"]
    loss = run.pivot("loss")[""]
    # the endpoints of the interpolation are the two checkpoints' losses
    assert arrays["losses"][np.flatnonzero(t == 0.0)[0]] == pytest.approx(loss.loc[20], rel=1e-5)
    assert arrays["losses"][np.flatnonzero(t == 1.0)[0]] == pytest.approx(loss.loc[40], rel=1e-5)
    traj = run.artifacts("landscape.trajectory")
    assert list(traj["step"]) == [40]


def test_malicious_pickle_is_skipped_and_never_executed(workdir: Path, capsys) -> None:
    _write_checkpoints(workdir / "ck", steps=(0, 10))
    marker = workdir / "PWNED"
    sd = torch.load(workdir / "ck" / "ckpt_0.pt", weights_only=True)["model_state_dict"]
    torch.save({"state_dict": sd, "global_step": 5, "payload": _Evil(str(marker))}, workdir / "ck" / "ckpt_5.pt")
    out = workdir / "run"
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(out), "--no-progress"])
    assert rc == 0
    assert not marker.exists()
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "ckpt_5.pt" in printed and "--trust-checkpoint" in printed
    assert list(load_run(out).steps("weight.norm")) == [0, 10]
    # alone: exit code 2 with one line
    rc = main(["analyze", str(workdir / "ck" / "ckpt_5.pt"), *_model_arg(workdir), "-o", str(workdir / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and "pickled Python object" in err and "--trust-checkpoint" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    # --strict stops at it
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(workdir / "r3"), "--strict"])
    assert rc == 2 and not marker.exists()
    # with the flag it is read (and its payload runs: that is what trusting a file means)
    rc = main(["analyze", str(workdir / "ck" / "ckpt_5.pt"), *_model_arg(workdir), "-o", str(workdir / "r4"),
               "--trust-checkpoint", "--no-progress"])
    assert rc == 0 and marker.exists()


def test_corrupt_and_mismatched_checkpoints(workdir: Path, capsys) -> None:
    _write_checkpoints(workdir / "ck", steps=(0, 10))
    data = (workdir / "ck" / "ckpt_10.pt").read_bytes()
    (workdir / "ck" / "ckpt_20.pt").write_bytes(data[: len(data) // 3])
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(workdir / "run"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ckpt_20.pt" in out and "corrupt" in out
    rc = main(["analyze", str(workdir / "ck" / "ckpt_0.pt"), "--model", f"{workdir / 'usermodel.py'}:other",
               "-o", str(workdir / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and "shape mismatch" in err and "2.weight (4, 16) vs model (5, 16)" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
        (["--model", "usermodel.py:nope"], "has no attribute 'nope'"),
        (["--model", "usermodel.py:not_a_model"], "returned a int, not a torch.nn.Module"),
        (["--model", "usermodel.py"], "must look like pkg.module:factory"),
        (["--model", "usermodel.py:make", "--data", "usermodel.py:wrong_data"], "does not fit the model"),
        (["--model", "usermodel.py:make", "--hessian"], "--hessian needs --data"),
        (["--model", "usermodel.py:make", "--data", "usermodel.py:data", "--plasticity", "--plasticity-layers",
          "enc*"], "--plasticity: layers='enc*' matches no module"),
    ],
)
def test_bad_input_exits_2_with_one_line(workdir: Path, capsys, monkeypatch, args, message) -> None:
    _write_checkpoints(workdir / "ck", steps=(0,))
    monkeypatch.chdir(workdir)
    rc = main(["analyze", "ck", *args, "-o", "run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_missing_path_and_empty_directory(workdir: Path, capsys) -> None:
    rc = main(["analyze", str(workdir / "nope"), *_model_arg(workdir), "-o", str(workdir / "run")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    (workdir / "empty").mkdir()
    rc = main(["analyze", str(workdir / "empty"), *_model_arg(workdir), "-o", str(workdir / "run")])
    assert rc == 2 and "no checkpoints in directory" in capsys.readouterr().err


def test_resume_after_interruption(workdir: Path, monkeypatch, capsys) -> None:
    _write_checkpoints(workdir / "ck", steps=(0, 10, 20, 30))
    out = workdir / "run"
    real = analyze_mod._diagnose
    calls = []

    def interrupted(store, model, step, *a, **k):
        calls.append(step)
        if step == 20:
            raise KeyboardInterrupt
        return real(store, model, step, *a, **k)

    monkeypatch.setattr(analyze_mod, "_diagnose", interrupted)
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(out), "--no-progress"])
    assert rc == 130 and calls == [0, 10, 20]
    assert load_run(out).meta["status"] == "interrupted"
    assert list(load_run(out).marks("checkpoint")["step"]) == [0, 10]
    # rows left behind at step 20 by an attempt killed between writing and marking are replaced
    store = RunStore(out, mode="resume")
    store.write_scalars([(20, "weight.norm", "0.weight", 123.0)])
    store.close()

    calls.clear()
    monkeypatch.setattr(analyze_mod, "_diagnose", lambda store, model, step, *a, **k: (
        calls.append(step), real(store, model, step, *a, **k))[1])
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(out), "--no-progress"])
    assert rc == 0 and calls == [20, 30]
    assert "2 checkpoint(s) analyzed, 2 already recorded" in capsys.readouterr().out
    run = load_run(out)
    df = run.scalars("weight.norm")
    assert (df.groupby(["step", "layer"]).size() == 1).all()
    assert df[(df.step == 20) & (df.layer == "0.weight")]["value"].iloc[0] != 123.0
    # the angle at step 20 is measured against step 10, reloaded from its file
    assert math.isfinite(run.pivot("weight.angle_prev").loc[20, ""])
    assert list(run.marks("checkpoint")["step"]) == [0, 10, 20, 30]
    # a third run has nothing to do
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(out), "--no-progress"])
    assert rc == 0 and "0 checkpoint(s) analyzed, 4 already recorded" in capsys.readouterr().out


def test_steps_from_modification_time_when_nothing_else(workdir: Path, capsys) -> None:
    ck = workdir / "ck"
    _write_checkpoints(ck, steps=(0, 10, 20), name="w{step}.pt", key=None)
    # rename to names without digits; set mtimes so that the order is c, a, b
    for old, new, t in (("w0.pt", "c.pt", 100), ("w10.pt", "a.pt", 200), ("w20.pt", "b.pt", 300)):
        os.rename(ck / old, ck / new)
        os.utime(ck / new, (t, t))
    rc = main(["analyze", str(ck), *_model_arg(workdir), "-o", str(workdir / "run"), "--no-progress"])
    assert rc == 0
    assert "modification-time order" in capsys.readouterr().out
    run = load_run(workdir / "run")
    marks = run.marks("checkpoint")
    assert [Path(v["path"]).name for v in marks["value"]] == ["c.pt", "a.pt", "b.pt"]
    assert list(marks["step"]) == [0, 1, 2]


def test_refuses_a_live_run_directory(workdir: Path, capsys) -> None:
    _write_checkpoints(workdir / "ck", steps=(0,))
    store = RunStore(workdir / "live")
    store.write_meta({"source": "probe"})
    store.write_scalars([(0, "loss", "", 1.0)])
    store.close()
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "-o", str(workdir / "live")])
    assert rc == 2 and "not written by dynascope analyze" in capsys.readouterr().err
    meta = json.loads((workdir / "live" / "meta.json").read_text())
    assert meta["source"] == "probe"


def _load_usermodel(workdir: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("um_live", workdir / "usermodel.py")
    um = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(um)
    return um


SCHEDULED = ("hessian.", "landscape.", "plasticity.", "weight.magnitude")


def _scheduled_rows(run) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for metric in run.metrics():
        if metric.startswith(SCHEDULED):
            df = run.scalars(metric)
            assert len(df) == len(set(df["layer"])), f"{metric} recorded more than once per layer"
            out.update({(metric, lay): v for lay, v in zip(df["layer"], df["value"])})
    return out


def test_analyze_records_what_a_live_run_records(workdir: Path) -> None:
    """A live run with Curvature / Landscape / Plasticity at step 3 and `dynascope analyze` over a checkpoint
    of the weights at that step: the same metric names and the same values (same seed), and the same surface."""
    import dynascope
    from dynascope.probes.curvature import Curvature
    from dynascope.probes.landscape import Landscape
    from dynascope.probes.plasticity import Plasticity

    um = _load_usermodel(workdir)
    model = um.make()
    x, y = um.data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ce = nn.functional.cross_entropy
    step = 3
    (workdir / "ck").mkdir()
    with dynascope.probe(
        model, opt, workdir / "live", every=100,
        curvature=Curvature(at=[step], every=None, batch=(x, y), loss_fn=ce, k=2, trace=True, trace_samples=5,
                            seed=7),
        landscape=Landscape(at=[step], batch=(x, y), loss_fn=ce, dims=1, resolution=7, seed=7, keep_checkpoints=0),
        plasticity=Plasticity(at=[step], batch=(x, y)),
    ) as run:
        for s in range(step + 1):
            loss = ce(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss)
            if s == step:  # the weights the scheduled diagnostics saw at this step
                torch.save({"model_state_dict": model.state_dict(), "global_step": s}, workdir / "ck" / "c.pt")
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "--data", f"{workdir / 'usermodel.py'}:data",
               "--hessian", "--hessian-k", "2", "--trace", "--trace-samples", "5", "--landscape", "--resolution", "7",
               "--plasticity", "--seed", "7", "-o", str(workdir / "offline"), "--no-progress"])
    assert rc == 0
    live, offline = load_run(workdir / "live"), load_run(workdir / "offline")
    got, want = _scheduled_rows(offline), _scheduled_rows(live)
    # the optimizer's threshold needs the optimizer, which a checkpoint analysis does not have
    assert ("hessian.threshold", "") in want
    want.pop(("hessian.threshold", ""))
    assert set(got) == set(want)
    assert {m for m, _ in got} == {
        "hessian.eig", "hessian.eig_converged", "hessian.trace", "hessian.trace_stderr", "hessian.trace_estimator",
        "hessian.n_hvp", "landscape.center_loss", "plasticity.dead", "plasticity.dormant", "plasticity.erank",
        "plasticity.srank", "weight.magnitude"}
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-9), key
    assert list(offline.scalars("weight.magnitude")["step"].unique()) == [step]  # recorded once, not twice
    a_live, m_live = live.load_artifact("landscape.surface", step=step)
    a_off, m_off = offline.load_artifact("landscape.surface", step=step)
    assert set(a_live) == set(a_off)
    for k in a_live:
        np.testing.assert_allclose(a_off[k], a_live[k], rtol=1e-6)
    assert m_off["center_loss"] == pytest.approx(m_live["center_loss"], rel=1e-6)


def test_interpolation_barrier_between_consecutive_checkpoints(workdir: Path) -> None:
    """--interpolate goes through the live Landscape (interpolation="consecutive"): one curve per checkpoint
    after the first, from the previous one, and the barrier read off the curve."""
    _write_checkpoints(workdir / "ck", steps=(0, 10, 20))
    rc = main(["analyze", str(workdir / "ck"), *_model_arg(workdir), "--data", f"{workdir / 'usermodel.py'}:data",
               "--interpolate", "--resolution", "9", "-o", str(workdir / "run"), "--no-progress"])
    assert rc == 0
    run = load_run(workdir / "run")
    assert not run.has("landscape.center_loss")  # no surfaces without --landscape
    barrier = run.pivot("landscape.interpolation_barrier")[""]
    assert list(barrier.index) == [10, 20]
    for step, prev in ((10, 0), (20, 10)):
        arrays, meta = run.load_artifact("landscape.interpolation", step=step)
        assert (meta["step_a"], meta["step_b"]) == (prev, step)
        t, losses = arrays["t"], arrays["losses"]
        inside = losses[(t >= 0) & (t <= 1)]
        ends = max(losses[t == 0.0][0], losses[t == 1.0][0])
        assert barrier.loc[step] == pytest.approx(float(inside.max() - ends), abs=1e-12)
        assert barrier.loc[step] >= 0
