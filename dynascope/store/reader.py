"""Reader side of a run directory: :class:`RunData` and :func:`load_run`, safe while the run is still
written, and :func:`as_run`, which turns a run directory path or a RunData into a RunData (see
:mod:`dynascope.store`)."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import one_line
from .schema import (
    _NONFINITE,
    ARTIFACTS,
    DB_NAME,
    META_NAME,
    NotARunError,
    RunStoreError,
    _connect,
    _format_of,
    _natural_key,
    _table_kinds,
)

if TYPE_CHECKING:  # pandas is needed to read runs, not to record them
    import pandas as pd

__all__ = ["RunData", "load_run", "as_run", "find_runs"]


def _check_db_file(db: Path) -> None:
    """Cheap checks of the file itself (no page reads): an SQLite header and a size that holds
    every page the header counts. Raises RunStoreError naming the file."""
    try:
        size = db.stat().st_size
        with open(db, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        raise RunStoreError(f"{db}: cannot be read ({one_line(exc)})") from None
    if size == 0:
        raise RunStoreError(f"{db}: empty file, not a dynascope run store")
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        raise RunStoreError(f"{db}: not an SQLite database (damaged, or another kind of file)")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    n_pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the page count is valid only when these match
    wal = db.with_name(db.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return  # a writer is (or was) active: a checkpoint may be extending the file right now
    if page < 512 or size % page or (valid and size < n_pages * page):
        raise RunStoreError(f"{db}: truncated ({size} bytes; the header counts {n_pages} pages of {page} bytes)")


class RunData:
    """Reader side of a run directory; safe to use while the run is still written.

    Reads both store formats. A damaged run raises :class:`RunStoreError`
    (here, or from a later read that meets the damage).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        db = self.path / DB_NAME
        if not self.path.is_dir():
            raise NotARunError(f"{str(self.path)!r} is not a directory, so not a dynascope run")
        if not db.exists():
            raise NotARunError(f"{str(self.path)!r} is not a dynascope run (no {DB_NAME} inside)")
        self._db = db
        meta_path = self.path / META_NAME
        if not meta_path.exists():
            raise RunStoreError(f"{meta_path}: missing (every dynascope run has one; the run directory is damaged "
                                "or incomplete)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunStoreError(f"{meta_path}: not valid JSON ({one_line(exc)})") from None
        if not isinstance(meta, dict):
            raise RunStoreError(f"{meta_path}: not a JSON object (a {type(meta).__name__})")
        self.meta: dict[str, Any] = meta
        _check_db_file(db)
        with self._connection() as con:
            kinds = _table_kinds(con)
            fmt = _format_of(kinds)
            if fmt is None or "artifacts" not in kinds or "marks" not in kinds:
                raise RunStoreError(f"{db}: an SQLite database without dynascope's tables (found: "
                                    f"{', '.join(sorted(kinds)) or 'none'})")
            if fmt == 2:  # a query that reads a page of each table: damage shows here, not in a figure
                con.execute("SELECT MAX(series), COUNT(*) FROM (SELECT series FROM points LIMIT 1)").fetchone()
                con.execute("SELECT COUNT(*) FROM series").fetchone()
        self.format: int = fmt
        self.name: str = _run_name(self.meta, self.path)
        self._cache: dict[str, Any] = {}
        self._series: dict[str, dict[str, int]] | None = None

    def __repr__(self) -> str:
        return f"RunData({str(self.path)!r})"

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection; SQLite errors become RunStoreError naming the file."""
        con = None
        try:
            con = _connect(self._db, readonly=True)
            yield con
        except sqlite3.DatabaseError as exc:
            raise RunStoreError(f"{self._db}: {one_line(exc)}") from None
        finally:
            if con is not None:
                con.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._connection() as con:
            return con.execute(sql, tuple(params)).fetchall()
    def _query(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        import pandas as pd

        with self._connection() as con:
            return pd.read_sql_query(sql, con, params=params)

    # -- names ----------------------------------------------------------------------------------------------
    def _series_map(self, refresh: bool = False) -> dict[str, dict[str, int]]:
        """metric -> {layer: series id} (format 2); re-read when asked or for an unknown metric."""
        if self._series is None or refresh:
            out: dict[str, dict[str, int]] = {}
            for i, m, lay in self._rows("SELECT id, metric, layer FROM series ORDER BY id"):
                out.setdefault(m, {})[lay] = i
            self._series = out
        return self._series

    def _ids(self, metric: str) -> dict[str, int]:
        found = self._series_map().get(metric)
        if found is None:
            found = self._series_map(refresh=True).get(metric)
        return found or {}

    def metrics(self) -> list[str]:
        """Names of the recorded scalar metrics, sorted (one index seek per metric)."""
        if self.format == 2:
            self._series_map(refresh=True)
            rows = self._rows("SELECT DISTINCT s.metric FROM series AS s "
                              "WHERE EXISTS (SELECT 1 FROM points AS p WHERE p.series = s.id) ORDER BY s.metric")
            return [r[0] for r in rows]
        out: list[str] = []
        with self._connection() as con:
            row = con.execute("SELECT MIN(metric) FROM scalars").fetchone()
            while row and row[0] is not None:
                out.append(row[0])
                row = con.execute("SELECT MIN(metric) FROM scalars WHERE metric > ?", (row[0],)).fetchone()
        return out

    def has(self, metric: str) -> bool:
        return metric in self.metrics()

    def layer_names(self, metric: str) -> list[str]:
        """Layers that recorded ``metric``, unordered (see :meth:`layers` for model order)."""
        if self.format == 2:
            ids = self._ids(metric)
            if not ids:
                return []
            q = ",".join("?" * len(ids))
            with_rows = {r[0] for r in self._rows(
                f"SELECT id FROM series AS s WHERE id IN ({q}) AND EXISTS (SELECT 1 FROM points WHERE series = s.id)",
                list(ids.values()))}
            return [lay for lay, i in ids.items() if i in with_rows]
        found: list[str] = []
        with self._connection() as con:
            row = con.execute("SELECT MIN(layer) FROM scalars WHERE metric = ?", (metric,)).fetchone()
            while row and row[0] is not None:
                found.append(row[0])
                row = con.execute("SELECT MIN(layer) FROM scalars WHERE metric = ? AND layer > ?",
                                  (metric, row[0])).fetchone()
        return found

    def layers(self, metric: str) -> list[str]:
        """Layers of ``metric`` in model order (``named_modules`` / ``named_parameters``)."""
        order = {n: i for i, n in enumerate(self.meta.get("modules", []) + self.meta.get("parameters", []))}
        return sorted(self.layer_names(metric), key=lambda n: (order.get(n, len(order)), _natural_key(n)))

    # -- values ---------------------------------------------------------------------------------------------
    def steps(self, metric: str | None = None, layer: str | None = None) -> np.ndarray:
        """Sorted distinct steps (of ``metric``, of its ``layer``; default: of every row)."""
        if self.format == 2:
            if metric is None:
                return np.array([r[0] for r in self._rows("SELECT DISTINCT step FROM points ORDER BY step")],
                                dtype=np.int64)
            else:
                by_layer = self._ids(metric)
                ids = list(by_layer.values()) if layer is None else [by_layer[layer]] if layer in by_layer else []
            if not ids:
                return np.zeros(0, dtype=np.int64)
            q = ",".join("?" * len(ids))
            sql = f"SELECT DISTINCT step FROM points WHERE series IN ({q}) ORDER BY step"
            if len(ids) == 1:
                sql = "SELECT step FROM points WHERE series = ? ORDER BY step"
            return np.array([r[0] for r in self._rows(sql, ids)], dtype=np.int64)
        if metric is None:
            rows = self._rows("SELECT DISTINCT step FROM scalars ORDER BY step")
        elif layer is None:
            rows = self._rows("SELECT DISTINCT step FROM scalars WHERE metric = ? ORDER BY step", (metric,))
        else:
            rows = self._rows("SELECT DISTINCT step FROM scalars WHERE metric = ? AND layer = ? ORDER BY step",
                              (metric, layer))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def scalars(self, metric: str, layer: str | None = None) -> pd.DataFrame:
        """Rows of one metric as a DataFrame with columns ``step, layer, value``, by step.

        NaN values come back as NaN (they are NULL in SQLite). Raises KeyError
        naming the known metrics when ``metric`` was never recorded.
        """
        if metric not in self._cache:
            df = self.query(metric, _by_step=True)
            if df.empty and metric not in self.metrics():
                raise KeyError(f"metric {metric!r} is not recorded in run {self.name!r}; recorded: {self.metrics()}")
            if self.format == 1:
                df = df.iloc[np.argsort(df["step"].to_numpy(), kind="stable")].reset_index(drop=True)
            self._cache[metric] = df
        df = self._cache[metric]
        if layer is not None:
            df = df[df["layer"] == layer].reset_index(drop=True)
        return df

    def query(self, metric: str, layers: Sequence[str] | None = None,
              steps: Sequence[int] | None = None, *, _by_step: bool = False) -> pd.DataFrame:
        """Rows ``step, layer, value`` of ``metric``, optionally only these layers / steps, by layer and step.
        Reads only the rows asked for (seeks in the ``(series, step)`` key)."""
        import pandas as pd

        empty = pd.DataFrame({"step": np.zeros(0, dtype=np.int64), "layer": np.zeros(0, dtype=object),
                              "value": np.zeros(0)})
        if layers is not None:
            layers = list(layers)
        step_list = None if steps is None else [int(s) for s in steps]
        if (layers is not None and not layers) or (step_list is not None and not step_list):
            return empty
        if self.format == 1:
            sql = "SELECT step, layer, value FROM scalars WHERE metric = ?"
            params: list[Any] = [metric]
            if layers is not None:
                sql += f" AND layer IN ({','.join('?' * len(layers))})"
                params += layers
            if step_list is not None:
                sql += f" AND step IN ({','.join('?' * len(step_list))})"
                params += step_list
            rows = self._rows(sql + " ORDER BY layer, step", params)
            if not rows:
                return empty
            df = pd.DataFrame(rows, columns=["step", "layer", "value"])
            df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
            return df
        by_layer = self._ids(metric)
        chosen = list(by_layer.items()) if layers is None else [(lay, by_layer[lay]) for lay in layers
                                                                 if lay in by_layer]
        if not chosen:
            return empty
        chosen.sort(key=lambda t: t[1])
        sql = "SELECT step, value FROM points WHERE series = ?"
        if step_list is not None:
            sql += f" AND step IN ({','.join('?' * len(step_list))})"
        parts: list[list[tuple]] = []
        with self._connection() as con:  # one range per series: two Python objects per row, no series column
            for _, sid in chosen:
                parts.append(con.execute(sql, (sid, *(step_list or ()))).fetchall())
        n = sum(len(x) for x in parts)
        if n == 0:
            return empty
        arr = np.concatenate([_pairs(x) for x in parts]).reshape(-1, 2)
        step_arr = arr[:, 0].astype(np.int64)
        layer_arr = np.repeat(np.array([lay for lay, _ in chosen], dtype=object), [len(x) for x in parts])
        value_arr = arr[:, 1]
        if _by_step:
            order = np.argsort(step_arr, kind="stable")
            step_arr, layer_arr, value_arr = step_arr[order], layer_arr[order], value_arr[order]
        return pd.DataFrame({"step": step_arr, "layer": layer_arr, "value": value_arr})

    def series(self, metric: str, layer: str = "") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric and layer, by step; the last value wins for a repeated step."""
        if self.format == 2:
            sid = self._ids(metric).get(layer)
            if sid is None:  # a layer that appeared after the names were read (the run is still written)
                sid = self._series_map(refresh=True).get(metric, {}).get(layer)
            rows = [] if sid is None else self._rows("SELECT step, value FROM points WHERE series = ? ORDER BY step",
                                                     (sid,))
        else:
            rows = self._rows("SELECT step, value FROM scalars WHERE metric = ? AND layer = ? ORDER BY step",
                              (metric, layer))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        arr = _pairs(rows).reshape(-1, 2)
        s = arr[:, 0].astype(np.int64)
        keep = np.r_[s[1:] != s[:-1], True]
        return s[keep], arr[keep, 1]

    def layer_max(self, metric: str, layers: Sequence[str] | None = None) -> dict[str, float]:
        """Largest finite-or-inf value of ``metric`` per layer over all steps (NaN rows ignored)."""
        if self.format == 2:
            by_layer = self._ids(metric)
            chosen = by_layer if layers is None else {lay: by_layer[lay] for lay in layers if lay in by_layer}
            if not chosen:
                return {}
            name_of = {i: lay for lay, i in chosen.items()}
            rows = self._rows(f"SELECT series, MAX(value) FROM points WHERE series IN "
                              f"({','.join('?' * len(chosen))}) GROUP BY series", list(chosen.values()))
            return {name_of[i]: (np.nan if v is None else float(v)) for i, v in rows}
        sql = "SELECT layer, MAX(value) FROM scalars WHERE metric = ?"
        params: list[Any] = [metric]
        if layers is not None:
            sql += f" AND layer IN ({','.join('?' * len(layers))})"
            params += list(layers)
        return {lay: (np.nan if v is None else float(v)) for lay, v in self._rows(sql + " GROUP BY layer", params)}

    def non_finite(self) -> pd.DataFrame:
        """Per metric and layer with NaN / +-inf values: ``metric, layer, count, first_step, n_nan, n_inf``.
        Reads only those rows (a partial index holds exactly them)."""
        import pandas as pd

        tail = "COUNT(*), MIN(step), SUM(value IS NULL), SUM(value > 1e308 OR value < -1e308)"
        if self.format == 2:
            rows = self._rows(f"SELECT s.metric, s.layer, {tail} FROM points AS p INDEXED BY points_nonfinite "
                              f"JOIN series AS s ON s.id = p.series WHERE {_NONFINITE} GROUP BY p.series")
        else:  # format-1 runs of the last versions have the partial index; older ones are scanned once
            indexed = bool(self._rows("SELECT 1 FROM sqlite_master WHERE type = 'index' "
                                      "AND name = 'scalars_nonfinite'"))
            rows = self._rows(f"SELECT metric, layer, {tail} FROM scalars "
                              f"{'INDEXED BY scalars_nonfinite ' if indexed else ''}"
                              f"WHERE {_NONFINITE} GROUP BY metric, layer")
        return pd.DataFrame(rows, columns=["metric", "layer", "count", "first_step", "n_nan", "n_inf"])

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

    def coverage(self) -> pd.DataFrame:
        """What the run recorded and what it could not, and why (columns ``kind, name,
        recorded, reason, probe``; see :mod:`dynascope.core.coverage`); empty for runs
        written before dynascope 0.2."""
        from ..core.coverage import coverage_frame

        return coverage_frame(self.meta.get("coverage", []))

    def marks(self, key: str | None = None) -> pd.DataFrame:
        if key is None:
            df = self._query("SELECT step, key, value FROM marks ORDER BY step")
        else:
            df = self._query("SELECT step, key, value FROM marks WHERE key = ? ORDER BY step", (key,))
        df["value"] = [json.loads(v) if v else None for v in df["value"]]
        return df


def _pairs(rows: list[tuple]) -> np.ndarray:
    """``[(step, value), ...]`` as a flat float array; NULL (None) values become NaN."""
    try:  # 2.5x less CPU than np.array on a list of tuples
        return np.fromiter(itertools.chain.from_iterable(rows), dtype=float, count=2 * len(rows))
    except TypeError:  # a None among the values
        return np.array(rows, dtype=float).reshape(-1)

def _run_name(meta: dict[str, Any], path: Path) -> str:
    """The run's name: the ``name=`` it was given, else the name of the folder it lives in now (a copied run
    is named after its copy; runs written before ``name_given`` was stored keep their stored name)."""
    folder = os.path.basename(os.path.normpath(os.path.abspath(path)))
    stored = meta.get("name")
    if not stored or meta.get("name_given") is False:
        return folder or str(path)
    return str(stored)


def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """The run directories under the folder ``path`` (at any depth, not inside a run; sorted by path), or
    ``[]``. ``dynascope report runs/`` and ``dynascope ls runs/`` read them as TensorBoard reads a log folder."""
    root = Path(path)
    if not root.is_dir():
        return []
    found = []
    for here, dirs, files in os.walk(root):
        if DB_NAME in files and here != str(root):
            found.append(Path(here))
            dirs.clear()  # a run's own folders hold no runs
        else:
            dirs.sort()
    return sorted(found, key=lambda p: [_natural_key(part) for part in p.relative_to(root).parts])


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Open a run directory for reading (also while it is being written).

    Raises :class:`RunStoreError` (a ``ValueError``) with one line naming the
    file and the problem for a path that is not a run or a damaged run."""
    return RunData(path)


def as_run(run: RunData | str | os.PathLike[str], *, cls: type[RunData] = RunData) -> RunData:
    """``run`` itself when it is a :class:`RunData` (or a subclass: passed through unchanged), else the
    run directory at the path ``run`` opened as ``cls`` (default RunData; ``dynascope.run.Run`` for the
    run with its events, forensics and snapshots). Raises TypeError (one line) for anything else, and
    :class:`RunStoreError` as :func:`load_run` does for a path that is not a readable run."""
    if isinstance(run, RunData):
        return run
    if isinstance(run, (str, os.PathLike)):
        return cls(run)
    raise TypeError(f"expected a run directory path (str or os.PathLike) or a RunData, got {type(run).__name__}")


def as_runs(runs: Any, owner: str = "") -> list[RunData]:
    """One run or several (run directory paths and/or RunData objects) as a list of RunData
    (:func:`as_run` on each); ValueError for none at all."""
    if isinstance(runs, (str, os.PathLike, RunData)):
        runs = [runs]
    elif not isinstance(runs, Iterable):
        raise TypeError(f"expected a run directory path, a RunData or a list of them, got {type(runs).__name__}")
    out = [as_run(r) for r in runs]
    if not out:
        raise ValueError(f"{owner + ' needs' if owner else 'give'} at least one run (a run directory path or a "
                         "RunData)")
    return out
