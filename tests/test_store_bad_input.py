"""Damaged runs when reading: ``load_run`` raises RunStoreError with one line naming the file and the
problem; ``dynascope ls / report / export / analyze`` exit 2 with that line; ``report --skip-bad``
leaves a bad run out and says so in the report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.store import DB_NAME, META_NAME, NotARunError, RunStoreError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "good"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with dynascope.probe(model, opt, run_dir, every=1) as run:
        for _ in range(200):  # enough pages that half the file is not the header alone
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    return run_dir


def _not_a_database(d: Path) -> str:
    (d / DB_NAME).write_text("these are my notes, not a database\n" * 20)
    return "not an SQLite database"


def _truncated(d: Path) -> str:
    db = d / DB_NAME
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2 - 100)
    return "truncated"


def _truncated_at_a_page(d: Path) -> str:
    db = d / DB_NAME
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2 // 4096 * 4096)
    return "truncated"


def _empty_db(d: Path) -> str:
    (d / DB_NAME).write_bytes(b"")
    return "empty file"


def _foreign_db(d: Path) -> str:
    (d / DB_NAME).unlink()
    con = __import__("sqlite3").connect(d / DB_NAME)
    con.execute("CREATE TABLE recipes (name TEXT)")
    con.commit()
    con.close()
    return "without dynascope's tables"


def _missing_meta(d: Path) -> str:
    (d / META_NAME).unlink()
    return "missing"


def _broken_meta(d: Path) -> str:
    (d / META_NAME).write_text('{"name": "x", ')
    return "not valid JSON"


DAMAGE = {"not_a_database": (_not_a_database, DB_NAME), "truncated": (_truncated, DB_NAME),
          "truncated_at_a_page": (_truncated_at_a_page, DB_NAME), "empty_db": (_empty_db, DB_NAME),
          "foreign_db": (_foreign_db, DB_NAME), "missing_meta": (_missing_meta, META_NAME),
          "broken_meta": (_broken_meta, META_NAME)}


def _damaged(good: Path, tmp_path: Path, kind: str) -> tuple[Path, str, Path]:
    d = tmp_path / kind
    shutil.copytree(good, d)
    damage, fname = DAMAGE[kind]
    problem = damage(d)
    return d, problem, d / fname


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dynascope", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_load_run_names_the_file_and_the_problem(good, tmp_path, kind):
    d, problem, f = _damaged(good, tmp_path, kind)
    with pytest.raises(RunStoreError) as info:
        dynascope.load_run(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{f}: ") and problem in msg[len(str(f)):]  # the path names the kind
    assert isinstance(info.value, ValueError) and dynascope.RunStoreError is RunStoreError


def test_not_a_run_is_a_run_store_error(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(NotARunError) as info:
        dynascope.load_run(tmp_path / "notes")
    assert isinstance(info.value, RunStoreError) and "not a dynascope run" in str(info.value)


@pytest.mark.parametrize("kind", ["not_a_database", "truncated", "missing_meta"])
def test_cli_exits_2_with_one_line(good, tmp_path, kind):
    d, problem, f = _damaged(good, tmp_path, kind)
    for args in (["ls", str(d)], ["report", str(d), "-o", str(tmp_path / "r.html")],
                 ["export", str(d), "--tensorboard", str(tmp_path / "tb")]):
        res = _cli(*args, cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (args, res.stderr)
        assert len(lines) == 1 and f"error: {f}: " in lines[0], (args, res.stderr)
        assert problem in lines[0].split(str(f), 1)[1] and "Traceback" not in res.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_over_several_runs_names_the_bad_one_or_skips_it(good, tmp_path):
    bad, problem, f = _damaged(good, tmp_path, "not_a_database")
    out = tmp_path / "r.html"
    res = _cli("report", str(good), str(bad), "-o", str(out), cwd=tmp_path)
    assert res.returncode == 2 and not out.exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run {bad}: {bad / DB_NAME}: " in lines[0] and "--skip-bad" in lines[0]
    assert problem in lines[0].split(str(bad / DB_NAME), 1)[1]
    res = _cli("report", str(good), str(bad), "-o", str(out), "--skip-bad", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"skipped {bad}" in res.stderr
    html = out.read_text()
    assert f"run {bad} was left out of this report: {bad / DB_NAME}: {problem}" in html
    # every run bad: nothing to report
    res = _cli("report", str(bad), "-o", str(tmp_path / "none.html"), "--skip-bad", cwd=tmp_path)
    assert res.returncode == 2 and "no run could be read" in res.stderr


def test_report_api_raises_for_a_bad_run(good, tmp_path):
    bad, problem, f = _damaged(good, tmp_path, "truncated")
    with pytest.raises(RunStoreError) as info:
        dynascope.report([good, bad], tmp_path / "r.html")
    assert str(info.value).startswith(f"{f}: {problem} (")


def test_a_damage_met_while_reading_is_a_run_store_error(good, tmp_path):
    """Damage the checks at load time cannot see (inside the file): the read that meets it raises."""
    d = tmp_path / "inner"
    shutil.copytree(good, d)
    run = dynascope.load_run(d)
    db = d / DB_NAME
    data = bytearray(db.read_bytes())
    page = 4096
    for p in range(2, len(data) // page):  # overwrite every page after the schema with garbage
        data[p * page:(p + 1) * page] = b"\xa5" * page
    db.write_bytes(bytes(data))
    with pytest.raises(RunStoreError) as info:
        run.scalars("act.mean")
    assert str(info.value).startswith(f"{db}: ") and "\n" not in str(info.value)
    # the report does not turn it into broken figures: it raises, naming the file
    with pytest.raises(RunStoreError, match="dynascope.sqlite: "):
        dynascope.report([run], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_analyze_into_a_damaged_run_exits_2(good, tmp_path):
    model_src = ("import torch\nfrom torch import nn\n\ndef make():\n    torch.manual_seed(0)\n"
                 "    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    (tmp_path / "usermodel.py").write_text(model_src)
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.save({"model_state_dict": model.state_dict(), "global_step": 5}, ck / "ckpt_5.pt")
    for kind in ("not_a_database", "broken_meta"):
        d, problem, f = _damaged(good, tmp_path, kind)
        res = _cli("analyze", str(ck), "--model", f"{tmp_path / 'usermodel.py'}:make", "-o", str(d), "--no-progress",
                   cwd=tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr
        assert len(lines) == 1 and f"error: {f}: " in lines[0], res.stderr
        assert problem in lines[0].split(str(f), 1)[1], res.stderr
