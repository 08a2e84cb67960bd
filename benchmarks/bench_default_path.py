"""The default path's cost: the tables of the issue "always on, at no cost", time and peak memory.

Time: for each model, blocks of ``--steps`` training steps with AdamW, interleaved in one process: the bare loop,
then the defaults (every=10 + sentinel), the sentinel alone (no probes, recording never due) and every=1, in an
order rotated from repeat to repeat; each probed block reopens its run (``resume=True``) and ends with
``run.flush()`` inside the timed region. The ratio is the median over ``--repeats`` of probed / bare block time.
Models: the small CNN + BatchNorm (3 conv-BN-ReLU, batch 64 x 3 x 32 x 32), the Pre-LN transformer (4 layers,
d=128), the deep narrow residual MLP (40 blocks, width 64, LayerNorm) and the ~50M Pre-LN transformer (fewer
steps and repeats).

Memory: peak resident memory of the ~50M transformer, each setting in its own process (benchmarks/bench_memory.py).

    python benchmarks/bench_default_path.py [--repeats 7] [--steps 20] [--only deep] [--no-memory] [--threads 2]
                                            [--fused warm|cold|off]

Activation statistics (``--fused``): ``warm`` (default) compiles every output layout's kernel before the timed
blocks (the steady state of a long run, where ``fused="auto"`` has compiled them; the compile seconds are
printed), ``cold`` leaves ``auto`` to itself (a benchmark this short stays eager), ``off`` never compiles.

Targets (CPU, 2 threads, quiet machine): defaults <= 1.03x / 1.03x / 1.05x, sentinel alone <= 1.01x / 1.01x /
1.02x, every=1 <= 1.15x / 1.20x / 1.50x (CNN / transformer / deep narrow); peak memory at the defaults <= 1.03x
and every=1 <= 1.10x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_overhead as B  # noqa: E402

import dynascope  # noqa: E402
from dynascope.probes.activations import ActivationProbe  # noqa: E402

SETTINGS: dict[str, dict] = {
    "defaults": {},
    "sentinel alone": {"probes": (), "every": 10**9},
    "every=1": {"every": 1},
}
TARGETS = {"small CNN + BatchNorm": (1.03, 1.01, 1.15), "Pre-LN transformer": (1.03, 1.01, 1.20),
           "deep narrow (40 blocks)": (1.05, 1.02, 1.50)}


class CNN3(nn.Module):
    """3 conv-BN-ReLU units and a linear head (the issue's small CNN)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, width, 2 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def models() -> dict[str, Callable[[], tuple]]:
    g = torch.Generator().manual_seed(0)

    def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def cnn():
        model = CNN3()
        batch = (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
        return model, adamw(model), batch, B.cls_loss

    def transformer():
        model = B.PreLNTransformer()
        tok = torch.randint(0, 1000, (16, 65), generator=g)
        return model, adamw(model, 3e-4), (tok[:, :-1], tok[:, 1:]), B.lm_loss

    def deep():
        model = B.DeepNarrow(depth=40)
        batch = (torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g))
        return model, adamw(model), batch, B.cls_loss

    def big():
        model = B.PreLNTransformer(vocab=16000, d=512, layers=12, heads=8, seq=64)
        tok = torch.randint(0, 16000, (4, 65), generator=g)
        return model, adamw(model, 3e-4), (tok[:, :-1], tok[:, 1:]), B.lm_loss

    return {"small CNN + BatchNorm": cnn, "Pre-LN transformer": transformer, "deep narrow (40 blocks)": deep,
            "~50M transformer": big}


def measure(factory: Callable[[], tuple], steps: int, repeats: int, workdir: Path,
            warm: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model, opt, batch, loss_fn = factory()
    B.train_steps(model, opt, batch, loss_fn, 3)  # warm-up
    compile_s = 0.0
    if warm:  # every layout's kernel into the process-wide cache, where the timed runs' "auto" finds them
        probe = ActivationProbe(fused="on")
        sentinel = dynascope.Sentinel(announce=False, fused="on")  # the state path's kernels (> 4M weights)
        with dynascope.probe(model, opt, workdir / "warm", every=1, probes=(probe,), sentinel=sentinel) as run:
            B.train_steps(model, opt, batch, loss_fn, 2, run)
        compile_s = probe.fused.compile_seconds + sentinel.fused.compile_seconds
        shutil.rmtree(workdir / "warm", ignore_errors=True)
    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in SETTINGS}}
    opened: set[str] = set()
    order = list(SETTINGS)
    for r in range(repeats):
        times["bare"].append(B.train_steps(model, opt, batch, loss_fn, steps))
        for key in order[r % len(order):] + order[:r % len(order)]:  # rotated: no setting always runs first
            kw = {"sentinel": dynascope.Sentinel(announce=False), "flush_seconds": 1e9, **SETTINGS[key]}
            with dynascope.probe(model, opt, workdir / key.replace(" ", "_").replace("=", ""),
                                 resume=key in opened, **kw) as run:
                opened.add(key)
                times[key].append(B.train_steps(model, opt, batch, loss_fn, steps, run))
    out = {"bare_ms": 1e3 * statistics.median(times["bare"]) / steps, "compile_s": compile_s}
    for key in SETTINGS:
        out[key] = statistics.median([a / b for a, b in zip(times[key], times["bare"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median)")
    ap.add_argument("--only", default="", help="substring of one model name")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    ap.add_argument("--memory-repeats", type=int, default=1)
    ap.add_argument("--fused", choices=("warm", "cold", "off"), default="warm",
                    help="activation statistics: kernels compiled before timing, left to auto, or never")
    args = ap.parse_args()
    if args.fused == "off":
        os.environ["DYNASCOPE_FUSED"] = "off"
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; AdamW; ratio = median over {args.repeats} interleaved repeats of probed / "
          f"bare block time ({args.steps} steps a block); activation kernels: {args.fused}", flush=True)
    print(f"| model | bare ms/step | {' | '.join(SETTINGS)} | targets |")
    print("|---|---|" + "---|" * len(SETTINGS) + "---|")
    tmp = Path(tempfile.mkdtemp(prefix="dynascope-default-path-"))
    try:
        for name, factory in models().items():
            if args.only not in name:
                continue
            big = name.startswith("~50M")
            t0 = time.perf_counter()
            r = measure(factory, 4 if big else args.steps, max(3, args.repeats // 2) if big else args.repeats,
                        tmp / name.replace(" ", "_").replace("/", "").replace("+", ""), warm=args.fused == "warm")
            target = " / ".join(f"<= {t:.2f}x" for t in TARGETS[name]) if name in TARGETS else "-"
            print(f"| {name} | {r['bare_ms']:.1f} | " + " | ".join(f"{r[k]:.3f}x" for k in SETTINGS)
                  + f" | {target} |  ({time.perf_counter() - t0:.0f} s; {r['compile_s']:.1f} s compiling)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_memory and (not args.only or args.only in "~50M transformer"):
        print("\npeak memory (~50M transformer, each setting in its own process):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).parent / "bench_memory.py"), "--optimizers", "adamw",
                        "sgd", "--repeats", str(args.memory_repeats)], check=True)


if __name__ == "__main__":
    main()
