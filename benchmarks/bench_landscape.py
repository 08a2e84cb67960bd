"""Loss-landscape speed on CPU (2 threads): cost per grid point against one plain
forward pass, against loss-landscapes 3.0.6 on the same evaluations, vmap vs the
in-place loop, and the adaptive grid's evaluation count and contour error.

Model: a ~95k-parameter BatchNorm CNN on 512 samples (3x16x16), briefly trained
so BatchNorm biases are non-zero (loss-landscapes divides by them). Every
number is the median over repeats measured side by side in this one process.

    python -u benchmarks/bench_landscape.py [--repeats 7] [--resolution 7] [--adaptive-resolution 33]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynascope.diagnostics.landscape import loss_landscape


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def make_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    teacher = torch.randn(3 * 16 * 16, 10, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def contour_error(full: np.ndarray, approx: np.ndarray, n_levels: int = 20) -> tuple[float, float, float]:
    """(max |error| / range, mean |error| / range, fraction of points whose contour band differs) on the
    figure's levels (log-spaced when the losses span a decade, as in dynascope's contour figure)."""
    lo, hi = float(full.min()), float(full.max())
    levels = np.geomspace(lo, hi, n_levels) if lo > 0 and hi / lo > 10 else np.linspace(lo, hi, n_levels)
    err = np.abs(approx - full)
    bands_full = np.digitize(full, levels)
    bands_approx = np.digitize(approx, levels)
    return float(err.max() / (hi - lo)), float(err.mean() / (hi - lo)), float((bands_full != bands_approx).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--resolution", type=int, default=7)
    ap.add_argument("--adaptive-resolution", type=int, default=33)
    ap.add_argument("--adaptive-batch", type=int, default=128, help="samples for the adaptive-grid study")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--tols", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--parts", nargs="+", default=["point", "speed", "adaptive"],
                    choices=["point", "speed", "adaptive"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    x, y = make_data()
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    train(model, x, y, args.train_steps)
    R = args.resolution
    n_points = R * R
    print(f"model: {n_params} parameters, batch {len(x)}, grid {R}x{R} = {n_points} points, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")

    def plain_forward() -> None:
        with torch.no_grad():
            F.cross_entropy(model(x), y).item()

    if "point" in args.parts:
        per_point(args, model, x, y, plain_forward)
    if "speed" in args.parts:
        for _ in range(3):
            plain_forward()  # warm up
        t_fwd = median_time(plain_forward, args.repeats * 4)
        print(f"plain no_grad forward + loss: {t_fwd * 1e3:.2f} ms (median of {args.repeats * 4})")
        speed(args, model, x, y, R, n_points, plain_forward)
    if "adaptive" in args.parts:
        adaptive(args, model, x, y)


def per_point(args, model, x, y, plain_forward) -> None:
    """One grid point (set the weights in place + loss) against one plain forward, interleaved point by
    point: the finest-grained comparison, least exposed to load changes."""
    from dynascope.diagnostics.landscape.directions import filter_normalized_direction
    from dynascope.diagnostics.landscape.engine import _Evaluator, _Mover

    g = torch.Generator().manual_seed(0)
    dirs = [filter_normalized_direction(model, generator=g) for _ in range(2)]
    ev = _Evaluator(model, F.cross_entropy, (x, y), None, "eval", None)
    ev.prepare()
    mover = _Mover(model, dirs)
    try:
        def point(a: float, b: float) -> None:
            with torch.no_grad():
                mover.set([a, b])
                float(ev()[0])

        def touched() -> None:  # weights written in place (same values), then a plain forward
            with torch.no_grad():
                torch._foreach_copy_(mover.params, mover.base)
            plain_forward()

        for f in (plain_forward, touched, lambda: point(0.1, 0.1)):
            f()
        n = max(40, args.repeats * 6)
        tp, tt, tq, ts = [], [], [], []
        for i in range(n):
            t0 = time.perf_counter()
            plain_forward()
            tp.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            touched()
            tt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            point(0.1 * (i % 7) - 0.3, 0.05 * (i % 5) - 0.1)
            tq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mover.set([0.2, -0.1])
            ts.append(time.perf_counter() - t0)
    finally:
        mover.restore()
    med = statistics.median
    print(f"\nper grid point, interleaved with plain forwards ({n} each):")
    print(f"  plain no_grad forward + loss           {med(tp) * 1e3:8.2f} ms")
    print(f"  in-place weight update alone           {med(ts) * 1e3:8.3f} ms")
    print(f"  grid point (update + loss)             {med(tq) * 1e3:8.2f} ms   x forward "
          f"{med(a / b for a, b in zip(tq, tp)):.3f}")
    print(f"  forward after an in-place weight write {med(tt) * 1e3:8.2f} ms   x forward "
          f"{med(a / b for a, b in zip(tt, tp)):.3f}")


def speed(args, model, x, y, R, n_points, plain_forward) -> None:
    def ours(method: str = "loop", chunk: int = 8) -> None:
        loss_landscape(model, F.cross_entropy, (x, y), dims=2, resolution=R, method=method, chunk=chunk,
                       progress=False)

    candidates: dict[str, object] = {
        "plain no_grad forward x points (the floor)": lambda: [plain_forward() for _ in range(n_points)],
        "dynascope loop (all-in: directions, centre, restore)": lambda: ours("loop"),
        "dynascope vmap, chunk 4": lambda: ours("vmap", 4),
        "dynascope vmap, chunk 16": lambda: ours("vmap", 16),
    }
    try:
        import loss_landscapes
        import loss_landscapes.metrics

        metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)

        def ll() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss_landscapes.random_plane(model, metric, distance=1, steps=R, normalization="filter",
                                             deepcopy_model=True)

        def ll_nograd() -> None:
            with torch.no_grad():
                ll()

        candidates["loss-landscapes 3.0.6 random_plane (as documented)"] = ll
        candidates["loss-landscapes 3.0.6 random_plane under torch.no_grad"] = ll_nograd
    except ImportError:
        print("loss-landscapes is not installed: pip install -c constraints-cpu.txt loss-landscapes==3.0.6")

    # Interleaved rounds: every method once per round, so load changes hit all of them alike; the ratio to
    # the floor is taken within each round, then the median over rounds.
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            times[name].append(time.perf_counter() - t0)
    floor_name = "plain no_grad forward x points (the floor)"
    loop_name = "dynascope loop (all-in: directions, centre, restore)"

    print(f"\n{'method':58s} {'median s':>8s} {'ms/point':>9s} {'x forward':>10s} {'x dynascope loop':>17s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        vs_floor = statistics.median(a / b for a, b in zip(ts, times[floor_name]))
        vs_loop = statistics.median(a / b for a, b in zip(ts, times[loop_name]))
        print(f"{name:58s} {t:8.3f} {t / n_points * 1e3:9.2f} {vs_floor:10.3f} {vs_loop:17.3f}")
    print("(ratios: median over rounds of the per-round ratio; 'x forward' is per grid point against one plain "
          "no_grad forward + loss, timed in the same round)")



def adaptive(args, model, x, y) -> None:
    # Adaptive grid: evaluation count and contour error against the full grid (a smaller batch keeps the
    # full reference grid affordable; the count and the error are what is measured here, not the speed).
    RA = args.adaptive_resolution
    xa, ya = x[: args.adaptive_batch], y[: args.adaptive_batch]
    print(f"\nadaptive grid {RA}x{RA} ({RA * RA} points), span 1, batch {len(xa)}:")
    t0 = time.perf_counter()
    full = loss_landscape(model, F.cross_entropy, (xa, ya), dims=2, resolution=RA, progress=False)
    t_full = time.perf_counter() - t0
    print(f"  full grid: {full.n_evaluations} evaluations, {t_full:.1f} s; loss {full.losses.min():.3f} .. "
          f"{full.losses.max():.3f}")
    print(f"  {'tol':>6s} {'evals':>6s} {'share':>6s} {'time x':>7s} {'max err/range':>14s} {'mean err/range':>15s} "
          f"{'band flips':>11s}")
    for tol in args.tols:
        t0 = time.perf_counter()
        ada = loss_landscape(model, F.cross_entropy, (xa, ya), dims=2, resolution=RA, adaptive=True,
                             adaptive_tol=tol, progress=False)
        t_ada = time.perf_counter() - t0
        mx, mean, flips = contour_error(full.losses, ada.losses)
        print(f"  {tol:6.3f} {ada.n_evaluations:6d} {ada.n_evaluations / RA**2:6.1%} {t_ada / t_full:7.3f} "
              f"{mx:14.4f} {mean:15.5f} {flips:11.2%}")
    print("  (err/range: |adaptive - full| / (max - min of the full grid); band flips: share of grid points whose "
          "contour band, on the figure's 20 levels, differs)")


if __name__ == "__main__":
    main()
