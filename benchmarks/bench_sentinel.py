"""The always-on sentinel's cost, by part: interleaved blocks against the bare loop, medians (2 threads,
wall clock), probes off and recording never due (``every=10**9``), so only the sentinel works.

Variants: the default sentinel (loss, gradient and update norms every step, spike rule, drift
detector), without the drift detector, without the update norms (no weight copy), and the session
with the sentinel off (hooks and bookkeeping only). Target (issue 13): the default <= 1.02x.

    python benchmarks/bench_sentinel.py [MODEL_SUBSTRING] [--steps 20] [--repeats 7]
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead as B  # noqa: E402
import torch  # noqa: E402

import dynascope  # noqa: E402


class W:
    """dynascope whose probe() gets extra keywords."""

    def __init__(self, **kw):
        self.kw = kw

    def probe(self, *a, **k):
        return dynascope.probe(*a, **{"probes": (), **self.kw, **k})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("only", nargs="?", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    variants = {"sentinel ": W(), "no-drift ": W(sentinel=dynascope.Sentinel(drift=False)),
                "no-updates ": W(sentinel=dynascope.Sentinel(updates=False)), "off ": W(sentinel=False)}
    for name, factory in B.setups(False).items():
        if name.startswith("~50M") or args.only not in name:
            continue
        r = B.measure(factory, args.steps, args.repeats, everies=(10**9,), workdir=Path(tempfile.mkdtemp()),
                      variants=variants)
        cols = "  ".join(f"{v}{r[f'{v}every={10**9}']:.3f}x" for v in variants)
        print(f"{name:38s} plain {r['plain_ms']:.1f} ms  {cols}", flush=True)


if __name__ == "__main__":
    main()
