"""GPU check of the live probes (run on a machine with CUDA):

1. No host-device synchronisation on steps that do not flush: the loop runs
   under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the
   synchronising calls that torch reports per step (the user's own loop
   makes none: it never calls .item()).
2. Step-time overhead of the default probes against the same loop without
   dynascope (CUDA events, interleaved repeats, medians) on a BatchNorm CNN
   and a Pre-LN transformer, at every=1 and every=10.

    python benchmarks/gpu_check.py [--fused warm|cold|off] [--baseline REV] [--repeats 5]

``--fused warm`` (default) compiles the activation / BatchNorm statistics and the sentinel's update-norm kernels
(Triton, through inductor) in a warm-up run before anything is counted or timed: a long run's steady state
(``fused="auto"`` finds them); ``cold`` leaves ``auto`` to itself; ``off`` keeps every statistic eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynascope  # noqa: E402


def cnn() -> nn.Module:
    def block(ci: int, co: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU())

    return nn.Sequential(block(3, 64), block(64, 64), nn.MaxPool2d(2), block(64, 128), block(128, 128),
                         nn.MaxPool2d(2), block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


class PreLN(nn.Module):
    def __init__(self, d: int = 256, layers: int = 6, vocab: int = 1000) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make(kind: str):
    dev = "cuda"
    if kind == "cnn":
        model = cnn().to(dev)
        x = torch.randn(128, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (128,), device=dev)
        return model, x, y, nn.functional.cross_entropy
    model = PreLN().to(dev)
    x = torch.randint(0, 1000, (32, 128), device=dev)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return model, x, x, loss_fn


def timed_steps(kind: str, every: int | None, n: int, sync_count: list[int] | None = None, mod=dynascope,
                **options) -> float:
    torch.manual_seed(0)
    model, x, y, loss_fn = make(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def one(run):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if run is not None:
            run.step(loss=loss)

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mod.probe(model, opt, f"{tmp}/run", every=every, flush_every=10_000,
                        flush_seconds=1e9, **options) if every else None
        run = ctx.__enter__() if ctx else None
        try:
            for _ in range(5):
                one(run)
            torch.cuda.synchronize()
            if sync_count is not None:
                torch.cuda.set_sync_debug_mode("warn")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    for _ in range(n):
                        one(run)
                torch.cuda.set_sync_debug_mode(0)
                sync_count.append(sum("synchroniz" in str(w.message) for w in caught))
                return 0.0
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(n):
                one(run)
            end.record()
            torch.cuda.synchronize()
            _ = time.perf_counter() - t0
            return start.elapsed_time(end) / n
        finally:
            if ctx:
                ctx.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also time dynascope at this git revision, interleaved (before/after)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fused", choices=("warm", "cold", "off"), default="warm")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    if args.fused == "off":
        os.environ["DYNASCOPE_FUSED"] = "off"
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}; compiled statistics: {args.fused}")
    variants = {"": dynascope}
    if args.baseline:
        from bench_overhead import load_baseline

        variants = {"before ": load_baseline(args.baseline, Path(tempfile.mkdtemp())), "": dynascope}
    for kind in ("cnn", "transformer"):
        if args.fused == "warm":
            from dynascope.probes.activations import ActivationProbe
            from dynascope.probes.batchnorm import BatchNormProbe

            t0 = time.perf_counter()
            timed_steps(kind, 1, 3, probes=(ActivationProbe(fused="on"), "gradients", "updates",
                                            BatchNormProbe(fused="on")),
                        sentinel=dynascope.Sentinel(announce=False, fused="on"))
            print(f"{kind}: kernels compiled in {time.perf_counter() - t0:.1f} s (warm-up run)")
        counts: list[int] = []
        timed_steps(kind, None, 20, counts)
        timed_steps(kind, 1, 20, counts)
        timed_steps(kind, 10, 20, counts)
        timed_steps(kind, 10**9, 20, counts)
        timed_steps(kind, 10**9, 20, counts, snapshot_every=5)
        print(f"{kind}: synchronising calls in 20 steps without flush: baseline={counts[0]} "
              f"every=1: {counts[1]} every=10: {counts[2]} sentinel only (every=10**9): {counts[3]} "
              f"sentinel + snapshot_every=5: {counts[4]}")
        snap = [timed_steps(kind, 10**9, 50, snapshot_every=5) / timed_steps(kind, 10**9, 50)
                for _ in range(args.repeats)]
        print(f"{kind}: snapshot_every=5 over the sentinel alone: {statistics.median(snap):.3f}x")
        base: list[float] = []
        everies = (1, 10, 10**9)  # 10**9: only the always-on sentinel
        times: dict[str, list[float]] = {f"{v}every={e}": [] for v in variants for e in everies}
        for _ in range(args.repeats):
            base.append(timed_steps(kind, None, 50))
            for v, m in variants.items():
                for e in everies:
                    times[f"{v}every={e}"].append(timed_steps(kind, e, 50, mod=m))
        b = statistics.median(base)
        cols = ", ".join(f"{k}: {statistics.median(t) / b:.3f}x" for k, t in times.items())
        print(f"{kind}: step {b:.2f} ms; overhead {cols} (medians of {args.repeats})")


if __name__ == "__main__":
    main()
