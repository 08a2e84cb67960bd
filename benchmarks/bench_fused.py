"""The activation statistics eager against compiled (dynascope.probes._fused), side by side at every=1.

For each model of bench_default_path (the ~50M transformer left out): blocks of ``--steps`` AdamW steps,
interleaved in one process in rotated order: the bare loop, the activations probe alone eager
(``fused="off"``) and compiled, and every default probe but the sentinel eager and compiled. The compiled
settings share kernels compiled before the timed blocks (printed: the compile seconds), as a long run has
them once ``fused="auto"`` found them worth it. Ratio = median over ``--repeats`` of probed / bare block time.

    python benchmarks/bench_fused.py [--repeats 5] [--steps 15] [--only deep] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_default_path as D  # noqa: E402
import bench_overhead as B  # noqa: E402

import dynascope  # noqa: E402
from dynascope.probes.activations import ActivationProbe  # noqa: E402
from dynascope.probes.batchnorm import BatchNormProbe  # noqa: E402

OTHERS = ("gradients", "updates")


def settings() -> dict[str, Callable[[], dict]]:
    def probes(mode: str, everything: bool) -> tuple:
        act = ActivationProbe(fused=mode)
        return (act, *OTHERS, BatchNormProbe(fused=mode)) if everything else (act,)

    return {"activations eager": lambda: {"probes": probes("off", False)},
            "activations fused": lambda: {"probes": probes("auto", False)},
            "all probes eager": lambda: {"probes": probes("off", True)},
            "all probes fused": lambda: {"probes": probes("auto", True)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setups = settings()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; AdamW, every=1, no sentinel; median over "
          f"{args.repeats} interleaved repeats of probed / bare ({args.steps} steps a block)")
    print("| model | bare ms/step | " + " | ".join(setups) + " | compile s |")
    print("|---|---|" + "---|" * len(setups) + "---|")
    for name, factory in D.models().items():
        if args.only not in name or name.startswith("~50M"):
            continue
        torch.manual_seed(0)
        model, opt, batch, loss_fn = factory()
        B.train_steps(model, opt, batch, loss_fn, 3)
        tmp = Path(tempfile.mkdtemp(prefix="dynascope-fused-"))
        act, bn = ActivationProbe(fused="on"), BatchNormProbe(fused="on")  # every kernel, before timing
        with dynascope.probe(model, opt, tmp / "warm", every=1, probes=(act, bn), sentinel=False) as run:
            B.train_steps(model, opt, batch, loss_fn, 2, run)
        compile_s = act.fused.compile_seconds + bn.fused.compile_seconds
        times: dict[str, list[float]] = {"bare": [], **{k: [] for k in setups}}
        opened: set[str] = set()
        keys = list(setups)
        for r in range(args.repeats):
            times["bare"].append(B.train_steps(model, opt, batch, loss_fn, args.steps))
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                with dynascope.probe(model, opt, tmp / key.replace(" ", "_"), resume=key in opened, every=1,
                                     sentinel=False, flush_seconds=1e9, **setups[key]()) as run:
                    opened.add(key)
                    times[key].append(B.train_steps(model, opt, batch, loss_fn, args.steps, run))
        ratios = {k: statistics.median([a / b for a, b in zip(times[k], times["bare"])]) for k in setups}
        bare_ms = 1e3 * statistics.median(times["bare"]) / args.steps
        print(f"| {name} | {bare_ms:.1f} | " + " | ".join(f"{ratios[k]:.3f}x" for k in setups)
              + f" | {compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
