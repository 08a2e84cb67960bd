"""Cost of ``dynascope.gradient_tests`` (Cockpit's per-example quantities) per call, as a ratio to a plain
forward + backward pass of the same model on the same batch.

Models: an MLP (64-64-10, 4,810 parameters) and a small CNN (two 3x3 convolutions, 8 and 16 channels,
and a linear head on 8x8 inputs, 3,818 parameters), batch 128, 2 threads, float32. Per repeat every
variant runs once, interleaved (plain, variant 1, variant 2, ..., plain, ...), each timed as the mean of
``--calls`` calls (``full``: one call); the table gives the median over ``--repeats`` repeats of the time
per call divided by the plain pass's median. Variants:

* ``norms (hooks)``: ``per_example_gradients(second_moment=False)``: ``|g_i|^2`` and ``<g_i, gbar>`` from
  module hooks (what the norm, inner-product and orthogonality tests need);
  ``norms (torch.func)`` / ``norms (loop)``: the same by ``vmap(grad)`` / an autograd loop over examples;
* ``economy``: ``gradient_tests(hist2d=False, tic=False)``: the tests, GSNR, CABS, EB and the 1D histogram
  (Cockpit's economy set computes the three tests and the 1D histogram from per-example gradients);
* ``all but TIC``: ``gradient_tests(tic=False)`` (adds the 2D histogram);
* ``full``: ``gradient_tests()`` with TIC from the exact Hessian diagonal (one Hessian-vector product per
  parameter coordinate, batched).

Usage::

    python benchmarks/bench_gradient_tests.py            # the table in docs/benchmarks.md
    python benchmarks/bench_gradient_tests.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynascope.diagnostics.gradient_tests import gradient_tests  # noqa: E402
from dynascope.diagnostics.per_example import per_example_gradients  # noqa: E402


def models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    return {"MLP": (mlp, (x, y)), "CNN": (cnn, (x, y))}


def variants(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Callable[[], object]]:
    x, y = batch

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    loss = F.cross_entropy
    return {
        "plain fwd+bwd": plain,
        "norms (hooks)": lambda: per_example_gradients(model, loss, batch, second_moment=False, mode="train"),
        "norms (torch.func)": lambda: per_example_gradients(model, loss, batch, second_moment=False, engine="func",
                                                            mode="train"),
        "norms (loop)": lambda: per_example_gradients(model, loss, batch, second_moment=False, engine="loop",
                                                      mode="train"),
        "economy": lambda: gradient_tests(model, loss, batch, lr=0.1, hist2d=False, tic=False, mode="train"),
        "all but TIC": lambda: gradient_tests(model, loss, batch, lr=0.1, tic=False, mode="train"),
        "full": lambda: gradient_tests(model, loss, batch, lr=0.1, mode="train"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-full", action="store_true", help="leave out the variant with TIC (seconds per call)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.calls = 3, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 128, median of {args.repeats} interleaved "
          f"repeats, {args.calls} calls each")
    for name, (model, batch) in models().items():
        fns = variants(model, batch)
        if args.skip_full:
            del fns["full"]
        for fn in fns.values():  # warm-up (vmap, autograd caches)
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                calls = 1 if k == "full" else args.calls  # seconds per call: one is enough to time it
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[k].append((time.perf_counter() - t0) / calls)
        base = statistics.median(times["plain fwd+bwd"])
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n{name} ({n_params} parameters): plain forward+backward {1e3 * base:.2f} ms")
        print("| variant | ms per call | x plain |\n|---|---|---|")
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"| {k} | {1e3 * med:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
