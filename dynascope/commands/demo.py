"""``dynascope demo``: train small real models on the bundled digits data in
contrasting configurations, record them, and write the comparison report.

The runs (8x8 handwritten digits, 1797 images, bundled from scikit-learn /
UCI; a 5-layer ReLU MLP of width 128):

* ``batchnorm-sgd-wd``: BatchNorm after every hidden linear layer, SGD with
  momentum 0.9 and weight decay 5e-4. The BN-fed weights are scale-invariant,
  so their angular update settles at the rotational equilibrium
  sqrt(2 eta lambda / (1 + alpha)).
* ``plain-sgd``: the same MLP without normalization or weight decay.
* ``batchnorm-sgd``: BatchNorm without weight decay: the weight norms of the
  scale-invariant weights grow and their effective learning rate decays.

Every run records the default probes every 5 steps, sharpness (top-3 Hessian
eigenvalues on a fixed batch of 512) every 100 steps against its 2(1+beta)/eta
threshold, plasticity statistics every 100 steps, calibration (ECE, NLL,
reliability) on the 297 held-out digits every 25 steps, the gradient noise
scale B_simple (8 micro-batches of the probe batch) every 50 steps, and a 2D
loss landscape with the trajectory at the end. The BatchNorm runs also record
their batch against running statistics (default probe) and the train/eval loss
gap every 100 steps. The plain run carries an injected fault: at step 400 the
gradient of block 2 is multiplied by 1000 for one step (a bad batch in one
layer), so the always-on sentinel records an event and the report opens with
its forensics.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["run_demo", "DemoConfig", "make_mlp"]


@dataclass(frozen=True)
class DemoConfig:
    name: str
    batchnorm: bool
    weight_decay: float
    lr: float = 0.05
    momentum: float = 0.9
    fault_at: int | None = None  # a one-step fault: this block's gradient is multiplied by FAULT_FACTOR
    fault_block: str = "2"


FAULT_FACTOR = 1000.0  # the injected fault of the plain run (a bad batch in one layer), for the forensics section
HELD_OUT = 1500  # the first 1500 shuffled digits train, the other 297 measure calibration

CONFIGS = (
    DemoConfig("batchnorm-sgd-wd", batchnorm=True, weight_decay=5e-4),
    DemoConfig("plain-sgd", batchnorm=False, weight_decay=0.0, fault_at=400),
    DemoConfig("batchnorm-sgd", batchnorm=True, weight_decay=0.0),
)


class Block(nn.Module):
    """Linear -> (BatchNorm) -> ReLU: one hidden layer of the demo MLP."""

    def __init__(self, d_in: int, d_out: int, batchnorm: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=not batchnorm)
        self.norm = nn.BatchNorm1d(d_out) if batchnorm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.linear(x)))


def make_mlp(batchnorm: bool, width: int = 128, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [Block(64, width, batchnorm)]
    layers += [Block(width, width, batchnorm) for _ in range(depth - 1)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _train(cfg: DemoConfig, out: Path, steps: int, bar: Any, seed: int = 0) -> Path:
    import dynascope

    from ..datasets import load_digits

    x, y = load_digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    held_out = (x[HELD_OUT:], y[HELD_OUT:])  # never trained on: calibration is measured here
    x, y = x[:HELD_OUT], y[:HELD_OUT]
    probe_batch = (x[:512], y[:512])
    torch.manual_seed(seed)
    model = make_mlp(cfg.batchnorm)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = nn.functional.cross_entropy
    extra: dict[str, Any] = {
        "curvature": dynascope.Curvature(every=100, batch=probe_batch, loss_fn=loss_fn, k=3),
        "plasticity": dynascope.Plasticity(every=100, batch=probe_batch[0]),
        "landscape": dynascope.Landscape(at="end", batch=probe_batch, loss_fn=loss_fn, resolution=21),
    }
    run_dir = out / "runs" / cfg.name
    batch = 64
    extra["scheduled"] = [
        dynascope.Calibration(every=25, batch=held_out),
        dynascope.NoiseScale(every=50, batch=probe_batch, loss_fn=loss_fn, micro_batches=8, batch_size=batch),
    ]
    if cfg.batchnorm:  # BatchNorm statistics are recorded by the default probes; the train/eval gap is scheduled
        extra["scheduled"].append(dynascope.BNGap(every=100, batch=probe_batch, loss_fn=loss_fn))
    with dynascope.probe(model, opt, run_dir, every=5, overwrite=True, name=cfg.name, seed=seed,
                         blocks=[str(i) for i in range(4)], **extra) as run:
        step = 0
        while step < steps:
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - batch + 1, batch):
                idx = order[i:i + batch]
                logits = model(x[idx])
                loss = loss_fn(logits, y[idx])
                opt.zero_grad()
                loss.backward()
                if step == cfg.fault_at:  # the injected fault: one block's gradient x FAULT_FACTOR for one step
                    for p in model[int(cfg.fault_block)].parameters():
                        p.grad.mul_(FAULT_FACTOR)
                opt.step()
                acc = (logits.argmax(1) == y[idx]).float().mean()
                run.step(loss=loss, acc=acc)
                bar.update(1)
                step += 1
                if step >= steps:
                    break
    return run_dir


def run_demo(out: str | Path = "dynascope-demo", steps: int = 600, progress: bool = True) -> Path:
    """Train the demo runs into ``out/runs/`` and write ``out/report.html``; returns the report path."""
    from tqdm.auto import tqdm

    import dynascope

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runs = []
    with tqdm(total=steps * len(CONFIGS), desc="training demo runs", unit="step", disable=not progress,
              file=sys.stderr) as bar:
        for cfg in CONFIGS:
            bar.set_postfix_str(cfg.name)
            runs.append(_train(cfg, out, steps, bar))
    report = dynascope.report(runs, out / "report.html", title="dynascope demo: normalization and weight decay")
    if progress:
        print(f"trained {len(runs)} runs in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return Path(report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="dynascope-demo", help="output folder (default: ./dynascope-demo)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (default: 600)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import UserError

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    report = run_demo(args.out, steps=args.steps, progress=not args.no_progress)
    print(report.resolve())
    return 0
