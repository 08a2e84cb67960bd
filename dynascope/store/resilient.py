"""Storage faults during training: :class:`ResilientWriter`, the session's side of a
:class:`~dynascope.store.RunStore`, which never lets one reach the training loop (see :mod:`dynascope.store`)."""

from __future__ import annotations

import collections
import sqlite3
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..core.errors import describe
from .writer import RunStore

__all__ = ["ResilientWriter"]

_STORAGE_ERRORS = (sqlite3.Error, OSError)


class ResilientWriter:
    """The session's side of a :class:`RunStore`: no storage fault ever reaches the training loop.

    On a fault (disk full, read-only or removed run directory, a database
    locked by another process) it warns once, naming the problem, keeps the
    rows and marks in memory and retries at every later write. At most
    ``max_pending_rows`` rows (and as many marks) wait; beyond that the oldest
    are dropped and counted. Artifacts that cannot be written are dropped and
    counted (arrays may be large). When a write succeeds again, the counts of
    the fault episode are recorded as ``store.dropped_rows`` and
    ``store.dropped_artifacts`` (layer ``""``) at the last step seen, also
    when they are 0. A removed run directory is created again. Metadata writes
    are retried until one succeeds.
    """

    max_pending_rows: int = 500_000
    busy_timeout: float = 2.0

    def __init__(self, store: RunStore) -> None:
        self.store = store
        store.set_busy_timeout(self.busy_timeout)
        self._rows: collections.deque[tuple[int, str, str, float]] = collections.deque()
        self._marks: collections.deque[tuple[int, str, Any]] = collections.deque()
        self._meta_pending = False
        self._dropped_rows = 0
        self._dropped_artifacts = 0
        self._last_step = 0
        self.fault: str | None = None  # the current problem, None while writes succeed
        self.faults = 0  # fault episodes so far
        self.warned = False

    # the RunStore attributes a session reads
    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def meta(self) -> dict[str, Any]:
        return self.store.meta

    @property
    def resumed(self) -> bool:
        return self.store.resumed

    def last_step(self) -> int | None:
        return self.store.last_step()

    # -- writes that never raise a storage fault ----------------------------------------------------------
    def write_scalars(self, rows: Iterable[tuple[int, str, str, float]]) -> None:
        rows = list(rows)
        if rows:
            self._last_step = max(self._last_step, max(int(r[0]) for r in rows))
        self._rows.extend(rows)
        if not self._drain():
            self._trim()

    def mark(self, step: int, key: str, value: Any) -> None:
        self._last_step = max(self._last_step, int(step))
        self._marks.append((int(step), str(key), value))
        if not self._drain():
            self._trim()

    def write_artifact(self, name: str, step: int, arrays: dict[str, np.ndarray],
                       meta: dict[str, Any] | None = None) -> Path | None:
        return self._write(self.store.write_artifact, name, step, arrays, meta)

    def write_file(self, name: str, step: int, save: Callable[[BinaryIO], Any], suffix: str,
                   meta: dict[str, Any] | None = None) -> Path | None:
        return self._write(self.store.write_file, name, step, save, suffix, meta)

    def _write(self, write: Callable[..., Path], name: str, step: int, *args: Any) -> Path | None:
        """An artifact write that never raises a storage fault: dropped and counted instead."""
        self._last_step = max(self._last_step, int(step))
        if self._drain():
            try:
                return write(name, step, *args)
            except _STORAGE_ERRORS as exc:
                self._failed(exc)
        self._dropped_artifacts += 1
        return None

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.store.meta.update(meta)
        self._meta_pending = True
        self._drain()

    def flush(self) -> bool:
        """Try to write what waits; True when nothing waits any more."""
        return self._drain()

    def close(self) -> None:
        self._drain()
        try:
            self.store.close()
        except _STORAGE_ERRORS:
            pass

    # -- internals ------------------------------------------------------------------------------------------
    def _trim(self) -> None:
        """After a failed write: keep the newest ``max_pending_rows`` rows (and marks), count the rest."""
        cap = self.max_pending_rows
        for buf in (self._rows, self._marks):
            extra = len(buf) - cap
            if extra > 0:
                for _ in range(extra):
                    buf.popleft()
                self._dropped_rows += extra

    def _drain(self) -> bool:
        if self.fault is None and not self._rows and not self._marks and not self._meta_pending:
            return True
        store = self.store
        try:
            if self.fault is not None or store.closed:
                if store.reconnect():  # a new database: reopen wrote the metadata
                    self._meta_pending = False
            else:
                store.check()
            rows = list(self._rows)
            if self.fault is not None:
                rows.append((self._last_step, "store.dropped_rows", "", float(self._dropped_rows)))
                rows.append((self._last_step, "store.dropped_artifacts", "", float(self._dropped_artifacts)))
            if rows:
                store.write_scalars(rows)
            self._rows.clear()
            if self.fault is not None:
                self.fault = None
                self._dropped_rows = self._dropped_artifacts = 0
            if self._marks:
                store.write_marks(list(self._marks))
                self._marks.clear()
            if self._meta_pending:
                store.write_meta({})
                self._meta_pending = False
            return True
        except _STORAGE_ERRORS as exc:
            self._failed(exc)
            return False

    def _failed(self, exc: BaseException) -> None:
        if self.fault is None:
            self.faults += 1
        self.fault = describe(exc)
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"dynascope: cannot write the run store {str(self.store.path)!r} ({self.fault}); training goes on "
                f"unchanged, up to {self.max_pending_rows} rows wait in memory (older ones are dropped and counted "
                "as 'store.dropped_rows') and writing is retried at every flush", RuntimeWarning, stacklevel=4)


