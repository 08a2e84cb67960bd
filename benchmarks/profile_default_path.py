"""Where a probed step's time goes: cProfile of one of bench_default_path's models, milliseconds per step by part.

The kernels are compiled first (a warm-up run with ``fused="on"``: a long run's steady state), then ``--steps``
steps are profiled at ``--every`` with the default sentinel, ending with a flush. cProfile slows Python, so read
the parts against each other, not as wall-clock overheads (those are bench_default_path's).

    python benchmarks/profile_default_path.py [--model deep] [--every 1] [--steps 40]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_default_path as D  # noqa: E402
import bench_overhead as B  # noqa: E402

import dynascope  # noqa: E402
from dynascope.probes.activations import ActivationProbe  # noqa: E402

PARTS = (("training forward (with the hooks)", "bench_overhead.py", "forward"),
         ("  activation hooks", "activations.py", "hook"),
         ("backward", "~", "<method 'run_backward' of 'torch._C._EngineBase' objects>"),
         ("optimizer step", "adam.py", "adam"),
         ("instruments before the optimizer step", "session.py", "before_optimizer_step"),
         ("instruments after the optimizer step", "session.py", "after_optimizer_step"),
         ("run.step (collect, sentinel, flush)", "session.py", "step"),
         ("  activations collect", "activations.py", "collect"),
         ("  flush (store writes)", "session.py", "flush"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deep", help="substring of a bench_default_path model name")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    matches = [(k, v) for k, v in D.models().items() if args.model in k]
    if not matches:
        sys.exit(f"profile_default_path: no model matches {args.model!r}; models: {', '.join(D.models())}")
    name, factory = matches[0]
    torch.manual_seed(0)
    model, opt, batch, loss_fn = factory()
    tmp = Path(tempfile.mkdtemp(prefix="dynascope-profile-"))
    with dynascope.probe(model, opt, tmp / "warm", every=1, probes=(ActivationProbe(fused="on"),),
                         sentinel=dynascope.Sentinel(announce=False, fused="on")) as run:
        B.train_steps(model, opt, batch, loss_fn, 2, run)
    with dynascope.probe(model, opt, tmp / "run", flush_seconds=1e9, every=args.every,
                         sentinel=dynascope.Sentinel(announce=False)) as run:
        B.train_steps(model, opt, batch, loss_fn, 5, run)
        prof = cProfile.Profile()
        prof.enable()
        B.train_steps(model, opt, batch, loss_fn, args.steps, run)
        run.flush()
        prof.disable()
    stats = pstats.Stats(prof)
    cum = {(fn.rsplit("/", 1)[-1], func): ct for (fn, _, func), (_, _, _, ct, _) in stats.stats.items()}
    print(f"{name}, every={args.every}, {args.threads} threads: ms per step under cProfile "
          f"(total {1e3 * stats.total_tt / args.steps:.2f})")
    for label, file, func in PARTS:
        print(f"  {label:40s} {1e3 * cum.get((file, func), 0.0) / args.steps:7.2f}")


if __name__ == "__main__":
    main()
