"""Per-output cost of the reductions the activation hook could use, on the CPU at 2 threads (run it on an
idle machine): the ones it uses ("old": shifted copy, two means with an in-place square, aminmax, a sum
of |sign(x)|) against norm-based ones ("new": the 2-norm of the shifted copy, the inf-norm, the 0-norm),
and each reduction alone, for conv, sequence and MLP outputs. Microseconds per output, medians of 7.

    python benchmarks/bench_activation_ops.py
"""

from __future__ import annotations

import statistics
import time

import torch


def _shifted(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    shift = x[tuple(0 if d in dims else slice(None) for d in range(x.ndim))]
    return x - shift.reshape([1 if d in dims else -1 for d in range(x.ndim)]), shift


def old(x: torch.Tensor, dims: tuple[int, ...]) -> tuple:
    y, _ = _shifted(x, dims)
    m = y.mean(dims)
    y.square_()
    v = y.mean(dims) - m * m
    lo, hi = torch.aminmax(x)
    s = x.sign()
    s.abs_()
    return v, m, lo, hi, s.sum()


def new(x: torch.Tensor, dims: tuple[int, ...]) -> tuple:
    y, shift = _shifted(x, dims)
    inv = 1.0 / (y.numel() // shift.numel())
    m = y.sum(dims).mul_(inv)
    v = torch.linalg.vector_norm(y, 2, dims).square_().mul_(inv).sub_(m * m)
    return v, m, torch.linalg.vector_norm(x, float("inf")), torch.linalg.vector_norm(x, 0)


PARTS = {
    "shift": lambda x, d: _shifted(x, d)[0],
    "mean": lambda x, d: x.mean(d),
    "sum": lambda x, d: x.sum(d),
    "vn2": lambda x, d: torch.linalg.vector_norm(x, 2, d),
    "square_mean": lambda x, d: (x * x).mean(d),
    "aminmax": lambda x, d: torch.aminmax(x),
    "vninf": lambda x, d: torch.linalg.vector_norm(x, float("inf")),
    "signsum": lambda x, d: x.sign().abs_().sum(),
    "vn0": lambda x, d: torch.linalg.vector_norm(x, 0),
    "count_nonzero": lambda x, d: torch.count_nonzero(x),
    "old": old,
    "new": new,
}
SHAPES = {
    "conv 32x32x32x32": ((32, 32, 32, 32), (0, 2, 3)),
    "conv 32x128x8x8": ((32, 128, 8, 8), (0, 2, 3)),
    "seq 16x64x128": ((16, 64, 128), (0, 1)),
    "seq 16x64x512": ((16, 64, 512), (0, 1)),
    "mlp 128x64": ((128, 64), (0,)),
}


def main() -> None:
    torch.set_num_threads(2)
    for name, (shape, dims) in SHAPES.items():
        xs = [torch.relu(torch.randn(*shape)) for _ in range(8)]
        res: dict[str, list[float]] = {k: [] for k in PARTS}
        for _ in range(7):
            for k, f in PARTS.items():
                t = time.perf_counter()
                for x in xs:
                    f(x, dims)
                res[k].append((time.perf_counter() - t) / len(xs) * 1e6)
        cols = "  ".join(f"{k} {statistics.median(v):.0f}" for k, v in res.items())
        print(f"{name}: {cols} (us per output)", flush=True)


if __name__ == "__main__":
    main()
