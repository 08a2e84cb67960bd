"""Cost of the plasticity diagnostics, as ratios measured side by side.

* ``plasticity_metrics`` (one hooked forward pass + SVDs + weight magnitude)
  against one plain ``no_grad`` forward pass on the same probe batch, and
  against one SGD training step on a batch of 64 (how much a
  ``Plasticity(every=N)`` probe adds per N steps).
* the power-law fit (``power_law_alpha``) of a 512x512 weight's spectrum
  against its SVD.

Run: ``python benchmarks/bench_plasticity.py`` (medians of 7 repeats, 2 threads).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from dynascope.diagnostics.plasticity import plasticity_metrics
from dynascope.diagnostics.weights import power_law_alpha, singular_values


def median_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_case(name: str, model: nn.Module, probe: torch.Tensor, train_x: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    y = torch.randint(0, 10, (train_x.shape[0],))

    def forward() -> None:
        with torch.no_grad():
            model(probe)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(train_x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_metrics = median_time(lambda: plasticity_metrics(model, probe))
    t_fwd = median_time(forward)
    t_step = median_time(step)
    print(f"{name:34s} {t_metrics * 1e3:7.1f}ms {t_fwd * 1e3:7.1f}ms {t_metrics / t_fwd:6.2f} "
          f"{t_step * 1e3:8.1f}ms {t_metrics / t_step:6.2f}")


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cases = {
        "MLP 3x256 (probe 512x64)": (
            nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10)),
            torch.randn(512, 64), torch.randn(64, 64)),
        "CNN 3 conv (probe 256x3x32x32)": (
            nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2),
                          nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * 8 * 8, 10)),
            torch.randn(256, 3, 32, 32), torch.randn(64, 3, 32, 32)),
    }
    print(f"{'model':34s} {'metrics':>9s} {'forward':>9s} {'ratio':>6s} {'train step':>10s} {'ratio':>6s}")
    for name, (model, probe, train_x) in cases.items():
        bench_case(name, model, probe, train_x)
    w = torch.randn(512, 512) / 512**0.5
    t_svd = median_time(lambda: singular_values(w))
    sv = singular_values(w)
    t_fit = median_time(lambda: power_law_alpha(sv**2))
    print(f"512x512 weight: svd {t_svd * 1e3:.1f}ms, power-law fit {t_fit * 1e3:.1f}ms "
          f"(ratio {t_fit / t_svd:.2f})")


if __name__ == "__main__":
    main()
