"""Training-step overhead of dynascope's default probes, measured side by side.

For each model the same training loop runs without dynascope, with
``dynascope.probe(every=1)`` and with ``every=10``; blocks of ``--steps``
steps are interleaved (plain, every=1, every=10, plain, ...) ``--repeats``
times and the table reports the median per-block ratio to the plain loop
(and the ratio of the summed times). Each probed block reopens its run with
``resume=True`` and ends with ``run.flush()`` inside the timed region, so the
flush cost (one device-to-host copy plus one SQLite transaction) is counted.

Also, for a ~50M-parameter transformer: the overhead ratio, the run-directory
size per recorded step (measured over ``--big-steps`` recorded steps and
extrapolated linearly to 1000; the rows per step are fixed, so the size is
linear), and the resident memory over ``--mem-steps`` probed steps of the small
transformer (every=1).

Usage::

    python benchmarks/bench_overhead.py                 # the table in docs/benchmarks.md
    python benchmarks/bench_overhead.py --quick         # a fast smoke run
    python benchmarks/bench_overhead.py --baseline 8fb709a   # before (that commit) and after, side by side
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynascope  # noqa: E402


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()

        def unit(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(unit(3, width, 1), unit(width, width, 1), unit(width, 2 * width, 2),
                                      unit(2 * width, 2 * width, 1), unit(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class PreLNBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class PreLNTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 4, heads: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList([PreLNBlock(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x, self.mask[: idx.shape[1], : idx.shape[1]])
        return self.head(self.ln_f(x))


class ResBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class DeepNarrow(nn.Module):
    def __init__(self, depth: int = 48, d: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(d, d)
        self.blocks = nn.Sequential(*[ResBlock(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def cls_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def setups(quick: bool) -> dict[str, Callable[[], tuple]]:
    g = torch.Generator().manual_seed(0)

    def cnn():
        model = SmallCNN()
        batch = (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), batch, cls_loss

    def transformer():
        model = PreLNTransformer()
        tok = torch.randint(0, 1000, (16, 65), generator=g)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1), (tok[:, :-1], tok[:, 1:]), \
            lm_loss

    def deep():
        model = DeepNarrow()
        batch = (torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01), batch, cls_loss

    def big():  # ~50M parameters
        model = PreLNTransformer(vocab=16000, d=512, layers=12, heads=8, seq=64)
        tok = torch.randint(0, 16000, (4, 65), generator=g)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1), (tok[:, :-1], tok[:, 1:]), \
            lm_loss

    return {"small CNN + BatchNorm": cnn, "Pre-LN transformer": transformer,
            "deep narrow (48 res. blocks, width 64)": deep, "~50M transformer": big}


# ----------------------------------------------------------------------------- timing
CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU time of this process only)


def train_steps(model, opt, batch, loss_fn, n, run=None) -> float:
    t0 = CLOCK()
    for _ in range(n):
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if run is not None:
            run.step(loss=loss)
    if run is not None:
        run.flush()
    return CLOCK() - t0


def load_baseline(rev: str, into: Path):
    """dynascope as it was at git revision ``rev`` (or in folder ``rev``/dynascope),
    imported as ``dynascope_base`` (a copy of its package), so before and after
    run side by side in one process."""
    import importlib
    import subprocess
    import tarfile

    src = into / "src"
    if Path(rev, "dynascope").is_dir():  # a folder holding an extracted dynascope package (no git needed)
        import shutil

        shutil.copytree(Path(rev, "dynascope"), src / "dynascope_base")
    else:
        repo = Path(__file__).resolve().parents[1]
        archive = into / "base.tar"
        with open(archive, "wb") as f:
            subprocess.run(["git", "-C", str(repo), "archive", rev, "dynascope"], stdout=f, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
        (src / "dynascope").rename(src / "dynascope_base")
    sys.path.insert(0, str(into / "src"))
    return importlib.import_module("dynascope_base")


def measure(factory, steps: int, repeats: int, everies=(1, 10), workdir: Path | None = None,
            variants: dict | None = None) -> dict:
    """Interleaved blocks: plain, then each variant (``{label: dynascope module}``) at each ``every``."""
    variants = variants or {"": dynascope}
    torch.manual_seed(0)
    model, opt, batch, loss_fn = factory()
    n_params = sum(p.numel() for p in model.parameters())
    train_steps(model, opt, batch, loss_fn, 3)  # warm-up
    labels = [f"{v}every={e}" for v in variants for e in everies]
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in labels}}
    opened = set()
    order = list(variants.items())
    for r in range(repeats):
        times["plain"].append(train_steps(model, opt, batch, loss_fn, steps))
        for v, mod in order[r % len(order):] + order[:r % len(order)]:  # rotated: no variant always runs first
            for e in everies:
                key = f"{v}every={e}"
                with mod.probe(model, opt, workdir / key.replace(" ", "_"), every=e, resume=key in opened,
                               flush_seconds=1e9) as run:
                    opened.add(key)
                    times[key].append(train_steps(model, opt, batch, loss_fn, steps, run))
    plain = times["plain"]
    out = {"params": n_params, "plain_ms": 1e3 * statistics.median(plain) / steps}
    for key in labels:
        t = times[key]
        out[key] = statistics.median([a / b for a, b in zip(t, plain)])
        out[f"{key} (sum)"] = sum(t) / sum(plain)
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--big-steps", type=int, default=10, help="recorded steps of the ~50M model for its run size")
    ap.add_argument("--mem-steps", type=int, default=2000)
    ap.add_argument("--only", default=None, help="substring of one model name")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--everies", type=int, nargs="+", default=[1, 10],
                    help="recording intervals to measure (10**9: only the always-on sentinel records)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also measure dynascope at this git revision, interleaved in one process (before/after)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, robust to other processes on a shared machine (use with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.steps, args.repeats, args.big_steps, args.mem_steps = 10, 3, 5, 200
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; {args.clock} clock; "
          f"{args.repeats} interleaved repeats of {args.steps} steps; "
          "ratio = median over repeats of probed / plain block time (sum ratio in brackets)")
    tmp = Path(tempfile.mkdtemp(prefix="dynascope-bench-"))
    rows = []
    variants = {"": dynascope}
    if args.baseline:
        variants = {"before ": load_baseline(args.baseline, tmp), "": dynascope}
    try:
        for name, factory in setups(args.quick).items():
            if args.only and args.only not in name:
                continue
            big = name.startswith("~50M")
            r = measure(factory, 5 if big else args.steps, 3 if big else args.repeats,
                        workdir=tmp / name.replace(" ", "_").replace("/", ""), variants=variants,
                        everies=tuple(args.everies))
            rows.append((name, r))
            cols = "  ".join(f"{v}every={e} {r[f'{v}every={e}']:.3f}x ({r[f'{v}every={e} (sum)']:.3f}x)"
                             for v in variants for e in args.everies)
            print(f"{name:40s} {r['params'] / 1e6:7.2f}M params  plain {r['plain_ms']:8.1f} ms/step  {cols}",
                  flush=True)
            if big:
                big_size(factory, tmp / "big-size", args.big_steps)
        if not args.only or "memory" in args.only:
            memory(tmp / "mem", args.mem_steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def big_size(factory, run_dir: Path, steps: int) -> None:
    torch.manual_seed(0)
    model, opt, batch, loss_fn = factory()
    with dynascope.probe(model, opt, run_dir, every=1) as run:
        train_steps(model, opt, batch, loss_fn, steps, run)
    data = dynascope.load_run(run_dir)
    rows = sum(len(data.scalars(m)) for m in data.metrics())
    size = dir_size(run_dir)
    print(f"~50M transformer run directory: {size / 1e6:.2f} MB after {steps} recorded steps "
          f"({rows / steps:.0f} rows/step) -> {size / steps * 1000 / 1e6:.0f} MB per 1000 recorded steps "
          f"(extrapolated linearly)", flush=True)


def memory(run_dir: Path, steps: int) -> None:
    """Resident memory of a long probed run: the small Pre-LN transformer on a
    small batch (2 x 32 tokens) so that 2000 steps take minutes, not hours."""
    torch.manual_seed(0)
    model = PreLNTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    tok = torch.randint(0, 1000, (2, 33))
    batch, loss_fn = (tok[:, :-1], tok[:, 1:]), lm_loss
    marks = {}
    with dynascope.probe(model, opt, run_dir, every=1) as run:
        for s in range(1, steps + 1):
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.step(loss=loss)
            if s in (steps // 10, steps // 2, steps):
                gc.collect()
                marks[s] = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"Pre-LN transformer (batch 2 x 32 tokens), every=1, {steps} steps, resident memory: "
          + ", ".join(f"step {s}: {v:.0f} MB" for s, v in marks.items()) + f" (process peak {peak:.0f} MB)",
          flush=True)


if __name__ == "__main__":
    main()
