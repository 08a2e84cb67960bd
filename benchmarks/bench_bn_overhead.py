"""What the BatchNorm rows add to the default probes' overhead, and what the
opt-in distance and spectral probes cost, measured side by side.

The small BatchNorm CNN of ``bench_overhead.py`` (5 conv + BatchNorm units,
batch 32 x 3 x 32 x 32, SGD) trains in interleaved blocks of ``--steps``
steps: plain, default probes without ``"batchnorm"``, default probes (with
it), and optionally ``+ distance`` / ``+ spectral``; the table prints the
median over ``--repeats`` of each block's time over the plain block before
it, and the BatchNorm probe's own share: (with - without) / plain. Every
probed block reopens its run (``resume=True``) and ends with a flush inside
the timed region.

Usage::

    python benchmarks/bench_bn_overhead.py               # every=1 and every=10
    python benchmarks/bench_bn_overhead.py --quick --opt-in
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_overhead  # noqa: E402
from bench_overhead import setups, train_steps  # noqa: E402

import dynascope  # noqa: E402

BASE = ("activations", "gradients", "updates")
VARIANTS = {"default without batchnorm": BASE, "default (with batchnorm)": (*BASE, "batchnorm")}
OPT_IN = {"default + distance": (*BASE, "batchnorm", "distance"),
          "default + spectral": (*BASE, "batchnorm", "spectral")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="5 repeats of 10 steps")
    ap.add_argument("--opt-in", action="store_true", help="also time the distance and spectral probes")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, robust to other processes on a shared machine (use with --threads 1)")
    args = ap.parse_args()
    if args.clock == "cpu":
        import time

        bench_overhead.CLOCK = time.process_time
    if args.quick:
        args.steps, args.repeats = 10, 5
    torch.set_num_threads(args.threads)
    variants = dict(VARIANTS, **(OPT_IN if args.opt_in else {}))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"{args.clock} clock; {args.repeats} interleaved repeats of {args.steps} steps; "
          "ratio = median of probed / plain block time")
    tmp = Path(tempfile.mkdtemp(prefix="dynascope-bn-bench-"))
    try:
        for every in (1, 10):
            torch.manual_seed(0)
            model, opt, batch, loss_fn = setups(True)["small CNN + BatchNorm"]()
            train_steps(model, opt, batch, loss_fn, 3)
            ratios: dict[str, list[float]] = {k: [] for k in variants}
            opened: set[str] = set()
            for _ in range(args.repeats):
                for name, probes in variants.items():
                    plain = train_steps(model, opt, batch, loss_fn, args.steps)
                    with dynascope.probe(model, opt, tmp / f"e{every}-{list(variants).index(name)}", every=every,
                                         probes=probes, resume=name in opened, flush_seconds=1e9) as run:
                        opened.add(name)
                        t = train_steps(model, opt, batch, loss_fn, args.steps, run)
                    ratios[name].append(t / plain)
            med = {k: statistics.median(v) for k, v in ratios.items()}
            line = ", ".join(f"{k} {v:.3f}x" for k, v in med.items())
            bn_share = med["default (with batchnorm)"] - med["default without batchnorm"]
            print(f"every={every:<3d} {line}; batchnorm rows add {bn_share:+.3f} of a plain step", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
