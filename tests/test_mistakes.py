"""A new user's mistakes each get one clear line: run.step never called or called twice per step, resuming with
another model, Ctrl-C, a run_dir of the wrong type, a closed pipe, a parent folder of runs, a copied run, and
the coverage table's expected gaps folded into one line each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dynascope
from dynascope.commands.cli import main


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def _train(path: Path, steps: int = 3, model: nn.Module | None = None, calls_per_step: int = 1,
           **options) -> Path:
    model = model if model is not None else _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dynascope.probe(model, opt, path, every=1, **options) as run:
        for _ in range(steps):
            loss = model(torch.randn(5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for _ in range(calls_per_step):
                run.step(loss=loss)
    return Path(path)


# -- 1. run.step() never called -----------------------------------------------------------------------------
def test_run_step_never_called_warns_at_close_and_the_report_and_check_say_so(tmp_path, capsys):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"run\.step\(\) was never called: nothing was recorded") as caught:
        with dynascope.probe(model, opt, tmp_path / "r", every=1):
            for _ in range(3):
                loss = model(torch.randn(5, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    assert len([w for w in caught if "never called" in str(w.message)]) == 1
    assert "\n" not in str(caught[0].message)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["steps"] == 0 and meta["status"] == "finished"
    found = dynascope.findings(tmp_path / "r")
    hit = found[found["rule"] == "run_step_never_called"]
    assert len(hit) == 1 and hit.iloc[0]["severity"] == "warning"
    assert "run.step() was never called" in hit.iloc[0]["message"]
    assert main(["check", str(tmp_path / "r")]) == 1  # the default --fail-on warning
    assert "run.step() was never called" in capsys.readouterr().out
    page = dynascope.report(tmp_path / "r", tmp_path / "r.html", progress=False).read_text()
    assert "nothing recorded: run.step() was never called" in page
    assert "5 of 5 modules recorded" not in page and "3 of 3 modules recorded" not in page
    assert main(["ls", str(tmp_path / "r")]) == 0
    assert "run.step() was never called" in capsys.readouterr().out


def test_a_run_that_steps_or_fails_before_its_first_step_does_not_get_the_never_called_line(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(tmp_path / "ok")
        with pytest.raises(ZeroDivisionError), dynascope.probe(_net(), None, tmp_path / "crash"):
            1 / 0  # noqa: B018
    assert "run_step_never_called" not in set(dynascope.findings(tmp_path / "ok")["rule"])
    assert "run_step_never_called" not in set(dynascope.findings(tmp_path / "crash")["rule"])


# -- 2. run.step() twice per training step --------------------------------------------------------------------
def test_run_step_called_twice_per_step_warns_once(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"run\.step\(\) is called twice per training step") as caught:
        _train(tmp_path / "r", steps=6, calls_per_step=2)
    assert len([w for w in caught if "twice per training step" in str(w.message)]) == 1
    assert "\n" not in str(caught[0].message)


@pytest.mark.parametrize("loop", ["plain", "every 5", "accumulation", "skipped batches", "eval-only steps",
                                  "no forward"])
def test_loops_with_one_run_step_per_step_do_not_warn(tmp_path, loop):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dynascope.probe(model, opt, tmp_path / "r", every=5 if loop == "every 5" else 1) as run:
            for s in range(12):
                if loop == "no forward":  # the model is driven through .forward, which runs no hook
                    loss = model.forward(torch.randn(5, 4)).pow(2).mean()
                elif loop == "skipped batches" and s in (3, 8):
                    run.step()  # a bad batch skipped, the step still counted
                    continue
                elif loop == "eval-only steps" and s >= 6:
                    run.step(acc=0.5)  # no forward pass: steps the loop counts without training
                    continue
                else:
                    for _ in range(3 if loop == "accumulation" else 1):
                        loss = model(torch.randn(5, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.step(loss=loss)
    assert not [w for w in caught if "twice" in str(w.message) or "never called" in str(w.message)]


def test_the_forward_counter_under_torch_compile(tmp_path):
    """The counting hook is never traced into a graph (fullgraph=True compiles), a loop over a compiled copy
    of the probed model does not warn, and a doubled run.step() over the compiled model itself does."""
    torch._dynamo.reset()
    try:
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with dynascope.probe(model, opt, tmp_path / "copy", every=2, probes=("gradients",)) as run:
                call = torch.compile(model, backend="eager", fullgraph=True)
                for _ in range(6):
                    loss = call(torch.randn(5, 4)).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    run.step(loss=loss)
        assert not [w for w in caught if "twice" in str(w.message)]
        torch._dynamo.reset()
        compiled = torch.compile(_net(), backend="eager", fullgraph=True)
        with pytest.warns(RuntimeWarning, match="twice per training step"):
            _train(tmp_path / "doubled", steps=4, model=compiled, calls_per_step=2, probes=("gradients",))
    finally:
        torch._dynamo.reset()


# -- 3. resume=True with another model ------------------------------------------------------------------------
class _First(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.l1(x)))


class _Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 16)  # recorded as (8, 4)
        self.head = nn.Linear(16, 3)  # new; fc missing


def test_resume_with_a_different_model_is_refused_in_one_line(tmp_path):
    path = _train(tmp_path / "r", model=_First())
    before = (path / "meta.json").read_text()
    with pytest.raises(ValueError) as err:
        dynascope.probe(_Other(), None, path, resume=True).start()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"resume: the run at {path} recorded parameters that differ from this model's: missing "
                          "'fc.weight', new 'head.weight', 'l1.weight' shape (8, 4) vs (16, 4) and 3 more"), msg
    assert (path / "meta.json").read_text() == before  # not overwritten
    assert dynascope.load_run(path).steps("loss").tolist() == [0, 1, 2]  # the run is intact
    with pytest.raises(ValueError, match=r"'l1.weight' shape \(8, 4\) vs \(16, 4\), 'l1.bias' shape \(8,\) vs "):
        dynascope.probe(_First(width=16), None, path, resume=True).start()


def test_resume_with_the_same_model_and_runs_without_shapes(tmp_path):
    path = _train(tmp_path / "r", steps=2)
    _train(path, steps=2, resume=True)  # the same architecture: accepted
    assert json.loads((path / "meta.json").read_text())["steps"] == 4
    meta = json.loads((path / "meta.json").read_text())
    del meta["parameter_shapes"]  # a run written before the shapes were stored: names only
    (path / "meta.json").write_text(json.dumps(meta))
    _train(path, steps=1, resume=True, model=_net(width=8))
    with pytest.raises(ValueError, match="missing '2.weight'"):
        dynascope.probe(nn.Sequential(nn.Linear(4, 8)), None, path, resume=True).start()


# -- 4. Ctrl-C ------------------------------------------------------------------------------------------------
def test_keyboard_interrupt_is_status_interrupted_other_errors_stay_failed(tmp_path, capsys):
    for name, exc in (("int", KeyboardInterrupt), ("err", RuntimeError)):
        model = _net()
        with pytest.raises(exc), dynascope.probe(model, None, tmp_path / name, every=1) as run:
            model(torch.randn(2, 4)).sum().backward()
            run.step()
            raise exc()
    assert json.loads((tmp_path / "int" / "meta.json").read_text())["status"] == "interrupted"
    assert json.loads((tmp_path / "err" / "meta.json").read_text())["status"] == "failed"
    assert main(["ls", str(tmp_path / "int")]) == 0
    assert "status interrupted" in capsys.readouterr().out
    from dynascope.reports.html import run_summary

    table = dict(run_summary([dynascope.load_run(tmp_path / "int"), dynascope.load_run(tmp_path / "err")]))
    assert table["status"] == ["interrupted", "failed"]
    assert "(interrupted)" in dynascope.load_run(tmp_path / "int")._repr_html_()


# -- 5. run_dir of the wrong type -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, name", [(123, "int"), (b"runs/x", "bytes"), (["runs/x"], "list")])
def test_run_dir_of_the_wrong_type_is_one_type_error(tmp_path, bad, name):
    with pytest.raises(TypeError) as err:
        dynascope.probe(_net(), None, bad)
    assert str(err.value) == f"run_dir must be a str or os.PathLike, got {name}"


def test_run_dir_pathlike_still_accepted(tmp_path):
    assert _train(tmp_path / "r").joinpath("meta.json").exists()  # pathlib.Path
    _train(str(tmp_path / "s"))


# -- 6. a closed pipe -----------------------------------------------------------------------------------------
def test_ls_into_a_closed_pipe_ends_quietly(tmp_path):
    path = _train(tmp_path / "r")
    env = dict(os.environ, PYTHONUNBUFFERED="")
    proc = subprocess.Popen([sys.executable, "-m", "dynascope", "ls", str(path), str(path), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # `| head -0`: the reader has gone before the first line
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert rc == 141


# -- 7. a parent folder of runs -------------------------------------------------------------------------------
def test_report_and_ls_on_a_folder_of_runs(tmp_path, capsys):
    parent = tmp_path / "runs"
    _train(parent / "b")
    _train(parent / "sweep" / "a")
    (parent / "notes").mkdir()
    out = tmp_path / "all.html"
    assert main(["report", str(parent), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.err.strip() == f"dynascope report: {parent} is not a run; found 2 runs inside it"
    page = out.read_text()
    assert ">b<" in page and ">a<" in page
    assert main(["ls", str(parent)]) == 0
    cap = capsys.readouterr()
    assert "found 2 runs inside it" in cap.err
    assert cap.out.index(f"({parent / 'b'})") < cap.out.index(f"({parent / 'sweep' / 'a'})")  # sorted by path
    empty = tmp_path / "empty"
    (empty / "deep").mkdir(parents=True)
    assert main(["report", str(empty), "-o", str(tmp_path / "e.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a dynascope run" in err


# -- 8. a copied run ------------------------------------------------------------------------------------------
def test_a_copied_run_is_named_after_its_folder_unless_named_explicitly(tmp_path):
    _train(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert dynascope.load_run(tmp_path / "a").name == "a"
    assert dynascope.load_run(tmp_path / "b").name == "b"
    _train(tmp_path / "c", name="baseline")
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    assert dynascope.load_run(tmp_path / "d").name == "baseline"
    _train(tmp_path / "e", name="e")  # an explicit name equal to the folder's: kept on copy
    shutil.copytree(tmp_path / "e", tmp_path / "f")
    assert dynascope.load_run(tmp_path / "f").name == "e"
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    del meta["name_given"]  # a run written before name_given: its stored name
    (tmp_path / "b" / "meta.json").write_text(json.dumps(meta))
    assert dynascope.load_run(tmp_path / "b").name == "a"


# -- 9. coverage: only what a user would act on ---------------------------------------------------------------
class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.drops = nn.ModuleList([nn.Dropout(0.1) for _ in range(3)])  # declared, never called
        self.skip = nn.Identity()  # never called
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(8, 8)  # never called, requires a gradient: to act on
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj: used through its weights
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.frozen(self.fc(x))))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h).mean(1)


def test_coverage_shows_what_to_act_on_and_folds_what_is_missing_by_design(tmp_path, capsys):
    model = _Noisy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        for _ in range(2):
            loss = model(torch.randn(2, 5, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    full = dynascope.load_run(tmp_path / "r").coverage().set_index(["kind", "name"])
    assert ("module", "drops.0") in full.index and ("metric", "update.*@fc.bias") in full.index  # the full table
    assert main(["ls", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    cov = out[out.index("coverage:"):out.index("marks (")]
    lines = cov.strip().splitlines()[1:]
    assert "- module unused: not called" in cov
    assert "- parameter unused.weight: no gradient at any recording step" in cov
    assert "4 modules without statistics by design (parameter-free: not called, or passing their input " \
           "through): 3 Dropout, 1 Identity" in cov
    assert "1 module without statistics by design (their parent uses their weights without calling them" in cov
    assert "2 frozen parameters without gradient statistics by design" in cov
    assert "1-D parameters without update statistics by design (all_params=True records them)" in cov
    assert "drops.0" not in cov and "update.*@" not in cov and "frozen.weight" not in cov
    assert len(lines) <= 8, cov
    page = dynascope.report(tmp_path / "r", tmp_path / "r.html", progress=False).read_text()
    assert "module unused: not called" in page and "3 Dropout, 1 Identity" in page
    assert "drops.0" not in page and "update.*@fc.bias" not in page
    html = dynascope.load_run(tmp_path / "r")._repr_html_()
    assert "3 Dropout, 1 Identity" in html and "drops.0" not in html


def test_a_probed_model_still_deep_copies(tmp_path):
    """The session's forward counter rides on the model while it is open: an EMA or evaluation copy
    (copy.deepcopy) still works (a hook bound to the session dragged its database connection along)."""
    import copy

    import torch
    from torch import nn

    import dynascope

    model = nn.Sequential(nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dynascope.probe(model, opt, tmp_path / "r") as run:
        ema = copy.deepcopy(model)
        loss = model(torch.randn(2, 4)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.step(loss=loss)
    assert isinstance(ema, nn.Sequential)
