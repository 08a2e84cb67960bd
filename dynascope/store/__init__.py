"""Run directory: an SQLite table of scalar rows, a metadata file and an
artifacts folder of named arrays (architecture invariant 6).

Layout of a run directory::

    RUN/
      dynascope.sqlite   tables: series(id, metric, layer)      one row per (metric, layer)
                                 points(series, step, value)    the values, clustered by (series, step)
                                 artifacts(step, name, file, meta),
                                 marks(step, key, value)
                         view:   scalars(step, metric, layer, value)
      meta.json          model summary, optimizer, torch version, seed, times
      artifacts/         one .npz file per artifact

Store format 2 (``PRAGMA user_version = 2``): every (metric, layer) pair gets
a small integer id in ``series``, and the values live in a ``WITHOUT ROWID``
table keyed by ``(series, step)``, so a row costs about 17 bytes (a 1-2 byte
id, a 2-3 byte step, an 8-byte REAL, the record header) and one layer's
series is one contiguous range of the B-tree. The view ``scalars`` shows the
rows with their names, as format 1 stored them. Format 1 (before version
0.2: a ``scalars`` table with the names as text in every row and a second
copy in its index, 78-94 bytes per value) is read as it is; resuming such a
run (``resume=True``, or :func:`convert`) converts it to format 2 first.

The database runs in WAL mode, every flush is one transaction, so a process
killed with SIGKILL loses at most its unflushed interval and readers (reports)
can open the run while training still writes. SQLite stores NaN as NULL; it is
read back as NaN. ``layer`` is ``""`` for run-level metrics such as ``loss``.
A repeated ``(step, metric, layer)`` keeps the last value written.

Training never stops for a storage fault: the session writes through a
:class:`ResilientWriter`, which keeps rows in memory while the disk is full,
the directory is read-only or removed, or the database is locked, warns once,
retries at every flush and records what it had to drop as ``store.dropped_rows``.

Modules: ``schema`` (the names, the SQL schema, the errors and the helpers
both sides share), ``writer`` (:class:`RunStore`, :func:`convert`),
``resilient`` (:class:`ResilientWriter`), ``reader`` (:class:`RunData`,
:func:`load_run`, :func:`as_run`) and ``query`` (selective reads cached per
report). Import them from here.
"""

from .reader import RunData, as_run, as_runs, load_run
from .resilient import ResilientWriter
from .schema import (
    ARTIFACTS,
    DB_NAME,
    META_NAME,
    STORE_FORMAT,
    NotARunError,
    RunExistsError,
    RunStoreError,
    StorageFault,
    now_iso,
)
from .writer import RunStore, convert

__all__ = ["RunStore", "RunData", "load_run", "convert", "ResilientWriter", "RunStoreError", "NotARunError",
           "RunExistsError", "DB_NAME", "META_NAME", "STORE_FORMAT", "as_run", "as_runs",
           "StorageFault", "ARTIFACTS", "now_iso"]
