"""Peak memory of the default path: the ~50M-parameter Pre-LN transformer (bench_overhead's "~50M
transformer"), 6 training steps, each setting in its own process (peak resident memory, ru_maxrss), with AdamW
and with SGD (momentum 0.9). Settings: the bare loop, the defaults (every=10 + sentinel), the sentinel alone
(probes=()), every=1, and every=1 with the activation statistics compiled from the first step
(``DYNASCOPE_FUSED=on``: host memory then holds inductor, ~150 MB, which a long run pays once its kernels are
compiled). Prints the peak and its ratio to the bare loop of the same optimizer.

    python benchmarks/bench_memory.py [--steps 6] [--optimizers adamw sgd] [--repeats 1]

Targets (issue "always on, at no cost"): defaults <= 1.03x, every=1 <= 1.10x of the bare loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = ("bare", "defaults", "sentinel", "every=1", "every=1 fused")


def child(setting: str, optimizer: str, steps: int) -> None:
    import os
    import resource
    import tempfile

    if setting == "every=1 fused":
        os.environ["DYNASCOPE_FUSED"] = "on"

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_overhead import PreLNTransformer, lm_loss

    import dynascope

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    model = PreLNTransformer(vocab=16000, d=512, layers=12, heads=8, seq=64)
    tok = torch.randint(0, 16000, (4, 65), generator=g)
    batch = (tok[:, :-1], tok[:, 1:])
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    run = None
    with tempfile.TemporaryDirectory() as d:
        if setting != "bare":
            kw = {"defaults": {}, "sentinel": {"probes": ()}, "every=1": {"every": 1},
                  "every=1 fused": {"every": 1}}[setting]
            run = dynascope.probe(model, opt, Path(d) / "r", sentinel=dynascope.Sentinel(announce=False), **kw)
            run.start()
        for _ in range(steps):
            loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if run is not None:
                run.step(loss=loss.detach())
        if run is not None:
            run.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "params_mb": n_params * 4 / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    ap.add_argument("--repeats", type=int, default=1, help="processes per setting (median peak)")
    ap.add_argument("--child", nargs=3, metavar=("SETTING", "OPTIMIZER", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    for optimizer in args.optimizers:
        peaks: dict[str, float] = {}
        params_mb = 0.0
        for setting in SETTINGS:
            got = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--child", setting, optimizer, str(args.steps)],
                                     check=True, capture_output=True, text=True).stdout
                rec = json.loads(out.strip().splitlines()[-1])
                got.append(rec["peak_mb"])
                params_mb = rec["params_mb"]
            peaks[setting] = statistics.median(got)
        print(f"~50M Pre-LN transformer, {optimizer}, {args.steps} steps, parameters {params_mb:.0f} MB:")
        for setting in SETTINGS:
            print(f"  {setting:13s} peak {peaks[setting]:7.0f} MB  x{peaks[setting] / peaks['bare']:.3f}")


if __name__ == "__main__":
    main()
