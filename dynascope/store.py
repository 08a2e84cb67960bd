"""Run directory: an SQLite table of scalar rows, a metadata file and an
artifacts folder of named arrays (architecture invariant 5).

Layout of a run directory::

    RUN/
      dynascope.sqlite   tables: scalars(step, metric, layer, value),
                                 artifacts(step, name, file, meta),
                                 marks(step, key, value)
      meta.json          model summary, optimizer, torch version, seed, times
      artifacts/         one .npz file per artifact

The database runs in WAL mode, every flush is one transaction, so a process
killed with SIGKILL loses at most its unflushed interval and readers (reports)
can open the run while training still writes. SQLite stores NaN as NULL; it is
read back as NaN. ``layer`` is ``""`` for run-level metrics such as ``loss``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pandas is needed to read runs, not to record them
    import pandas as pd

__all__ = ["RunStore", "RunData", "load_run", "NotARunError", "RunExistsError", "DB_NAME", "META_NAME"]

DB_NAME = "dynascope.sqlite"
META_NAME = "meta.json"
ARTIFACTS = "artifacts"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scalars (step INTEGER NOT NULL, metric TEXT NOT NULL, layer TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS scalars_metric ON scalars (metric, layer, step);
CREATE INDEX IF NOT EXISTS scalars_nonfinite ON scalars (metric, layer, step)
  WHERE value IS NULL OR value > 1e308 OR value < -1e308;
CREATE TABLE IF NOT EXISTS artifacts (step INTEGER NOT NULL, name TEXT NOT NULL, file TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS marks (step INTEGER NOT NULL, key TEXT NOT NULL, value TEXT);
"""


class NotARunError(ValueError):
    """The path is not a dynascope run directory."""


class RunExistsError(FileExistsError):
    """The run directory already holds a run and neither resume nor overwrite was asked for."""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    else:
        con = sqlite3.connect(path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA cache_size=-32768")  # 32 MiB of page cache for the index inserts of large flushes
    return con


_INDEX_ORDER = operator.itemgetter(1, 2)


def _sql_value(v: Any) -> float | None:
    """NaN (and None) become NULL; numbers become Python floats (inf stays inf)."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "artifact"


class RunStore:
    """Writer side of a run directory (only rank 0 writes).

    ``mode``: ``"new"`` refuses a directory that already holds a run,
    ``"resume"`` appends to it (steps continue from the last recorded one),
    ``"overwrite"`` deletes the previous run's files first.
    """

    def __init__(self, run_dir: str | os.PathLike[str], mode: Literal["new", "resume", "overwrite"] = "new") -> None:
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
        self.path = Path(run_dir)
        db = self.path / DB_NAME
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"run_dir {str(self.path)!r} exists and is not a directory")
        exists = db.exists()
        if exists and mode == "new":
            raise RunExistsError(
                f"{str(self.path)!r} already holds a dynascope run; pass resume=True to append to it "
                "or overwrite=True to replace it (or choose another run_dir)"
            )
        if self.path.exists() and not exists and any(self.path.iterdir()) and mode != "overwrite":
            raise RunExistsError(
                f"{str(self.path)!r} exists, is not empty and is not a dynascope run; refusing to write into it "
                "(pass overwrite=True to use it anyway)"
            )
        if exists and mode == "overwrite":
            for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", META_NAME):
                (self.path / name).unlink(missing_ok=True)
            art = self.path / ARTIFACTS
            if art.is_dir():
                for f in art.iterdir():
                    f.unlink()
        self.resumed = exists and mode == "resume"
        (self.path / ARTIFACTS).mkdir(parents=True, exist_ok=True)
        self._con = _connect(db)
        self._con.executescript(_SCHEMA)
        self._con.commit()
        self.meta: dict[str, Any] = {}
        if self.resumed and (self.path / META_NAME).exists():
            self.meta = json.loads((self.path / META_NAME).read_text())

    # -- writing -----------------------------------------------------------------
    def last_step(self) -> int | None:
        row = self._con.execute("SELECT MAX(step) FROM scalars").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def write_scalars(self, rows: Iterable[tuple[int, str, str, float]]) -> None:
        """Append ``(step, metric, layer, value)`` rows in one transaction."""
        clean = [(s if type(s) is int else int(s), m, lay,
                  v if type(v) is float and v == v else _sql_value(v))  # v == v: not NaN
                 for s, m, lay, v in rows]
        # in index order (metric, layer, step): the B-tree inserts of one flush then touch neighbouring
        # pages, 2-3x faster per row than the probes' (step, layer, metric) order on a large run
        clean.sort(key=_INDEX_ORDER)
        with self._con:
            self._con.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?)", clean)

    def write_artifact(self, name: str, step: int, arrays: dict[str, np.ndarray],
                       meta: dict[str, Any] | None = None) -> Path:
        """Save named arrays as ``artifacts/<name>-<step>.npz`` and index them."""
        fname = f"{_safe_name(name)}-{int(step)}.npz"
        target = self.path / ARTIFACTS / fname
        tmp = target.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, target)
        with self._con:
            self._con.execute("DELETE FROM artifacts WHERE name = ? AND step = ?", (name, int(step)))
            self._con.execute(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?)",
                (int(step), name, fname, json.dumps(meta or {}, default=_json_default)),
            )
        return target

    def delete_step(self, step: int, mark_key: str | None = None) -> None:
        """Remove every scalar row at ``step`` (and the marks named ``mark_key``
        there), e.g. to redo a step an interrupted process left half written."""
        with self._con:
            self._con.execute("DELETE FROM scalars WHERE step = ?", (int(step),))
            if mark_key is not None:
                self._con.execute("DELETE FROM marks WHERE key = ? AND step = ?", (mark_key, int(step)))

    def mark(self, step: int, key: str, value: Any) -> None:
        with self._con:
            self._con.execute("INSERT INTO marks VALUES (?, ?, ?)",
                              (int(step), str(key), json.dumps(value, default=_json_default)))

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Merge ``meta`` into meta.json (atomic replace)."""
        self.meta.update(meta)
        target = self.path / META_NAME
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2, default=_json_default))
        os.replace(tmp, target)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None  # type: ignore[assignment]


