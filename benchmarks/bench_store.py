"""Run store size and read speed: store format 2 against format 1, side by side.

Writes the synthetic run of bench_report.py (STEPS recorded steps x 100
layers, 37 metrics: about 17 million values at 10,000 steps) twice, the way
the probes flush it (every 100 steps, one transaction): once through today's
RunStore (format 2: integer series ids, a WITHOUT ROWID table keyed by
(series, step)) and once with the format-1 DDL (names as text in every row
plus a (metric, layer, step) index). Then prints, per format:

* bytes on disk per recorded value (database file after close / values),
* ``load_run(d).scalars(metric)`` for one metric (1 million rows at 10k steps):
  median of --repeats, the two formats interleaved,
* the wall time of ``dynascope.report`` on the run (median of --repeats),

against the targets (<= 24 bytes per value, scalars() <= 0.5 s, report <= 3 s).

    python benchmarks/bench_store.py [--steps 10000] [--repeats 3] [--dir /tmp/dynascope-bench-store] [--reuse]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

# the format-1 schema (dynascope <= 0.1), kept here to measure the old store side by side
V1_DDL = """
CREATE TABLE IF NOT EXISTS scalars (step INTEGER NOT NULL, metric TEXT NOT NULL, layer TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS scalars_metric ON scalars (metric, layer, step);
CREATE INDEX IF NOT EXISTS scalars_nonfinite ON scalars (metric, layer, step)
  WHERE value IS NULL OR value > 1e308 OR value < -1e308;
CREATE TABLE IF NOT EXISTS artifacts (step INTEGER NOT NULL, name TEXT NOT NULL, file TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS marks (step INTEGER NOT NULL, key TEXT NOT NULL, value TEXT);
"""


class V1Store:
    """The format-1 writer (as dynascope 0.1 wrote it: rows sorted in index order, one transaction)."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path, self.meta = path, {}
        self.con = sqlite3.connect(path / "dynascope.sqlite")
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("PRAGMA cache_size=-32768")
        self.con.executescript(V1_DDL)

    def write_meta(self, meta: dict) -> None:
        self.meta.update(meta)
        (self.path / "meta.json").write_text(json.dumps(self.meta))

    def write_scalars(self, rows: list) -> None:
        rows = sorted(rows, key=lambda r: (r[1], r[2]))
        with self.con:
            self.con.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.con.close()


def _bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).with_name("bench_report.py"))
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def write(path: Path, steps: int, v1: bool) -> tuple[int, float]:
    """Write the synthetic run; returns (values written, seconds)."""
    import dynascope.store as store_mod

    br = _bench_report()
    br.STEPS = steps
    counted = [0]
    real = store_mod.RunStore

    def factory(p, mode="overwrite"):
        if v1:
            s = V1Store(Path(p))
        else:
            s = real(p, mode=mode)
        inner = s.write_scalars

        def write_scalars(rows):
            rows = list(rows)
            counted[0] += len(rows)
            inner(rows)
        s.write_scalars = write_scalars
        return s

    store_mod.RunStore = factory  # write_run imports RunStore from dynascope.store
    try:
        if path.exists():
            import shutil

            shutil.rmtree(path)
        t = time.perf_counter()
        br.write_run(path)
        return counted[0], time.perf_counter() - t
    finally:
        store_mod.RunStore = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "dynascope-bench-store"))
    ap.add_argument("--no-report", action="store_true", help="skip the report timing")
    ap.add_argument("--reuse", action="store_true", help="reuse the runs written by an earlier call in --dir")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from dynascope import load_run
    from dynascope.reports.html import report

    root = Path(args.dir)
    dirs = {"format 2": root / "v2", "format 1": root / "v1"}
    n_values = {}
    for label, d in dirs.items():
        if args.reuse and (d / "dynascope.sqlite").exists():
            con = sqlite3.connect(d / "dynascope.sqlite")
            n_values[label] = con.execute(f"SELECT COUNT(*) FROM {'scalars' if label == 'format 1' else 'points'}"
                                          ).fetchone()[0]
            con.close()
            print(f"{label}: reusing {d} ({n_values[label]} values)")
            continue
        n, secs = write(d, args.steps, v1=label == "format 1")
        n_values[label] = n
        print(f"{label}: wrote {n} values in {secs:.1f} s ({n / secs / 1e3:.0f} k values/s)")
    sizes = {k: (d / "dynascope.sqlite").stat().st_size for k, d in dirs.items()}
    for k in dirs:
        print(f"{k}: {sizes[k] / 1e6:.0f} MB, {sizes[k] / n_values[k]:.1f} bytes per value")

    metric = "act.var"
    # wall and CPU time of this process: on a shared machine the wall time stretches with the load, CPU does not
    times: dict[str, list[float]] = {k: [] for k in dirs}
    cpu: dict[str, list[float]] = {k: [] for k in dirs}
    for _ in range(args.repeats):  # interleaved
        for k, d in dirs.items():
            t, c = time.perf_counter(), time.process_time()
            df = load_run(d).scalars(metric)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            assert len(df) == args.steps * 100
    for k in dirs:
        print(f"{k}: scalars({metric!r}) ({args.steps * 100} rows) median wall {statistics.median(times[k]):.3f} s "
              f"(runs: {', '.join(f'{x:.3f}' for x in times[k])}), median CPU {statistics.median(cpu[k]):.3f} s")

    rep: dict[str, list[float]] = {k: [] for k in dirs}
    rep_cpu: dict[str, list[float]] = {k: [] for k in dirs}
    if not args.no_report:
        out = Path(tempfile.mkdtemp())
        for _ in range(args.repeats):
            for k, d in dirs.items():
                t, c = time.perf_counter(), time.process_time()
                report([d], out / f"{k.replace(' ', '')}.html")
                rep[k].append(time.perf_counter() - t)
                rep_cpu[k].append(time.process_time() - c)
        for k in dirs:
            runs = ", ".join(f"{x:.2f}" for x in rep[k])
            print(f"{k}: report median wall {statistics.median(rep[k]):.2f} s (runs: {runs}), "
                  f"median CPU {statistics.median(rep_cpu[k]):.2f} s")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times stretch with it)")
    bpv = sizes["format 2"] / n_values["format 2"]
    sc, sc_cpu = statistics.median(times["format 2"]), statistics.median(cpu["format 2"])
    line = [f"bytes/value {bpv:.1f} (target <= 24: {'met' if bpv <= 24 else 'MISSED'}, "
            f"{sizes['format 1'] / sizes['format 2']:.1f}x smaller than format 1)",
            f"scalars() wall {sc:.3f} s / CPU {sc_cpu:.3f} s (target <= 0.5 s at 10k x 100: wall "
            f"{'met' if sc <= 0.5 else 'MISSED'}, CPU {'met' if sc_cpu <= 0.5 else 'MISSED'})"]
    if rep["format 2"]:
        r, r_cpu = statistics.median(rep["format 2"]), statistics.median(rep_cpu["format 2"])
        line.append(f"report wall {r:.2f} s / CPU {r_cpu:.2f} s (target <= 3 s: wall {'met' if r <= 3 else 'MISSED'}"
                    f", CPU {'met' if r_cpu <= 3 else 'MISSED'}; format 1 {statistics.median(rep['format 1']):.2f} s"
                    f" / {statistics.median(rep_cpu['format 1']):.2f} s)")
    print("targets: " + "; ".join(line))


if __name__ == "__main__":
    main()
