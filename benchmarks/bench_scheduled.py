"""Cost of the calibration, noise-scale, collapse and example-score recorders in the demo's setting (digits MLP
with BatchNorm, width 128).

Side by side in one process, interleaved, median of ``--repeats`` blocks:

* one plain training step (batch 64, forward + backward + SGD step);
* one ``Calibration.run`` on the 297 held-out digits;
* one ``NoiseScale.run`` on a probe batch of 512 in 8 micro-batches;
* one ``Collapse.run`` on the held-out digits;
* ``example_scores`` EL2N and GraNd on 512 examples.

Printed as milliseconds and as multiples of one training step, and the
demo's added time per run (600 steps: Calibration every 25, NoiseScale every
50) as a share of the demo's training steps alone.

    python benchmarks/bench_scheduled.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import dynascope
from dynascope.commands.demo import HELD_OUT, make_mlp
from dynascope.datasets import load_digits
from dynascope.probes.scheduled import ScheduledContext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = load_digits()
    held = (x[HELD_OUT:], y[HELD_OUT:])
    probe = (x[:512], y[:512])
    model = make_mlp(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctx = ScheduledContext(model, opt, 0, False, lambda *a: None, lambda *a: None)
    recorders = {
        "calibration": dynascope.Calibration(every=25, batch=held),
        "noise_scale": dynascope.NoiseScale(every=50, batch=probe, loss_fn=F.cross_entropy, micro_batches=8),
        "collapse": dynascope.Collapse(every=25, batch=held),
    }

    def train_step() -> None:
        idx = torch.randint(0, HELD_OUT, (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    jobs = {"train step": train_step}
    jobs.update({k: (lambda r=r: r.run(ctx)) for k, r in recorders.items()})
    jobs["el2n (512)"] = lambda: dynascope.example_scores(model, None, probe, "el2n", progress=False)
    jobs["grand (512)"] = lambda: dynascope.example_scores(model, F.cross_entropy, probe, "grand", progress=False)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for fn in jobs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            n = 20 if name == "train step" else 3
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    step = statistics.median(times["train step"])
    print(f"{'':<16}{'ms (median)':>12}{'x train step':>14}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<16}{1e3 * med:>12.2f}{med / step:>14.1f}")
    added = 24 * statistics.median(times["calibration"]) + 12 * statistics.median(times["noise_scale"])
    print(f"demo run (600 steps): recorders add {added:.2f} s = {added / (600 * step):.0%} of its "
          f"{600 * step:.2f} s of bare training steps")
    print("per-measurement spread (max/min over repeats):",
          {k: round(float(np.max(v) / np.min(v)), 2) for k, v in times.items()})


if __name__ == "__main__":
    main()
