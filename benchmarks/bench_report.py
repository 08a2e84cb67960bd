"""Report generation time and file size on a long, wide run.

A synthetic run of 10,000 recorded steps and 100 layers (100 Linear modules
``layers.i`` with weights ``layers.i.weight``: per module act.mean, act.var,
act.channel_sq_mean, act.channel_var, act.absmax, act.zero_frac, grad.norm;
per weight grad.norm, weight.norm, update.relative, update.angle,
update.angle_row, grad.weight_cos, grad.weight_cos_rowmax,
grad.weight_cos_threshold, scale_invariant, lr.effective; run-level loss,
accuracy, grad.global_norm: about 17 million rows) is written once through
RunStore the way the probes flush it (every 100 steps, all metrics of those
steps; cached in --run-dir), then ``dynascope.report`` runs 3 times.
Prints the median wall time, the CPU time of this process, the time per
figure and for the findings, and the HTML size. Targets: < 10 s, < 10 MB.

    python benchmarks/bench_report.py [--run-dir /tmp/dynascope-bench-report] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = 10_000
LAYERS = 100
FLUSH = 100


def write_run(path: Path) -> None:
    from dynascope.store import RunStore

    rng = np.random.default_rng(0)
    store = RunStore(path, mode="overwrite")
    mods = [f"layers.{i}" for i in range(LAYERS)]
    params = [f"{m}.weight" for m in mods]
    store.write_meta({
        "name": "bench 10k x 100 step-major",
        "model": {"class": "DeepMLP", "n_parameters": LAYERS * 64 * 64, "n_trainable": LAYERS * 64 * 64},
        "optimizer": {"class": "SGD", "hyperparameters": [{"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}]},
        "torch_version": "2.13.0+cpu", "every": 1, "modules": mods, "parameters": params, "blocks": mods,
        "status": "finished", "wall_time_s": 1234.0, "device": "cpu", "probes": ["activations", "gradients", "updates"],
    })
    steps = np.arange(STEPS)
    frac = steps / STEPS
    cols: list[tuple[str, str, np.ndarray]] = []  # (metric, layer, values over all steps)

    def put(metric: str, layer: str, values: np.ndarray) -> None:
        cols.append((metric, layer, np.asarray(values, dtype=float)))

    loss = 2.3 * np.exp(-4 * frac) + 0.05 + 0.03 * rng.standard_normal(STEPS)
    loss[int(0.7 * STEPS)] = 5.0  # step 7000 of 10,000
    put("loss", "", loss)
    put("accuracy", "", np.clip(1 - loss / 2.4, 0, 1))
    put("grad.global_norm", "", 1 + 0.1 * rng.standard_normal(STEPS))
    for i, (m, p) in enumerate(zip(mods, params)):
        noise = rng.standard_normal(STEPS)
        var = (1 + 0.05 * i) * (1 + 0.02 * noise)
        put("act.mean", m, 0.01 * noise)
        put("act.var", m, var)
        put("act.channel_sq_mean", m, 1e-4 * (1 + noise**2))
        put("act.channel_var", m, 0.95 * var)
        put("act.absmax", m, 4 * np.sqrt(var))
        put("act.zero_frac", m, np.full(STEPS, 0.5))
        g = np.abs(np.exp(-frac) * (1 + 0.1 * noise))
        put("grad.norm", m, g)
        put("grad.norm", p, g)
        w = 8 * (1 + 0.1 * frac)
        put("weight.norm", p, w)
        ang = np.abs(0.01 + 0.002 * noise)
        put("update.relative", p, ang)
        put("update.angle", p, ang)
        put("update.angle_row", p, ang)
        put("grad.weight_cos", p, 0.001 * noise)
        put("grad.weight_cos_rowmax", p, np.abs(0.02 + 0.001 * noise))
        put("grad.weight_cos_threshold", p, np.full(STEPS, 0.1 / 8))
        put("scale_invariant", p, np.zeros(STEPS))
        put("lr.effective", p, 0.05 / w**2)
    # written as the probes flush: every FLUSH steps, all metrics of those steps in one transaction
    # (step-major, so one layer's series is spread over the whole table, as in a real run)
    names = [(m, lay) for m, lay, _ in cols]
    values = np.stack([v for _, _, v in cols], axis=1)  # steps x columns
    for a in range(0, STEPS, FLUSH):
        rows = [(int(s), m, lay, float(values[s, j])) for s in range(a, min(a + FLUSH, STEPS))
                for j, (m, lay) in enumerate(names)]
        store.write_scalars(rows)
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=str(Path(tempfile.gettempdir()) / "dynascope-bench-report"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from dynascope import load_run
    from dynascope.analysis.findings import findings
    from dynascope.reports.figures import all_figures
    from dynascope.reports.html import report
    from dynascope.store import query as _data

    run_dir = Path(args.run_dir)
    name = "bench 10k x 100 step-major"
    if not (run_dir / "dynascope.sqlite").exists() or load_run(run_dir).meta.get("name") != name:
        t = time.perf_counter()
        write_run(run_dir)
        print(f"wrote the synthetic run in {time.perf_counter() - t:.1f} s -> {run_dir}")
    import sqlite3

    from dynascope.store import RunStore

    con = sqlite3.connect(run_dir / "dynascope.sqlite")
    has_index = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'scalars_nonfinite'").fetchone()
    con.close()
    if not has_index:  # a run cached by an older version: opening it for writing adds the index
        RunStore(run_dir, mode="resume").close()
    db = run_dir / "dynascope.sqlite"
    print(f"run: {STEPS} steps x {LAYERS} layers, database {db.stat().st_size / 1e6:.0f} MB")

    out = Path(tempfile.mkdtemp()) / "report.html"
    walls, cpus = [], []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        report([run_dir], out)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    size = out.stat().st_size
    print(f"report: median wall {statistics.median(walls):.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)}), "
          f"median CPU {statistics.median(cpus):.2f} s; HTML {size / 1e6:.2f} MB")
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores (wall time stretches with it; CPU time does not)")
    con = sqlite3.connect(db)
    covering = con.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'scalars'").fetchall()
    con.close()
    print("indexes: " + "; ".join(" ".join(str(r[0]).split(" ON ")[-1].split()) for r in covering if r[0]))
    print(f"targets: < 10 s -> {'met' if statistics.median(walls) < 10 else 'MISSED'}; "
          f"< 10 MB -> {'met' if size < 10e6 else 'MISSED'}")

    # breakdown on a fresh reader (no cached queries)
    run = load_run(run_dir)
    t = time.perf_counter()
    found = findings([run])
    print(f"  findings: {time.perf_counter() - t:.2f} s ({len(found)} found)")
    t = time.perf_counter()
    _data.non_finite_summary(load_run(run_dir))
    print(f"    of which the non-finite scan: {time.perf_counter() - t:.2f} s")
    from dynascope.reports.html import _embed

    for spec in all_figures():
        t = time.perf_counter()
        fig = spec.fn([run])
        t1 = time.perf_counter()
        if fig is None:
            continue
        body = _embed(fig)
        print(f"  {spec.key:24s} data+draw {t1 - t:.2f} s, embed {time.perf_counter() - t1:.2f} s, "
              f"{len(body) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
