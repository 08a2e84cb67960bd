"""Findings as data (dynascope.findings) and as a gate (dynascope check): the same findings as the report,
exit codes 0 / 1 / 2 through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _digits_runs import edited_copy
from _synthetic import make_run
from markupsafe import escape

import dynascope
from dynascope.analysis import findings as F

COLUMNS = ["severity", "rule", "metric", "layer", "step", "message", "source"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("chk")
    base = make_run(d / "base", seed=0)
    # the head's weight norm 4x the baseline's from step 100 on
    drift = edited_copy(base, d / "drift", {("weight.norm", "head.weight"): (list(range(100, 200)), 4.0)})
    return {
        "clean": make_run(d / "clean"),
        "spike": make_run(d / "spike", loss_spike_at=120),                     # a warning
        "alone": make_run(d / "alone", loss_spike_at=120, grad_spike=False),   # an info only
        "nan": make_run(d / "nan", nan_at=150),                                # errors
        "drift": drift,
        "base": base,
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(dynascope.__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "dynascope", "check", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_every_rule_has_a_source():
    assert set(F.RULE_SOURCES) <= set(F.RULES)
    assert all(F.rule_source(name) for name in F.RULES)
    # a rule without an entry falls back on its docstring's Source sentence
    assert F._doc_source("loss_spikes").startswith("Cohen et al. 2021 (loss spikes when sharpness exceeds 2/eta)")
    assert F._doc_source("dead_units").startswith("Dohare et al. 2024")
    assert all(0 < len(F._doc_source(name)) <= 160 for name in F.RULES)


def test_findings_frame_is_what_the_report_lists(runs, tmp_path):
    df = dynascope.findings(runs["nan"])
    assert list(df.columns[:7]) == COLUMNS
    assert len(df) >= 2 and set(df["severity"]) <= {"error", "warning", "info"}
    assert df["severity"].iloc[0] == "error" and df["rule"].iloc[0] == "non_finite_values"
    assert df["step"].iloc[0] == 150 and df["source"].iloc[0] == F.RULE_SOURCES["non_finite_values"]
    # one implementation: the report's findings are these rows, in this order
    page = dynascope.report(runs["nan"], tmp_path / "r.html").read_text(encoding="utf-8")
    section = page[page.index('id="findings"'):page.index('id="summary"')]
    positions = [section.index(str(escape(m))) for m in df["message"]]
    assert positions == sorted(positions) and section.count("<li ") == len(df)
    assert dynascope.findings(runs["clean"]).empty
    assert list(dynascope.findings(dynascope.load_run(runs["clean"])).columns[:7]) == COLUMNS


def test_findings_with_baseline_put_deviations_first(runs):
    df = dynascope.findings(runs["drift"], baseline=runs["base"])
    assert df["rule"].iloc[0] == F.BASELINE_RULE and df["layer"].iloc[0] == "head.weight"
    assert df["step"].iloc[0] == 100 and df["severity"].iloc[0] == "warning"
    assert "base" in df["source"].iloc[0] and df["figure"].iloc[0] == F.BASELINE_FIGURE
    assert dynascope.findings(runs["base"], baseline=runs["base"])["rule"].ne(F.BASELINE_RULE).all()


def _main(capsys, *args: str) -> tuple[int, str, str]:
    from dynascope.commands.cli import main

    try:
        code = main(["check", *args])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_subprocess_exit_codes(runs, tmp_path):
    r = _cli(str(runs["clean"]))
    assert r.returncode == 0 and r.stdout == "" and "pass" in r.stderr
    r = _cli(str(runs["spike"]))
    assert r.returncode == 1, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: loss_spikes (step 120)")
    r = _cli(str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "not a directory" in r.stderr


def test_check_fail_on_levels(runs, capsys):
    assert _main(capsys, str(runs["spike"]), "--fail-on", "error")[0] == 0
    code, out, _ = _main(capsys, str(runs["alone"]))
    assert code == 0 and out.startswith("info: loss_spikes")  # printed, below the gate
    assert _main(capsys, str(runs["alone"]), "--fail-on", "info")[0] == 1
    code, out, _ = _main(capsys, str(runs["nan"]), "--fail-on", "error")
    assert code == 1 and all(ln.split(":")[0] in ("error", "warning", "info") for ln in out.strip().splitlines())
    code, out, _ = _main(capsys, str(runs["nan"]), str(runs["clean"]))  # several runs: each line names its run
    assert code == 1 and "run nan" in out


def test_check_with_baseline_and_bad_input(runs, tmp_path, capsys):
    code, out, _ = _main(capsys, str(runs["drift"]), "--baseline", str(runs["base"]))
    assert code == 1 and out.startswith("warning: baseline_deviation (step 100, layer head.weight)")
    assert _main(capsys, str(runs["base"]), "--baseline", str(runs["base"]))[0] == 0
    for args in ([str(runs["clean"]), "--baseline", str(tmp_path / "missing")],
                 [str(runs["clean"]), "--fail-on", "fatal"], []):
        code, out, err = _main(capsys, *args)
        assert code == 2, args
        assert out == "" and err.strip(), args
