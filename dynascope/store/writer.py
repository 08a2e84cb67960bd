"""Writer side of a run directory: :class:`RunStore` (only rank 0 writes) and :func:`convert`, which
rewrites a format-1 run as format 2 (see :mod:`dynascope.store`)."""

from __future__ import annotations

import json
import operator
import os
import re
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from ..core.errors import one_line
from .schema import (
    _SCHEMA,
    ARTIFACTS,
    DB_NAME,
    META_NAME,
    STORE_FORMAT,
    RunExistsError,
    RunStoreError,
    StorageFault,
    _connect,
    _format_of,
    _json_default,
    _sql_value,
    _table_kinds,
)

__all__ = ["RunStore", "convert", "write_atomic"]

_KEY_ORDER = operator.itemgetter(0, 1)


def write_atomic(target: Path, save: Callable[[BinaryIO], Any]) -> None:
    """``save(binary_file)`` into ``target`` through a temporary file next to it and one ``os.replace``
    (readers see the old file or the new one, never half of one). The folder must exist."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            save(f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "artifact"


class RunStore:
    """Writer side of a run directory (only rank 0 writes).

    ``mode``: ``"new"`` refuses a directory that already holds a run,
    ``"resume"`` appends to it (steps continue from the last recorded one;
    a format-1 run is converted first), ``"overwrite"`` deletes the previous
    run's files first. ``busy_timeout``: seconds a write waits for another
    process that holds the database locked before it fails.
    """

    def __init__(self, run_dir: str | os.PathLike[str], mode: Literal["new", "resume", "overwrite"] = "new",
                 *, busy_timeout: float = 30.0) -> None:
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
        self.path = Path(run_dir)
        self.busy_timeout = busy_timeout
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
        self.meta: dict[str, Any] = {}
        if self.resumed and (self.path / META_NAME).exists():
            try:
                self.meta = json.loads((self.path / META_NAME).read_text())
            except ValueError as exc:
                raise RunStoreError(f"{self.path / META_NAME}: not valid JSON ({one_line(exc)})") from None
        self._con: sqlite3.Connection | None = None
        try:
            self._open()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:  # not a database, malformed: the file, not the moment, is the problem
            raise RunStoreError(f"{db}: {one_line(exc)}") from None
        if not (self.path / META_NAME).exists():
            self.write_meta({})  # every run has a meta.json: a reader tells a damaged run by its absence

    def _open(self) -> None:
        (self.path / ARTIFACTS).mkdir(parents=True, exist_ok=True)
        db = self.path / DB_NAME
        con = _connect(db, timeout=self.busy_timeout)
        try:
            if _format_of(_table_kinds(con)) == 1:
                _convert_v1(con)
            con.executescript(_SCHEMA)
            con.commit()
            self._ids: dict[tuple[str, str], int] = {
                (m, lay): i for i, m, lay in con.execute("SELECT id, metric, layer FROM series")}
            st = os.stat(db)
        except BaseException:
            con.close()
            raise
        self._con = con
        self._inode = (st.st_dev, st.st_ino)

    @property
    def con(self) -> sqlite3.Connection:
        if self._con is None:
            raise RuntimeError(f"the run store {str(self.path)!r} is closed")
        return self._con

    def check(self) -> None:
        """Raise :class:`StorageFault` when the database file is gone or replaced (the run
        directory was removed): SQLite would go on writing into the deleted file."""
        try:
            st = os.stat(self.path / DB_NAME)
        except FileNotFoundError:
            raise StorageFault(f"the run directory {str(self.path)!r} (or its {DB_NAME}) was removed") from None
        if (st.st_dev, st.st_ino) != self._inode:
            raise StorageFault(f"{str(self.path / DB_NAME)!r} was replaced by another file")

    def reopen(self) -> None:
        """Open the database again (after :meth:`check` failed): creates the directory and a new
        database where the old one was removed, and writes the metadata there again."""
        self.close()
        self._open()
        self.write_meta({})

    @property
    def closed(self) -> bool:
        """True after :meth:`close`, or when opening the database again failed."""
        return self._con is None

    def reconnect(self) -> bool:
        """Make the store writable again after a storage fault: a store whose database file is gone or
        replaced (:meth:`check` fails) is opened again with :meth:`reopen`; a closed store whose file is
        still there opens its connection again. Returns True when it reopened (a new database, the
        metadata written again). Raises the storage error (``sqlite3.Error``, ``OSError``) when it cannot."""
        try:
            self.check()
            if self._con is None:
                self._open()
        except StorageFault:
            self.reopen()
            return True
        return False

    def set_busy_timeout(self, seconds: float) -> None:
        """Seconds a write waits for another process that holds the database locked before it fails,
        from now on (the open connection too) and for every later reopen."""
        self.busy_timeout = seconds
        if self._con is not None:
            self._con.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    # -- writing -----------------------------------------------------------------
    def last_step(self) -> int | None:
        row = self.con.execute(
            "SELECT MAX((SELECT MAX(step) FROM points WHERE series = s.id)) FROM series AS s").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def write_scalars(self, rows: Iterable[tuple[int, str, str, float]]) -> None:
        """Append ``(step, metric, layer, value)`` rows in one transaction."""
        con = self.con
        ids = self._ids
        new: dict[tuple[str, str], int] = {}
        clean = []
        for s, m, lay, v in rows:
            key = (m, lay)
            sid = ids.get(key)
            if sid is None:
                sid = new.get(key)
                if sid is None:
                    sid = new[key] = -1 - len(new)  # placeholder until the transaction assigns it
            clean.append((sid, s if type(s) is int else int(s),
                          v if type(v) is float and v == v else _sql_value(v)))  # v == v: not NaN
        with con:
            if new:
                assigned: dict[int, int] = {}
                for key in sorted(new):
                    cur = con.execute("INSERT INTO series (metric, layer) VALUES (?, ?)", key)
                    assigned[new[key]] = int(cur.lastrowid)  # type: ignore[arg-type]
                clean = [(assigned[r[0]], r[1], r[2]) if r[0] < 0 else r for r in clean]
            # in key order (series, step): the B-tree inserts of one flush then append to each series'
            # range and fill whole pages; the sort is stable, so of a repeated key the last row wins
            clean.sort(key=_KEY_ORDER)
            con.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?)", clean)
        if new:  # only once committed: a failed transaction must not leave ids that do not exist
            ids.update({key: self._id_of(key) for key in new})

    def _id_of(self, key: tuple[str, str]) -> int:
        return int(self.con.execute("SELECT id FROM series WHERE metric = ? AND layer = ?", key).fetchone()[0])

    def write_artifact(self, name: str, step: int, arrays: dict[str, np.ndarray],
                       meta: dict[str, Any] | None = None) -> Path:
        """Save named arrays as ``artifacts/<name>-<step>.npz`` and index them."""
        return self.write_file(name, step, lambda f: np.savez_compressed(
            f, **{k: np.asarray(v) for k, v in arrays.items()}), ".npz", meta)

    def write_file(self, name: str, step: int, save: Callable[[BinaryIO], Any], suffix: str,
                   meta: dict[str, Any] | None = None) -> Path:
        """Write an artifact file with ``save(binary_file)`` as ``artifacts/<name>-<step><suffix>`` (atomic
        replace) and index it under ``name`` and ``step``."""
        fname = f"{_safe_name(name)}-{int(step)}{suffix}"
        target = self.path / ARTIFACTS / fname
        write_atomic(target, save)
        with self.con:
            self.con.execute("DELETE FROM artifacts WHERE name = ? AND step = ?", (name, int(step)))
            self.con.execute(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?)",
                (int(step), name, fname, json.dumps(meta or {}, default=_json_default)),
            )
        return target

    def delete_step(self, step: int, mark_key: str | None = None) -> None:
        """Remove every scalar row at ``step`` (and the marks named ``mark_key``
        there), e.g. to redo a step an interrupted process left half written."""
        with self.con:
            self.con.executemany("DELETE FROM points WHERE series = ? AND step = ?",
                                 [(i, int(step)) for (i,) in self.con.execute("SELECT id FROM series")])
            if mark_key is not None:
                self.con.execute("DELETE FROM marks WHERE key = ? AND step = ?", (mark_key, int(step)))

    def mark(self, step: int, key: str, value: Any) -> None:
        self.write_marks([(step, key, value)])

    def write_marks(self, marks: Iterable[tuple[int, str, Any]]) -> None:
        """Insert ``(step, key, value)`` marks in one transaction."""
        with self.con:
            self.con.executemany("INSERT INTO marks VALUES (?, ?, ?)",
                                 [(int(s), str(k), json.dumps(v, default=_json_default)) for s, k, v in marks])

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Merge ``meta`` into meta.json (atomic replace)."""
        self.meta.update(meta)
        self.meta.setdefault("store_format", STORE_FORMAT)
        text = json.dumps(self.meta, indent=2, default=_json_default)
        write_atomic(self.path / META_NAME, lambda f: f.write(text.encode("utf-8")))

    def close(self) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            con.close()


def _convert_v1(con: sqlite3.Connection) -> None:
    """Rewrite a format-1 database (names in every row) as format 2, in one transaction."""
    con.execute("BEGIN")
    with con:  # the new tables (without the view, whose name is still taken), the copy and the drop: all or nothing
        for stmt in _SCHEMA.split(";"):
            if stmt.strip() and "PRAGMA" not in stmt and "CREATE VIEW" not in stmt:
                con.execute(stmt)
        con.execute("INSERT INTO series (metric, layer) SELECT DISTINCT metric, layer FROM scalars "
                    "ORDER BY metric, layer")
        # rowid order within a key: of repeated (step, metric, layer) rows the last written wins, as before
        con.execute("INSERT OR REPLACE INTO points SELECT s.id, o.step, o.value FROM scalars AS o "
                    "JOIN series AS s ON s.metric = o.metric AND s.layer = o.layer ORDER BY s.id, o.step, o.rowid")
        con.execute("DROP TABLE scalars")
    con.execute("VACUUM")


def convert(run_dir: str | os.PathLike[str]) -> None:
    """Convert a run written in store format 1 to format 2 in place (about 4x smaller)."""
    RunStore(run_dir, mode="resume").close()

