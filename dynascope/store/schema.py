"""The run directory's names, its SQL schema and what every side of the store shares: the errors, the
connection, the format of a database, value and JSON conversions (see :mod:`dynascope.store`)."""

from __future__ import annotations

import math
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

DB_NAME = "dynascope.sqlite"
META_NAME = "meta.json"
ARTIFACTS = "artifacts"
STORE_FORMAT = 2

_NONFINITE = "value IS NULL OR value > 1e308 OR value < -1e308"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, metric TEXT NOT NULL, layer TEXT NOT NULL,
                                   UNIQUE (metric, layer));
CREATE TABLE IF NOT EXISTS points (series INTEGER NOT NULL, step INTEGER NOT NULL, value REAL,
                                   PRIMARY KEY (series, step)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_nonfinite ON points (series, step) WHERE {_NONFINITE};
CREATE VIEW IF NOT EXISTS scalars AS
  SELECT p.step AS step, s.metric AS metric, s.layer AS layer, p.value AS value
  FROM points AS p JOIN series AS s ON s.id = p.series;
CREATE TABLE IF NOT EXISTS artifacts (step INTEGER NOT NULL, name TEXT NOT NULL, file TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS marks (step INTEGER NOT NULL, key TEXT NOT NULL, value TEXT);
PRAGMA user_version = {STORE_FORMAT};
"""


class RunStoreError(ValueError):
    """A run directory that cannot be read: not a run, a damaged database, a missing or broken meta.json.
    The message is one line that names the file and the problem."""


class NotARunError(RunStoreError):
    """The path is not a dynascope run directory."""


class RunExistsError(FileExistsError):
    """The run directory already holds a run and neither resume nor overwrite was asked for."""


class StorageFault(OSError):
    """The run directory went away or was replaced while it was written."""


def _connect(path: Path, readonly: bool = False, timeout: float = 30.0) -> sqlite3.Connection:
    if readonly:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    else:
        con = sqlite3.connect(path, timeout=timeout)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA cache_size=-32768")  # 32 MiB of page cache for the B-tree inserts of large flushes
    return con


def _table_kinds(con: sqlite3.Connection) -> dict[str, str]:
    return dict(con.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')").fetchall())


def _format_of(kinds: dict[str, str]) -> int | None:
    """1: names in every row (table ``scalars``), 2: ``series`` + ``points``, None: no dynascope tables."""
    if kinds.get("scalars") == "table":
        return 1
    if "points" in kinds and "series" in kinds:
        return 2
    return None



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


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