class RunData:
    """Reader side of a run directory; safe to use while the run is still written."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        db = self.path / DB_NAME
        if not self.path.is_dir():
            raise NotARunError(f"{str(self.path)!r} is not a directory, so not a dynascope run")
        if not db.exists():
            raise NotARunError(f"{str(self.path)!r} is not a dynascope run (no {DB_NAME} inside)")
        self._db = db
        meta_path = self.path / META_NAME
        self.meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.name: str = str(self.meta.get("name") or self.path.name)
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RunData({str(self.path)!r})"

    def _repr_html_(self) -> str:
        """The run in a notebook: run table, recorded metrics, findings (dynascope.reports.inline)."""
        from .reports.inline import run_html

        return run_html(self)

    def _query(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        import pandas as pd

        con = _connect(self._db, readonly=True)
        try:
            return pd.read_sql_query(sql, con, params=params)
        finally:
            con.close()

    def metrics(self) -> list[str]:
        """Names of the recorded scalar metrics, sorted.

        An index skip-scan (one seek per metric) rather than ``SELECT DISTINCT``,
        which reads the whole table (about 1 s on a 17M-row run).
        """
        out: list[str] = []
        con = _connect(self._db, readonly=True)
        try:
            row = con.execute("SELECT MIN(metric) FROM scalars").fetchone()
            while row and row[0] is not None:
                out.append(row[0])
                row = con.execute("SELECT MIN(metric) FROM scalars WHERE metric > ?", (row[0],)).fetchone()
        finally:
            con.close()
        return out

    def steps(self, metric: str | None = None) -> np.ndarray:
        if metric is None:
            df = self._query("SELECT DISTINCT step FROM scalars ORDER BY step")
        else:
            df = self._query("SELECT DISTINCT step FROM scalars WHERE metric = ? ORDER BY step", (metric,))
        return df["step"].to_numpy()

    def scalars(self, metric: str, layer: str | None = None) -> pd.DataFrame:
        """Rows of one metric as a DataFrame with columns ``step, layer, value``.

        NaN values come back as NaN (they are NULL in SQLite). Raises KeyError
        naming the known metrics when ``metric`` was never recorded.
        """
        if metric not in self._cache:
            df = self._query("SELECT step, layer, value FROM scalars WHERE metric = ? ORDER BY step", (metric,))
            if df.empty and metric not in self.metrics():
                raise KeyError(f"metric {metric!r} is not recorded in run {self.name!r}; recorded: {self.metrics()}")
            df["value"] = df["value"].astype(float)
            self._cache[metric] = df
        df = self._cache[metric]
        if layer is not None:
            df = df[df["layer"] == layer].reset_index(drop=True)
        return df

    def has(self, metric: str) -> bool:
        return metric in self.metrics()

    def layers(self, metric: str) -> list[str]:
        """Layers of ``metric`` in model order (``named_modules`` / ``named_parameters``)."""
        present = list(dict.fromkeys(self.scalars(metric)["layer"].tolist()))
        order = {n: i for i, n in enumerate(self.meta.get("modules", []) + self.meta.get("parameters", []))}
        return sorted(present, key=lambda n: (order.get(n, len(order)), _natural_key(n)))

    def pivot(self, metric: str) -> pd.DataFrame:
        """step x layer table of one metric, columns in model order."""
        df = self.scalars(metric)
        table = df.pivot_table(index="step", columns="layer", values="value", aggfunc="last", dropna=False)
        return table[[c for c in self.layers(metric) if c in table.columns]]

    def artifacts(self, name: str | None = None) -> pd.DataFrame:
        """Index of array artifacts: columns ``step, name, file, meta`` (meta parsed from JSON)."""
        if name is None:
            df = self._query("SELECT step, name, file, meta FROM artifacts ORDER BY step")
        else:
            df = self._query("SELECT step, name, file, meta FROM artifacts WHERE name = ? ORDER BY step", (name,))
        df["meta"] = [json.loads(m) if m else {} for m in df["meta"]]
        return df

    def load_artifact(self, name: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and metadata of artifact ``name`` at ``step`` (default: the last one)."""
        df = self.artifacts(name)
        if df.empty:
            raise KeyError(f"no artifact named {name!r} in run {self.name!r}")
        row = df.iloc[-1] if step is None else df[df["step"] == step].iloc[-1]
        with np.load(self.path / ARTIFACTS / row["file"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return arrays, row["meta"]

    def marks(self, key: str | None = None) -> pd.DataFrame:
        if key is None:
            df = self._query("SELECT step, key, value FROM marks ORDER BY step")
        else:
            df = self._query("SELECT step, key, value FROM marks WHERE key = ? ORDER BY step", (key,))
        df["value"] = [json.loads(v) if v else None for v in df["value"]]
        return df


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Open a run directory for reading (also while it is being written)."""
    return RunData(path)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
