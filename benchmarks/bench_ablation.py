"""Which part of the default probes costs what, against a baseline revision: interleaved blocks of 15
steps, medians of 5 (2 threads, wall clock), every=1.

    python benchmarks/bench_ablation.py BASELINE_REV_OR_FOLDER [MODEL_SUBSTRING]
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_overhead as B  # noqa: E402
import torch  # noqa: E402

import dynascope  # noqa: E402

torch.set_num_threads(2)
class W:
    """A dynascope module whose probe() gets extra keywords."""

    def __init__(self, mod, **kw):
        self.mod, self.kw = mod, kw

    def probe(self, *a, **k):
        return self.mod.probe(*a, **{**self.kw, **k})


base = B.load_baseline(sys.argv[1], Path(tempfile.mkdtemp()))
variants = {"before ": base, "all ": dynascope, "no-sentinel ": W(dynascope, sentinel=False),
            "act ": W(dynascope, probes=("activations",), sentinel=False),
            "grad+upd ": W(dynascope, probes=("gradients", "updates"), sentinel=False),
            "bn ": W(dynascope, probes=("batchnorm",), sentinel=False),
            "before-act ": W(base, probes=("activations",)),
            "before-grad+upd ": W(base, probes=("gradients", "updates"))}
for name, factory in B.setups(False).items():
    if name.startswith("~50M") or (len(sys.argv) > 2 and sys.argv[2] not in name):
        continue
    r = B.measure(factory, 15, 5, everies=(1,), workdir=Path(tempfile.mkdtemp()), variants=variants)
    cols = "  ".join(f"{v}{r[f'{v}every=1']:.3f}x" for v in variants)
    print(f"{name:38s} plain {r['plain_ms']:.1f} ms  {cols}", flush=True)
