"""GPU check of the BatchNorm, distance and spectral probes (run on a machine with CUDA):

1. No host-device synchronisation on steps that do not flush, with the default
   probes (BatchNorm rows included) plus "distance" and "spectral", under
   ``torch.cuda.set_sync_debug_mode("warn")`` (the first recording step builds
   cached layouts and the spectral probe's random start: not counted).
2. Accuracy on the device: weight.spectral_norm / update.spectral_norm against
   ``torch.linalg.matrix_norm`` in float64 once warm, and bn.var_ratio against a
   float64 recomputation from the captured BatchNorm input.
3. Step-time ratio to the plain loop (CUDA events, interleaved, medians) of the
   default probes with and without "batchnorm", and with "distance" / "spectral".

    python benchmarks/gpu_check_dynamics.py            # CUDA
    python benchmarks/gpu_check_dynamics.py --device cpu --steps 6   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynascope  # noqa: E402

BASE = ("activations", "gradients", "updates")


def cnn() -> nn.Module:
    def block(ci: int, co: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU())

    return nn.Sequential(block(3, 64), block(64, 64), nn.MaxPool2d(2), block(64, 128), block(128, 128),
                         nn.MaxPool2d(2), block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def setup(device: str, kind: str = "sgd"):
    torch.manual_seed(0)
    model = cnn().to(device)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if kind == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1))
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    return model, opt, x, y


def step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def sync_check(device: str, steps: int) -> None:
    model, opt, x, y = setup(device)
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        with dynascope.probe(model, opt, Path(tmp) / "r", every=1, probes=(*BASE, "batchnorm", "distance", "spectral"),
                             flush_every=10_000, flush_seconds=1e9) as run:
            for s in range(steps):
                with warnings.catch_warnings(record=True) as got:
                    warnings.simplefilter("always")
                    if device == "cuda" and s >= 1:
                        torch.cuda.set_sync_debug_mode("warn")  # the hooks run inside the step: all of it
                    try:
                        run.step(loss=step(model, opt, x, y))
                    finally:
                        if device == "cuda":
                            torch.cuda.set_sync_debug_mode(0)
                if s >= 1:
                    counts.append(sum("synchroniz" in str(w.message) for w in got))
    print(f"[1] synchronising calls reported per training step with the probes (steps 1..{steps - 1}, no "
          f"flush; the plain loop makes none): {counts}")


def accuracy(device: str, steps: int, every: int) -> None:
    for kind in ("sgd", "adamw"):
        accuracy_one(device, kind, steps, every)


def accuracy_one(device: str, kind: str, steps: int, every: int) -> None:
    model, opt, x, y = setup(device, kind)
    ref: dict[tuple[int, str], tuple[float, float]] = {}
    before: dict[str, torch.Tensor] = {}
    bn_ref: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with dynascope.probe(model, opt, Path(tmp) / "r", every=every, probes=("batchnorm", "spectral")) as run:
            def pre(o, a, k):
                before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.ndim >= 2})

            def post(o, a, k):
                if run.step_index % every == 0:
                    for n, p in model.named_parameters():
                        if p.ndim >= 2:
                            w = before[n].double().flatten(1)
                            d = p.detach().double().flatten(1) - w
                            ref[(run.step_index, n)] = (torch.linalg.matrix_norm(w, 2).item(),
                                                        torch.linalg.matrix_norm(d, 2).item())

            def bn_hook(mod, inp):
                if run.step_index % every == 0:
                    xx = inp[0].detach().double()
                    var = xx.var(dim=(0, 2, 3), correction=0)
                    bn_ref[run.step_index] = (var / (mod.running_var.double() + mod.eps)).mean().item()

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)
            h = model[0][1].register_forward_pre_hook(bn_hook)
            for _ in range(steps):
                run.step(loss=step(model, opt, x, y))
            h.remove()
        data = dynascope.load_run(Path(tmp) / "r")
        errs = []
        for k, metric in enumerate(("weight.spectral_norm", "update.spectral_norm")):
            df = data.scalars(metric)
            errs.append(max(abs(v - ref[(s, lay)][k]) / ref[(s, lay)][k]
                            for s, lay, v in zip(df["step"], df["layer"], df["value"]) if s > 0))
        df = data.scalars("bn.var_ratio", "0.1")
        bn_err = max(abs(v - bn_ref[s]) / bn_ref[s] for s, v in zip(df["step"], df["value"]))
    print(f"[2] {kind}: worst relative error once warm (every={every}, {steps} steps): weight.spectral_norm "
          f"{errs[0]:.2e} (target 1e-3), update.spectral_norm {errs[1]:.2e} (target 2e-2); bn.var_ratio of "
          f"layer 0.1 {bn_err:.2e}")


def timing(device: str, steps: int, repeats: int) -> None:
    variants = {"default without batchnorm": BASE, "default": (*BASE, "batchnorm"),
                "default + distance": (*BASE, "batchnorm", "distance"),
                "default + spectral": (*BASE, "batchnorm", "spectral")}

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for every in (1, 10):
        model, opt, x, y = setup(device)
        for _ in range(3):
            step(model, opt, x, y)
        ratios: dict[str, list[float]] = {k: [] for k in variants}
        with tempfile.TemporaryDirectory() as tmp:
            opened: set[str] = set()
            for _ in range(repeats):
                for i, (name, probes) in enumerate(variants.items()):
                    t0 = clock()
                    for _ in range(steps):
                        step(model, opt, x, y)
                    plain = clock() - t0
                    with dynascope.probe(model, opt, Path(tmp) / f"{every}-{i}", every=every, probes=probes,
                                         resume=name in opened, flush_seconds=1e9) as run:
                        opened.add(name)
                        t0 = clock()
                        for _ in range(steps):
                            run.step(loss=step(model, opt, x, y))
                        run.flush()
                        probed = clock() - t0
                    ratios[name].append(probed / plain)
        print(f"[3] every={every}: " + ", ".join(f"{k} {statistics.median(v):.3f}x" for k, v in ratios.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (pass --device cpu for a smoke run)")
    sync_check(args.device, min(args.steps, 12))
    accuracy(args.device, args.steps, every=10 if args.steps >= 40 else 1)
    timing(args.device, max(args.steps // 10, 2), args.repeats)


if __name__ == "__main__":
    main()
