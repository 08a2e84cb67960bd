"""Store format 2 (integer series ids, a WITHOUT ROWID (series, step) table): size per value, and format-1
runs (names as text in every row) still read the same, and convert on resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dynascope
from dynascope.store import DB_NAME, META_NAME, RunStore, convert

# the format-1 DDL exactly as dynascope 0.1 created it
V1_DDL = """
CREATE TABLE IF NOT EXISTS scalars (step INTEGER NOT NULL, metric TEXT NOT NULL, layer TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS scalars_metric ON scalars (metric, layer, step);
CREATE INDEX IF NOT EXISTS scalars_nonfinite ON scalars (metric, layer, step)
  WHERE value IS NULL OR value > 1e308 OR value < -1e308;
CREATE TABLE IF NOT EXISTS artifacts (step INTEGER NOT NULL, name TEXT NOT NULL, file TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS marks (step INTEGER NOT NULL, key TEXT NOT NULL, value TEXT);
"""

META = {"name": "old", "modules": ["net.2", "net.10", "net.1"], "parameters": ["net.1.weight"]}


def _rows() -> list[tuple[int, str, str, float | None]]:
    rng = np.random.default_rng(0)
    rows: list[tuple[int, str, str, float | None]] = []
    for step in range(0, 40, 2):
        rows.append((step, "loss", "", float(rng.standard_normal())))
        for lay in ("net.1", "net.2", "net.10"):
            rows.append((step, "act.mean", lay, float(rng.standard_normal())))
        rows.append((step, "grad.norm", "net.1.weight", float(rng.uniform())))
    rows += [(5, "act.mean", "net.2", None), (7, "act.mean", "net.10", float("inf")),
             (9, "grad.norm", "net.1.weight", -float("inf")), (11, "act.mean", "net.1", None)]
    rows.append((12, "loss", "", 123.0))  # a repeated (step, metric, layer): the later value wins
    return rows


def _write_v1(path: Path, rows) -> None:
    path.mkdir()
    (path / "artifacts").mkdir()
    con = sqlite3.connect(path / DB_NAME)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(V1_DDL)
    with con:
        con.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?)", rows)
        con.execute("INSERT INTO marks VALUES (3, 'task', '1')")
        con.execute("INSERT INTO artifacts VALUES (5, 'spec', 'spec-5.npz', '{\"k\": 2}')")
    con.close()
    np.savez_compressed(path / "artifacts" / "spec-5.npz", eig=np.arange(3.0))
    (path / META_NAME).write_text(json.dumps(META))


def _write_v2(path: Path, rows) -> None:
    store = RunStore(path)
    store.write_meta(META)
    store.write_scalars(rows[: len(rows) // 2])  # two flushes, as a session writes
    store.write_scalars(rows[len(rows) // 2:])
    store.mark(3, "task", 1)
    store.write_artifact("spec", 5, {"eig": np.arange(3.0)}, {"k": 2})
    store.close()


def _answers(run: dynascope.RunData) -> dict:
    from dynascope.store import query as _data

    out = {"metrics": run.metrics(), "layers": run.layers("act.mean"), "steps": run.steps("loss").tolist(),
           "steps_all": run.steps().tolist(), "steps_layer": run.steps("act.mean", "net.10").tolist(),
           "scalars": run.scalars("act.mean"), "pivot": run.pivot("act.mean"),
           "series": [a.tolist() for a in run.series("loss")],
           "query": run.query("act.mean", ["net.10", "net.2"], [4, 5, 7, 8]).sort_values(["layer", "step"])
                       .reset_index(drop=True),
           "max": run.layer_max("act.mean"), "nonfinite": run.non_finite().sort_values(["metric", "layer"])
                                                         .reset_index(drop=True),
           "at_steps": _data.at_steps(run, "act.mean", ["net.2", "net.1"], [0, 5, 6]),
           "marks": run.marks()["value"].tolist(), "artifact": run.load_artifact("spec")[0]["eig"].tolist()}
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k], check_dtype=False, check_index_type=False, obj=k)
        else:
            assert a[k] == b[k] or (isinstance(a[k], dict) and _dict_nan_equal(a[k], b[k])), k


def _dict_nan_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal([a[x]], [b[x]], equal_nan=True) for x in a)


def test_format1_run_reads_like_format2_and_converts_on_resume(tmp_path):
    rows = _rows()
    _write_v1(tmp_path / "v1", rows)
    _write_v2(tmp_path / "v2", rows)
    old, new = dynascope.load_run(tmp_path / "v1"), dynascope.load_run(tmp_path / "v2")
    assert (old.format, new.format) == (1, 2)
    a1, a2 = _answers(old), _answers(new)
    _same(a1, a2)
    # against the rows themselves, not only each other
    assert a2["metrics"] == ["act.mean", "grad.norm", "loss"]
    assert a2["layers"] == ["net.2", "net.10", "net.1"]  # model order from meta.json
    assert a2["series"][0] == list(range(0, 40, 2)) and a2["series"][1][6] == 123.0  # the later value won
    nf = a2["nonfinite"].set_index(["metric", "layer"])
    assert nf.loc[("act.mean", "net.2"), "n_nan"] == 1 and nf.loc[("act.mean", "net.10"), "n_inf"] == 1
    assert nf.loc[("act.mean", "net.10"), "first_step"] == 7 and len(nf) == 4
    assert a2["max"]["net.10"] == np.inf and np.isnan(a2["pivot"].loc[5, "net.2"])
    assert len(a2["query"]) == 6 and np.isnan(a2["at_steps"].loc[5, "net.2"])
    # the names of format 1 are a view in format 2: plain SQL over `scalars` keeps working
    sql = "SELECT step, metric, layer, value FROM scalars ORDER BY metric, layer, step"
    df1, df2 = old._query(sql), new._query(sql)
    assert len(df2) == len(rows) - 1 and len(df1) == len(rows)  # format 1 kept the repeated row
    # resume converts format 1 in place; the answers stay the same
    store = RunStore(tmp_path / "v1", mode="resume")
    assert store.last_step() == 38
    store.write_scalars([(40, "loss", "", 0.5)])
    store.close()
    conv = dynascope.load_run(tmp_path / "v1")
    assert conv.format == 2 and conv.steps("loss")[-1] == 40
    a3 = _answers(conv)
    a3["steps"], a3["steps_all"], a3["series"] = a2["steps"], a2["steps_all"], a2["series"]  # + step 40
    _same(a2, a3)
    con = sqlite3.connect(tmp_path / "v1" / DB_NAME)
    kinds = dict(con.execute("SELECT name, type FROM sqlite_master").fetchall())
    con.close()
    assert kinds["scalars"] == "view" and "scalars_metric" not in kinds
    convert(tmp_path / "v1")  # converting a format-2 run again is a no-op
    assert dynascope.load_run(tmp_path / "v1").steps("loss")[-1] == 40


def test_bytes_per_value_at_most_24(tmp_path):
    """300 steps x 40 layers x 8 metrics, flushed every 20 steps (step-major, as a session writes)."""
    rng = np.random.default_rng(0)
    store = RunStore(tmp_path / "r")
    names = [(f"m{j}", f"layers.{i}") for j in range(8) for i in range(40)]
    n = 0
    for a in range(0, 300, 20):
        rows = [(s, m, lay, float(v)) for s in range(a, a + 20) for (m, lay), v in zip(names, rng.standard_normal(
            len(names)))]
        store.write_scalars(rows)
        n += len(rows)
    store.close()
    per_value = (tmp_path / "r" / DB_NAME).stat().st_size / n
    assert per_value <= 24, per_value
    assert len(dynascope.load_run(tmp_path / "r").scalars("m3")) == 300 * 40


def test_a_failed_flush_leaves_no_stale_series_ids(tmp_path):
    """New (metric, layer) names get ids inside the flush's transaction; when it fails, the next flush
    must not reuse ids that were rolled back."""
    store = RunStore(tmp_path / "r")
    store.write_scalars([(0, "a", "", 1.0)])
    store.con.execute("CREATE TEMP TRIGGER planted BEFORE INSERT ON points WHEN NEW.value = 666 "
                      "BEGIN SELECT RAISE(ABORT, 'planted failure'); END")
    with pytest.raises(sqlite3.DatabaseError, match="planted"):  # fails after b/x got an id in this transaction
        store.write_scalars([(1, "b", "x", 2.0), (1, "a", "", 666.0)])
    store.write_scalars([(2, "c", "y", 4.0), (2, "b", "x", 5.0)])
    store.close()
    run = dynascope.load_run(tmp_path / "r")
    assert run.metrics() == ["a", "b", "c"]
    assert run.series("b", "x")[1].tolist() == [5.0] and run.series("c", "y")[1].tolist() == [4.0]
