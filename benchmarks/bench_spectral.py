"""Accuracy of the spectral probe's warm-started block power iteration against
``torch.linalg.matrix_norm(W, 2)``, per (block size, iterations): the
measurement behind SpectralProbe's defaults.

A 3-layer MLP (20 -> 64 -> 64 -> 5) trains on a synthetic task with SGD
(lr 0.05, momentum 0.9) and AdamW (lr 1e-3, weight decay 0.1), recording
every step (30 steps) and every 10 steps (200 steps). The reference is the
float64 spectral norm of W_t and of D = W_{t+1} - W_t captured by optimizer
hooks; the table prints the worst relative error over layers and every
recording step after the first (the first one starts cold, with 30 iterations).

Usage::

    python benchmarks/bench_spectral.py           # the grid
    python benchmarks/bench_spectral.py --quick   # the defaults only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynascope  # noqa: E402
from dynascope.probes.spectral import SpectralProbe  # noqa: E402


def cnn() -> nn.Module:
    def block(ci: int, co: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU())

    return nn.Sequential(block(3, 64), block(64, 64), nn.MaxPool2d(2), block(64, 128), block(128, 128),
                         nn.MaxPool2d(2), block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def worst_errors(kind: str, probe: SpectralProbe, steps: int, every: int, conv: bool = False) -> tuple[float, float]:
    """Worst relative error of weight.spectral_norm and update.spectral_norm after the first recording."""
    torch.manual_seed(0)
    model = cnn() if conv else nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                              nn.Linear(64, 5))
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if kind == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 32, 32, generator=g) if conv else torch.randn(256, 20, generator=g)
    y = x.flatten(1)[:, :5].argmax(1) if conv else x[:, :5].argmax(1)
    ref: dict[tuple[int, str], tuple[float, float]] = {}
    before: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with dynascope.probe(model, opt, Path(tmp) / "r", every=every, probes=(probe,)) as run:
            def pre(o, a, k):
                before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.ndim >= 2})

            def post(o, a, k):
                if run.step_index % every:
                    return
                for n, p in model.named_parameters():
                    if p.ndim >= 2:
                        w = before[n].double().flatten(1)
                        d = p.detach().double().flatten(1) - w
                        ref[(run.step_index, n)] = (torch.linalg.matrix_norm(w, 2).item(),
                                                    torch.linalg.matrix_norm(d, 2).item())

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)
            for _ in range(steps):
                idx = torch.randint(0, 256, (16 if conv else 32,), generator=g)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.step()
        data = dynascope.load_run(Path(tmp) / "r")
        out = []
        for k, metric in enumerate(("weight.spectral_norm", "update.spectral_norm")):
            df = data.scalars(metric)
            out.append(max(abs(v - ref[(s, lay)][k]) / ref[(s, lay)][k]
                           for s, lay, v in zip(df["step"], df["layer"], df["value"]) if s > 0))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the default settings")
    ap.add_argument("--cnn", action="store_true", help="also a BatchNorm CNN (5 conv layers up to 256 x 1152) "
                    "with AdamW, 30 steps recorded every 2, with and without following the updates")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # (block, iters, update_iters, follow)
    grid = [(12, 3, 2, 2)] if args.quick else [(1, 2, 2, 0), (1, 6, 6, 0), (4, 2, 2, 0), (4, 4, 4, 0), (8, 3, 2, 0),
                                               (8, 5, 2, 0), (12, 3, 2, 0), (12, 3, 2, 2)]
    print(f"{'model':5} {'optimizer':9} {'every':>5} {'block':>5} {'iters':>5} {'upd.it':>6} {'follow':>6} "
          f"{'weight err':>11} {'update err':>11}")
    cases = [("mlp", kind, every, steps) for kind in ("sgd", "adamw") for every, steps in ((1, 30), (10, 200))]
    if args.cnn:
        cases.append(("cnn", "adamw", 2, 30))
    for model, kind, every, steps in cases:
        for block, iters, update_iters, follow in (grid if model == "mlp" else [(12, 3, 2, 0), (12, 3, 2, 2)]):
            probe = SpectralProbe(iters=iters, update_iters=update_iters, block=block, follow=follow)
            ew, eu = worst_errors(kind, probe, steps, every, conv=model == "cnn")
            print(f"{model:5} {kind:9} {every:5d} {block:5d} {iters:5d} {update_iters:6d} {follow:6d} {ew:11.2e} "
                  f"{eu:11.2e}", flush=True)


if __name__ == "__main__":
    main()
