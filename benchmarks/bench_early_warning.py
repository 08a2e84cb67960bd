"""Early warning lead time, false warnings and the cost of snapshots, through the real sentinel.

Runs (CPU, data that ships: each bundled 8x8 digit as a sequence of 64 intensity tokens 0..16):

* tiny Hugging Face GPT-2 (2 layers, width 64), Adam at lr 0.3: after ~100 calm steps some seeds
  explode organically. Explosion = the sentinel's first loss spike (or non-finite loss) after step 60;
  lead = explosion step - the first ``warning`` in the 80 steps before it. trainscope reports 9-11 steps
  for its loss CUSUM on a small GPT-2.
* the same GPT-2 at lr 3e-3 (healthy): warnings after step 60 are false warnings.
* models of ours: the demo MLP on the digits with Adam at lr 0.03 (minibatch losses near zero and
  spikes) and the benchmarks' Pre-LN transformer at lr 0.3 (a rough start, then calm).

Then the cost: the drift detector's host time per step, and one snapshot (host copy of the model,
the optimizer state and the RNGs) of the Pre-LN transformer, in ms and MB.

    python benchmarks/bench_early_warning.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dynascope
from dynascope.capture.snapshot import Snapshotter
from dynascope.commands.demo import make_mlp
from dynascope.core.drift import DriftDetector
from dynascope.datasets import load_digits

sys.path.insert(0, str(Path(__file__).parent))
from bench_overhead import PreLNTransformer  # noqa: E402

TOKENS = (load_digits()[0] * 16).round().long()


def gpt2(seed: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def train(kind: str, lr: float, seed: int, steps: int, run_dir: Path) -> dynascope.Run:
    g = torch.Generator().manual_seed(seed)
    if kind == "gpt2":
        model = gpt2(seed)

        def loss_of(b):
            return model(input_ids=b, labels=b).loss
    elif kind == "preln":
        torch.manual_seed(seed)
        model = PreLNTransformer(vocab=17, d=64, layers=2, heads=4, seq=64)

        def loss_of(b):
            return F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
    else:
        torch.manual_seed(seed)
        model = make_mlp(False)
        x, y = load_digits()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with dynascope.probe(model, opt, run_dir, every=10**9, probes=()) as run:
        for _ in range(steps):
            if kind == "mlp":
                i = torch.randint(0, len(x), (64,), generator=g)
                loss = F.cross_entropy(model(x[i]), y[i])
            else:
                loss = loss_of(TOKENS[torch.randint(0, len(TOKENS), (32,), generator=g)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    return dynascope.load_run(run_dir)


def lead_times(runs: list[tuple[str, float, int, int]], work: Path) -> list[dict]:
    out = []
    for kind, lr, seed, steps in runs:
        t0 = time.perf_counter()
        ev = train(kind, lr, seed, steps, work / f"{kind}-{lr}-{seed}").events()
        late = ev[ev["step"] > 60]
        boom = late[late["kind"].isin(["loss_spike", "loss_nonfinite"])]
        explosion = int(boom["step"].iloc[0]) if len(boom) else None
        warns = late[late["kind"] == "warning"]
        first = lead = None
        if explosion is not None:
            before = warns[(warns["step"] <= explosion) & (warns["step"] >= explosion - 80)]
            if len(before):
                first = int(before["step"].iloc[0])
                lead = explosion - first
        false = warns if explosion is None else warns[warns["step"] < explosion - 80]
        signals = "" if first is None else ",".join(warns[warns["step"] == first]["detail"].iloc[0]["signals"])
        row = {"model": kind, "lr": lr, "seed": seed, "steps": steps, "explosion": explosion, "warning": first,
               "lead": lead, "signals": signals, "false warnings": len(false),
               "all warnings": warns["step"].tolist()[:6], "s": round(time.perf_counter() - t0, 1)}
        print(row, flush=True)
        out.append(row)
    return out


def costs() -> None:
    rng = np.random.default_rng(0)
    for m in (20, 200):
        det = DriftDetector([str(i) for i in range(m)])
        rows = np.exp(rng.normal(size=(300, 2 + 2 * m)))
        t0 = time.perf_counter()
        for t, r in enumerate(rows):
            det.update(t, r)
        print(f"drift detector, {m} modules: {1e6 * (time.perf_counter() - t0) / len(rows):.0f} us of host time "
              "per step")
    model = PreLNTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tok = torch.randint(0, 1000, (16, 65))
    loss = F.cross_entropy(model(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
    loss.backward()
    opt.step()  # Adam's state exists
    keeper = Snapshotter(50)
    times = []
    for step in range(15):
        t0 = time.perf_counter()
        keeper.take(step, model, [opt])
        times.append(time.perf_counter() - t0)
    step_times = []
    for _ in range(10):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
    snap = keeper.last
    assert snap is not None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"snapshot of the Pre-LN transformer ({n_params / 1e6:.2f}M parameters, AdamW): "
          f"{1e3 * statistics.median(times):.1f} ms, {snap.nbytes / 2**20:.1f} MB each (2 kept); "
          f"a training step {1e3 * statistics.median(step_times):.1f} ms: snapshot_every=K adds "
          f"{statistics.median(times) / statistics.median(step_times):.2f}/K steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer seeds")
    args = ap.parse_args()
    torch.set_num_threads(2)
    n = 3 if args.quick else 8
    runs = [("gpt2", 0.3, s, 400) for s in range(n)]
    runs += [("gpt2", 3e-3, s, 600) for s in range(2 if args.quick else 4)]
    runs += [("mlp", 0.03, s, 600) for s in range(2 if args.quick else 4)]
    runs += [("preln", 0.3, s, 500) for s in range(2 if args.quick else 3)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = lead_times(runs, Path(tmp))
    leads = [r["lead"] for r in rows if r["lead"] is not None]
    exploded = [r for r in rows if r["explosion"] is not None]
    missed = [r for r in exploded if r["lead"] is None]
    print(f"\nexplosions: {len(exploded)} of {len(rows)} runs; warned before {len(leads)} of them, lead "
          f"{sorted(leads)} steps (median {statistics.median(leads) if leads else 'n/a'}); no warning in the 80 "
          f"steps before: {[(r['model'], r['seed']) for r in missed]}")
    healthy_steps = sum(r["steps"] - 60 for r in rows if r["explosion"] is None)
    false = sum(r["false warnings"] for r in rows)
    print(f"false warnings (after step 60, not in the 80 steps before an explosion): {false} in {healthy_steps} "
          "steps of runs without an explosion (plus the calm stretches of the others)")
    print("trainscope's loss CUSUM on a small GPT-2: 9-11 steps before the explosion")
    costs()


if __name__ == "__main__":
    main()
